"""Sweep launch configs of the input-sparse GEMV for every projection shape of the given models (batch 1,
bf16), timed the way bench.py times kernels (CUDA-graph replay over 4 weight copies). Needs a CUDA GPU.
Prints the best configs per shape and writes every timing to --out (JSON) so heuristics can be read off.

    python scripts/tune_gemv.py [--models llama-2-7b,llama-3-8b] [--out tune.json] [--quick]
"""
import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import _path  # noqa: F401
import torch
import triton

from bench import graph_time_us, projection_shapes, read_bandwidth, sparse_threshold
from kernels import sparse_gemv
from model import ModelArgs

C = sparse_gemv.Config


def candidates(K: int, sizes, glu: bool, n_sm: int, quick: bool) -> list:
    out = []
    tiles = [(bn, bk) for bn in (64, 128, 256) for bk in (16, 32, 64, 128) if 2048 <= bn * bk <= 16384]
    fma = [(bn, bk, w, st, 0) for (bn, bk) in tiles for w in (4, 8) for st in ((1, 3) if not quick else (1,))]
    dot = [(bn, bk, w, st, 1) for bn in (64, 128) for bk in (64, 128) for w in (4, 8) for st in ((2, 4) if not quick else (3,))]
    n_out = sizes[0] if glu else sum(sizes)
    for bn, bk, w, st, d in fma + dot:
        n_tiles = sum(triton.cdiv(s, bn) for s in (sizes[:1] if glu else sizes))
        for waves in (2, 4, 8):
            split = max(1, min(K // bk, round(waves * n_sm / n_tiles)))
            out.append(C(bn, bk, split, w, st, d))
    return list(dict.fromkeys(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-2-7b,llama-3-8b")
    p.add_argument("--out", type=Path, default=Path("tune.json"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--top", type=int, default=6, help="configs re-timed at the other sparsities")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: tune_gemv.py needs a CUDA GPU")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    shapes = {}
    for m in a.models.split(","):
        for proj, (K, sizes, glu) in projection_shapes(ModelArgs.from_name(m)).items():
            shapes.setdefault((K, sizes, glu), f"{m}:{proj}")
    records = []
    dtype = torch.bfloat16
    for (K, sizes, glu), name in shapes.items():
        t0 = time.time()
        N = sum(sizes)
        ws = [(torch.randn(K, N, device="cuda") / K ** 0.5).to(dtype) for _ in range(4)]
        x = torch.randn(1, K, device="cuda", dtype=dtype)
        res = None if glu else torch.randn(1, N, device="cuda", dtype=dtype) if name.endswith(("o", "down")) else None
        t = torch.zeros(len(sizes), K, device="cuda")
        counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
        nbytes = K * N * 2
        mm = graph_time_us([lambda w=w: torch.matmul(x, w) for w in ws])

        def time_cfg(cfg, s):
            t.fill_(sparse_threshold(x, s))
            ref = sparse_gemv.sparse_gemv_ref(x.float(), ws[0].float(), t, sizes, glu=glu,
                                              residual=None if res is None else res.float())
            y = sparse_gemv.sparse_gemv(x, ws[0], t, sizes, counters, cfg, glu=glu, residual=res)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            us = graph_time_us([lambda w=w: sparse_gemv.sparse_gemv(x, w, t, sizes, counters, cfg, glu=glu, residual=res)
                                for w in ws], launches=32, replays=10)
            measured = (x.abs().float() <= t[0]).float().mean().item()
            rec = {"shape": name, "K": K, "sizes": list(sizes), "glu": glu, "config": list(cfg), "sparsity": s,
                   "us": us, "roofline_us": (1 - measured) * nbytes / bw * 1e6, "matmul_us": mm, "err": err}
            records.append(rec)
            return rec

        first = []
        for cfg in candidates(K, sizes, glu, n_sm, a.quick):
            try:
                first.append(time_cfg(cfg, 0.0))
            except Exception as e:  # e.g. out of shared memory for a large dot tile
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        first.sort(key=lambda r: r["us"])
        best = [C(*r["config"]) for r in first[: a.top]]
        for s in (0.5, 0.9):
            for cfg in best:
                time_cfg(cfg, s)
        print(f"{name} K={K} N={N} glu={glu}: matmul {mm:.1f} us, roofline s0 {nbytes / bw * 1e6:.1f} us "
              f"({time.time() - t0:.0f} s)", flush=True)
        for cfg in best:
            rs = [r for r in records if r["shape"] == name and r["config"] == list(cfg)]
            print("   ", tuple(cfg), " ".join(f"s{r['sparsity']}:{r['us']:.1f}/{r['roofline_us']:.1f}(err {r['err']:.1e})"
                                          for r in rs), flush=True)
        default = sparse_gemv.default_config(1, K, sizes, glu, n_sm)
        for s in (0.0, 0.5):
            r = time_cfg(default, s)
            print(f"    default {tuple(default)} s{s}: {r['us']:.1f}", flush=True)
        del ws
        a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "bw": bw, "records": records}, indent=0))


if __name__ == "__main__":
    main()
