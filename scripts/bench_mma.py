"""The tensor-core int4 stream (kernels/gluon_mma.py) against the CUDA-core Gluon one (kernels/gluon_gemv.py) on one
GPU: the projections of the given models (q/k/v, gate/up: partials out, the norm fused; o, down: the residual added,
down from gate/up's partials), RTN int4 weights (group 128),
batch 1, timed as bench.py times kernels (CUDA-graph replay over weight copies that L2 cannot hold). Every result is
checked against the plain-PyTorch reference first (bf16, and fp16 for the first shape); a few K splits are swept.
Needs an sm_90 GPU.

    python scripts/bench_mma.py [--models llama-2-7b] [--sparsities 0,0.5] [--out mma.json]
"""
import argparse
import json
from pathlib import Path

import torch

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from kernels import gluon_gemv, gluon_mma, reference
from kernels.formats import INT4
from model import ModelArgs
from scripts.bench import graph_time_us, projection_roles, projection_shapes, read_bandwidth, weight_copies
from scripts.gpu_check import projection_input, spread_thresholds


def check(x, g, ss, t, sizes, w, sc, cfg) -> float:
    """Relative error of the MMA launch's partial sums against the reference (canonical weights w)."""
    ref = gluon_gemv.int4_parts_ref(x, w, t, sizes, sc, g)
    y = gluon_mma.launch(x, gluon_mma.to_mma_layout(w, cfg.wb), t, sizes, cfg, sc, g, ss).sum(0, keepdim=True)
    return ((y - ref).norm() / ref.norm()).item()


def residual_rows(m, proj, K, N, levels, n_sm, l2, bw) -> list:
    """o (input x) and down (input gate/up's partials, 5 K ranges): the residual launch of both kernels."""
    group = INT4.group(K)
    nbytes = K * N // 2 + 2 * (K // group) * N * 2
    gcfg, mcfg = gluon_gemv.default_config(K, (N,), group, n_sm), gluon_mma.default_config(K, (N,), group, n_sm)
    ws = [INT4.quantize_weight((torch.randn(K, N, device="cuda") / K ** 0.5).to(torch.bfloat16))
          for _ in range(weight_copies(nbytes, l2))]
    wm = [(gluon_mma.to_mma_layout(w, mcfg.wb), sc) for w, sc in ws]
    parts = torch.randn(5, 2, 1, K, device="cuda") * 2
    glu_in = projection_roles(proj).glu_in
    x = parts if glu_in else torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    xin = reference.parts_ref(parts, True, torch.bfloat16) if glu_in else x
    res = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
    cnt = torch.zeros(1024, dtype=torch.int32, device="cuda")
    rows = []
    for s in levels:
        t = spread_thresholds(xin, 1, s) if s else torch.zeros(1, K, device="cuda")
        ref = reference.sparse_gemv_ref(xin.double(), INT4.dequantize(*ws[0]).double(), t.double(), (N,),
                                        residual=res.double())
        y, _ = gluon_mma.int4_residual(x, wm[0][0], t, (N,), mcfg, wm[0][1], cnt, res)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2 and not cnt.any(), f"mma {proj} s={s}: error {err}"
        kept = (xin.abs().float() > t[0]).float().mean().item()
        row = {"model": m, "proj": proj, "K": K, "N": N, "sparsity": s, "kept": kept,
               "roofline_us": kept * nbytes / bw * 1e6, "err": err, "mma_config": list(mcfg)}
        row["gluon_us"] = graph_time_us([lambda w=w, sc=sc: gluon_gemv.int4_residual(x, w, t, (N,), gcfg, sc, cnt, res)
                                         for w, sc in ws], 32, 10)
        row["mma_default_us"] = graph_time_us([lambda w=w, sc=sc: gluon_mma.int4_residual(x, w, t, (N,), mcfg, sc,
                                                                                           cnt, res)
                                               for w, sc in wm], 32, 10)
        rows.append(row)
        print(f"{m} {proj} K={K} N={N} s={s} (kept {kept:.3f}): roofline {row['roofline_us']:.1f} us | gluon "
              f"{row['gluon_us']:.1f} us | mma {tuple(mcfg)} {row['mma_default_us']:.1f} us (error {err:.1e})",
              flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", default="llama-2-7b", help="comma-separated configs whose shapes to run")
    p.add_argument("--sparsities", default="0,0.5", help="comma-separated sparsity levels")
    p.add_argument("--out", type=Path, default=Path("mma.json"), help="JSON file of every timing")
    a = p.parse_args()
    levels = sparsity_list(a.sparsities, "--sparsities")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise UserError("bench_mma.py needs an sm_90 (Hopper) GPU")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    records, first = [], True
    for m in a.models.split(","):
        args = ModelArgs.from_name(m)
        for proj, (K, sizes, glu) in projection_shapes(args).items():
            N = sum(sizes)
            if projection_roles(proj).residual:
                records += residual_rows(m, proj, K, N, levels, n_sm, l2, bw)
                continue
            group = INT4.group(K)
            nbytes = K * N // 2 + 2 * (K // group) * N * 2
            default = gluon_mma.default_config(K, sizes, group, n_sm)
            if default is None:
                print(f"{m} {proj}: not taken by the mma kernel")
                continue
            ws = [INT4.quantize_weight((torch.randn(K, N, device="cuda") / K ** 0.5).to(torch.bfloat16))
                  for _ in range(weight_copies(nbytes, l2))]
            for dt in ((torch.bfloat16, torch.float16) if first else (torch.bfloat16,)):
                x, g, ss, xin = projection_input(1, K, dt, norm=True)
                for s in (0.0, 0.5, 0.9):
                    t = spread_thresholds(xin, len(sizes), s) if s else torch.zeros(len(sizes), K, device="cuda")
                    for cfg in {default, default._replace(wb=1)}:
                        err = check(x, g, ss, t, sizes, *ws[0], cfg)
                        print(f"  check {m} {proj} {dt} s={s} {tuple(cfg)}: error {err:.2e}", flush=True)
                        if not err < 1e-2:
                            raise AssertionError(f"mma {proj} {dt} s={s} {tuple(cfg)}: error {err}")
            first = False
            x, g, ss, xin = projection_input(1, K, torch.bfloat16, norm=True)
            gcfg = gluon_gemv.default_config(K, sizes, group, n_sm)
            for s in levels:
                t = spread_thresholds(xin, len(sizes), s) if s else torch.zeros(len(sizes), K, device="cuda")
                kept = sum((xin.abs().float() > t[j]).float().mean().item() * n for j, n in enumerate(sizes)) / N
                roof = kept * nbytes / bw * 1e6
                row = {"model": m, "proj": proj, "K": K, "N": N, "sparsity": s, "kept": kept, "roofline_us": roof}
                row["gluon_us"] = graph_time_us([lambda w=w, sc=sc: gluon_gemv.launch(x, w, t, sizes, gcfg, sc, g, ss)
                                                 for w, sc in ws], 32, 10)
                cands = {default, default._replace(wb=1)}
                for c in list(cands):
                    for per_sm in (2, 4, 6):
                        tiles = N // gluon_mma.tile_n(c.wb)
                        cands.add(c._replace(split=max(-(-(K // group) // 8), min(round(per_sm * n_sm / tiles),
                                                                                   K // group))))
                times = {}
                for c in sorted(cands):
                    wm = [(gluon_mma.to_mma_layout(w, c.wb), sc) for w, sc in ws]
                    times[c] = graph_time_us([lambda w=w, sc=sc, c=c: gluon_mma.launch(x, w, t, sizes, c, sc, g, ss)
                                              for w, sc in wm], 32, 10)
                    del wm
                best = min(times, key=times.get)
                row.update(mma_default_us=times[default], mma_best_us=times[best], mma_best=list(best),
                           mma_all={str(tuple(c)): v for c, v in times.items()})
                records.append(row)
                print(f"{m} {proj} K={K} N={N} s={s} (kept {kept:.3f}): roofline {roof:.1f} us | gluon "
                      f"{row['gluon_us']:.1f} us | mma default {tuple(default)} {times[default]:.1f} us, best "
                      f"{tuple(best)} {times[best]:.1f} us | " + " ".join(f"{tuple(c)}:{v:.1f}" for c, v in
                                                                           sorted(times.items())), flush=True)
            del ws
    a.out.write_text(json.dumps(records, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
