"""The Gluon int4 stream (kernels/gluon_gemv.py) against the Triton one (kernels/sparse_gemv.py) on one GPU: each
projection shape of the given models, RTN int4 weights (group 128), batch 1, split-K partial sums out (as the
decode step hands q/k/v and gate/up on), timed as bench.py times kernels (CUDA-graph replay over weight copies
that L2 cannot hold). Gluon launch configs are swept; every result is checked against the plain-PyTorch reference
first. Needs an sm_90 GPU.

    python scripts/bench_gluon.py [--models llama-2-7b] [--sparsities 0,0.5] [--out gluon.json]
"""
import argparse
import json
from pathlib import Path

import torch

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from kernels import configs, gluon_gemv, reference, sparse_gemv
from kernels.formats import INT4
from model import ModelArgs
from scripts.gpu_check import projection_input
from scripts.bench import graph_time_us, projection_shapes, read_bandwidth, sparse_threshold, weight_copies

# (block_n, rows per thread, words per thread and row, warps, programs per SM): steps of 64 or 128 rows
SWEEP = [(256, 8, 2, 4, p) for p in (2, 3, 4)] + [(256, 4, 4, 4, p) for p in (2, 3, 4)] + \
        [(128, 4, 2, 4, p) for p in (2, 4)] + [(256, 4, 2, 8, p) for p in (1, 2)] + [(512, 8, 4, 4, 2)]


def split_for(K: int, N: int, block_n: int, per_sm: int, n_sm: int, group: int) -> int:
    return max(1, min(round(per_sm * n_sm / (N // block_n)), K // group))


def step_rows(block_n: int, rpt: int, vec: int, warps: int) -> int:
    return rpt * 32 // (block_n // 8 // vec) * warps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", default="llama-2-7b", help="comma-separated configs whose shapes to run")
    p.add_argument("--sparsities", default="0,0.5", help="comma-separated sparsity levels")
    p.add_argument("--out", type=Path, default=Path("gluon.json"), help="JSON file of every timing")
    a = p.parse_args()
    levels = sparsity_list(a.sparsities, "--sparsities")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise UserError("bench_gluon.py needs an sm_90 (Hopper) GPU")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    records = []
    for m in a.models.split(","):
        args = ModelArgs.from_name(m)
        for proj, (K, sizes, glu) in projection_shapes(args).items():
            N = sum(sizes)
            group = INT4.group(K)
            nbytes = K * N // 2 + 2 * (K // group) * N * 2
            ws = [INT4.quantize_weight((torch.randn(K, N, device="cuda") / K ** 0.5).to(torch.bfloat16))
                  for _ in range(weight_copies(nbytes, l2))]
            w_ref = INT4.dequantize(*ws[0])
            # the step's input: the residual stream, RMS-normalised in the launch from the producer's sums of squares
            # (q/k/v and gate/up of every layer after the first; down's input comes from gate/up instead)
            x, g, ss, xin = projection_input(1, K, torch.bfloat16, norm=proj != "down")
            x = x[0]
            tcfg = configs.default_config(1, K, sizes, glu, n_sm, INT4, group=group)
            for s in levels:
                thr = sparse_threshold(xin[0], s)
                t = torch.full((K,), thr, device="cuda")
                kept = (xin.abs().float() > thr).float().mean().item()
                ref = (reference.sparsify(xin[0].float(), t) @ w_ref)  # [N]
                roof = kept * nbytes / bw * 1e6
                row = {"model": m, "proj": proj, "K": K, "N": N, "sparsity": s, "roofline_us": roof}
                # Triton: the step's own launch (gate/up with its GLU); Gluon: the same segments
                t2 = t.expand(len(sizes), K).contiguous()
                tri = lambda w, sc: sparse_gemv.sparse_gemv_parts(x[None], w, t2, sizes, tcfg, glu, g, ss,  # noqa
                                                                  fmt=INT4, scale=sc)
                y = tri(*ws[0])
                if not glu:
                    err = ((y.sum(0)[0, 0] - ref).norm() / ref.norm()).item()
                    assert err < 1e-2, f"triton {proj} s={s}: error {err}"
                row["triton_us"] = graph_time_us([lambda w=w, sc=sc: tri(w, sc) for w, sc in ws], 32, 10)
                best = None
                default = gluon_gemv.default_config(K, sizes, group, n_sm)
                for bn, rpt, vec, nw, per_sm in SWEEP + [(0, 0, 0, 0, None)]:
                    cfg = default if per_sm is None else gluon_gemv.Config(
                        bn, rpt, vec, nw, split_for(K, N, bn, per_sm, n_sm, group))
                    if any(n % cfg.block_n for n in sizes) or group % step_rows(*cfg[:4]) \
                            or 32 % (cfg.block_n // 8 // cfg.vec):
                        continue
                    try:
                        y = gluon_gemv.launch(x[None], ws[0][0], t2, sizes, cfg, ws[0][1], g, ss)
                    except Exception as e:  # noqa: BLE001  (a config out of resources)
                        print(f"  gluon {tuple(cfg)}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    err = ((y.sum(0) - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        raise AssertionError(f"gluon {proj} s={s} config {tuple(cfg)}: error {err}")
                    launches = [lambda w=w, sc=sc, cfg=cfg: gluon_gemv.launch(x[None], w, t2, sizes, cfg, sc, g, ss)
                                for w, sc in ws]
                    us = graph_time_us(launches, 32, 10)
                    records.append({**row, "config": list(cfg), "gluon_us": us, "err": err, "default": per_sm is None})
                    if per_sm is None:
                        row["gluon_default_us"] = us
                    if best is None or us < best[0]:
                        best = (us, tuple(cfg))
                row["gluon_us"], row["gluon_config"] = best
                records.append(row)
                print(f"{m} {proj} K={K} N={N} s={s} (kept {kept:.3f}): roofline {roof:.1f} us | triton "
                      f"{row['triton_us']:.1f} us | gluon default {row.get('gluon_default_us', float('nan')):.1f} us, "
                      f"best {best[0]:.1f} us {best[1]}", flush=True)
            del ws, w_ref
    a.out.write_text(json.dumps(records, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
