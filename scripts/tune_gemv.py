"""Sweep launch configs of the batch-1 input-sparse GEMV for every projection shape of the given models
(bf16 inputs; weights bf16, or quantized with --quant), timed the way bench.py times kernels (CUDA-graph replay over
weight copies that L2 cannot hold), each launch as the decode step makes it (StepLaunch: q/k/v and gate/up leave
their split-K partials, down reads gate/up's partials under gate/up's default config). Needs a CUDA GPU. Prints the best configs per shape and writes every timing to
--out (JSON) so heuristics can be read off.

    python scripts/tune_gemv.py [--models llama-2-7b,llama-3-8b] [--quant int4] [--out tune.json] [--sparsities 0,0.5,0.9]
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton

from cli import HelpFormatter, add_quant_arg, run_cli, sparsity_list
from errors import UserError
from kernels import configs, reference, sparse_gemv
from kernels.formats import QuantFormat, quant_format
from model import ModelArgs
from scripts.bench import (graph_time_us, projection_roles, projection_shapes, read_bandwidth, sparse_threshold,
                           weight_copies)

C = configs.Config


def candidates(K: int, sizes, glu: bool, n_sm: int, fmt: QuantFormat) -> list:
    """Column tiles of 64 or 128, steps of 32, 64 or 128 kept rows, and split-K giving 1 to 6 programs per SM (the
    v5 and gate/up sweeps of docs/perf-notes.md, 128-row steps since session 29); one warp group per program; main
    also times each 16/8-bit config with the masked stream. int4 (steps within a scale group): tiles of 64 to 512
    columns, 64- or 128-row steps, 2 to 4 programs per SM (8 warps lost everywhere on the H200)."""
    out = []
    tiles = sizes[:1] if glu else sizes
    group = fmt.group(K)
    if group:
        grid = itertools.product((64, 128, 256, 512), (64, 128), (2, 3, 4))
    else:
        grid = itertools.product((64, 128), (128, 64, 32), (1, 2, 3, 4, 6))
    for bn, bk, per_sm in grid:
        if any(s % bn for s in tiles) or (group and (group % bk or (glu and bn > 256))):
            continue
        n_tiles = sum(triton.cdiv(s, bn) for s in tiles)
        split = max(1, min(round(per_sm * n_sm / n_tiles), triton.cdiv(K, 2 * bk)))
        out.append(C(bn, bk, split, 4, 1, 0))
    return list(dict.fromkeys(out))


class StepLaunch:
    """One projection's launch as the decode step makes it, into buffers made once (so that a CUDA graph of calls
    holds the launch alone): q/k/v and gate/up write their split-K partials [P, 1 or 2, 1, N] for the next kernel;
    o adds the residual; down also reads its input as gate/up's partials [P', 2, 1, K] (P' gate/up's split under
    its default config: down's time moves with it, docs/perf-notes.md session 17). x: the input's values [1, K]
    (thresholds and references are set on them)."""

    def __init__(self, proj: str, K: int, sizes, glu: bool, cfg, fmt: QuantFormat, n_sm: int, dtype, device):
        self.proj, self.sizes, self.glu, self.cfg, self.fmt = proj, tuple(sizes), glu, cfg, fmt
        roles = projection_roles(proj)
        self.deferred = roles.partials
        n_out = sizes[0] if glu else sum(sizes)
        self.x = torch.randn(1, K, device=device, dtype=dtype)
        self.xin = self.x
        if roles.glu_in:
            D = sizes[0]
            gu = configs.default_config(1, D, (K, K), True, n_sm, fmt, group=fmt.group(D))
            self.xin = torch.zeros(configs.k_layout(D, gu, fmt.group(D))[1], 2, 1, K, device=device)
            self.xin[0] = torch.randn(2, 1, K, device=device) * 2
            self.x = reference.parts_ref(self.xin, True, dtype)
        self.res = torch.randn(1, n_out, device=device, dtype=dtype) if roles.residual else None
        self.t = torch.zeros(len(sizes), K, device=device)
        self.counters = torch.zeros(configs.counters_size(sizes, glu, cfg.block_n), dtype=torch.int32, device=device)
        if self.deferred:
            P = configs.k_layout(K, cfg, fmt.group(K))[1]
            self.out = torch.full((P, 2 if glu else 1, 1, n_out), float("nan"), device=device)
        else:
            self.out = torch.full((1, n_out), float("nan"), device=device, dtype=dtype)

    def __call__(self, w, scale):
        sparse_gemv.launch(self.xin, w, self.t, None if self.deferred else self.counters, self.sizes, self.glu,
                           self.cfg, self.res, self.out, self.fmt, scale, partial_out=self.deferred)

    def result(self):
        """The output as its consumer sees it [1, N_OUT] (partials summed, GLU applied, in x's dtype)."""
        return reference.parts_ref(self.out, self.glu, self.x.dtype) if self.deferred else self.out

    def reference(self, w_ref):
        return reference.sparse_gemv_ref(self.x.float(), w_ref, self.t, self.sizes, glu=self.glu,
                                         residual=None if self.res is None else self.res.float())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", default="llama-2-7b,llama-3-8b", help="comma-separated configs whose shapes to sweep")
    p.add_argument("--sparsities", default="0,0.5,0.9", help="comma-separated sparsity levels")
    p.add_argument("--out", type=Path, default=Path("tune.json"), help="JSON file of every config's timings")
    p.add_argument("--top", type=int, default=5, help="best configs printed per shape and level")
    add_quant_arg(p)
    a = p.parse_args()
    fmt = quant_format(a.quant)
    models = {m: ModelArgs.from_name(m) for m in a.models.split(",") if m}
    levels = sparsity_list(a.sparsities, "--sparsities")
    if not torch.cuda.is_available():
        raise UserError("tune_gemv.py needs a CUDA GPU")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    shapes = {}
    for m, args in models.items():
        for proj, (K, sizes, glu) in projection_shapes(args).items():
            shapes.setdefault((K, sizes, glu), f"{m}:{proj}")
    records = []
    dtype = torch.bfloat16
    for (K, sizes, glu), name in shapes.items():
        t0 = time.time()
        N = sum(sizes)
        nbytes = K * N * fmt.bits // 8
        dense = [(torch.randn(K, N, device="cuda") / K ** 0.5).to(dtype)
                 for _ in range(weight_copies(nbytes, torch.cuda.get_device_properties(0).L2_cache_size))]
        ws = [fmt.quantize_weight(w) if fmt.quantized else (w, None) for w in dense]  # (weights, scales)
        w_ref = fmt.dequantize(*ws[0]) if fmt.quantized else dense[0].float()
        proj = name.split(":")[1]
        x = torch.randn(1, K, device="cuda", dtype=dtype)
        mm = graph_time_us([lambda w=w: torch.matmul(x, w) for w in dense])
        del dense
        default = configs.default_config(1, K, sizes, glu, n_sm, fmt, group=fmt.group(K))
        by_cfg = {}
        cands = candidates(K, sizes, glu, n_sm, fmt)
        cands += [] if fmt.group(K) else [c._replace(masked=1) for c in cands]  # the masked stream: 16/8-bit
        for cfg in dict.fromkeys(cands + [default]):
            row = {}
            try:
                step = StepLaunch(proj, K, sizes, glu, cfg, fmt, n_sm, dtype, "cuda")
            except Exception as e:  # e.g. a config the launch refuses
                print(f"  {tuple(cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            x = step.x
            for s in levels:
                step.t.fill_(sparse_threshold(x, s))
                ref = step.reference(w_ref)
                step.out.fill_(float("nan"))
                try:
                    step(*ws[0])
                except Exception as e:  # e.g. out of resources for a large tile
                    print(f"  {tuple(cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    break
                y = step.result()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                us = graph_time_us([lambda w=w, sc=sc: step(w, sc) for w, sc in ws], launches=32, replays=10)
                measured = (x.abs().float() <= step.t[0]).float().mean().item()
                rec = {"shape": name, "K": K, "sizes": list(sizes), "glu": glu, "config": list(cfg), "sparsity": s,
                       "us": us, "roofline_us": (1 - measured) * nbytes / bw * 1e6, "matmul_us": mm, "err": err,
                       "ok": bool(err < 1.2e-2) and not bool(y.isnan().any()) and not bool(step.counters.any())}
                records.append(rec)
                row[s] = rec
            if len(row) == len(levels):
                by_cfg[cfg] = row
        score = lambda r: sum(v["us"] / max(v["roofline_us"], 1e-3) for v in r.values())  # noqa: E731
        ranked = sorted(by_cfg.items(), key=lambda kv: score(kv[1]))
        print(f"{name} K={K} N={N} glu={glu}: matmul {mm:.1f} us, roofline s0 {nbytes / bw * 1e6:.1f} us "
              f"({time.time() - t0:.0f} s, {len(by_cfg)} configs)", flush=True)
        shown = ranked[: a.top] + ([] if any(c == default for c, _ in ranked[: a.top]) else
                                   [(default, by_cfg.get(default, {}))])
        best_masked = next(((c, r) for c, r in ranked if c.masked), None)
        if best_masked is not None and all(c != best_masked[0] for c, _ in shown):
            shown.append(best_masked)
        for cfg, row in shown:
            tag = ("default " if cfg == default else "") + ("masked " if cfg.masked else "")
            print(f"   {tag}{tuple(cfg)} "
                  + " ".join(f"s{s}:{r['us']:.1f}/{r['roofline_us']:.1f}{'' if r['ok'] else ' BAD'}"
                             for s, r in row.items()), flush=True)
        bad = [r for r in records if r["shape"] == name and not r["ok"]]
        if bad:
            print(f"   {len(bad)} INCORRECT results, e.g. {bad[0]['config']} s={bad[0]['sparsity']} err {bad[0]['err']:.2e}")
        del ws
        a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "bw": bw, "quant": a.quant or "none",
                                     "records": records}, indent=0))


if __name__ == "__main__":
    run_cli(main)
