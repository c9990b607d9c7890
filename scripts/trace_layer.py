"""Where a layer's projection launches spend their time, from inside the kernels: one layer's four NVRTC launches
(q/k/v with the norm, o with the residual, gate/up with the norm, down gating them; no attention) replayed once in a
CUDA graph after L2 is flushed, each CTA recording the GPU's global timer when it starts, when its kept-row list is
ready (the end of its prologue: inputs, norm, thresholds, scan) and when it has written its result. Random weights
of the model's shapes, thresholds at one uniform level. Needs an sm_90 GPU and libnvrtc (kernels/cuda_gemv.py).

    python scripts/trace_layer.py [--model llama-2-7b] [--sparsity 0.5] [--dtype bfloat16]

Per launch: its CTAs, how far apart they start, the median prologue and stream, how far apart they end, the gap
from the previous launch's last CTA, and what share of the spread of its CTAs' stream times their SM explains and
what share their column tile (the address range they read) explains; then the layer's span against its weight bytes
at the read bandwidth.
"""
import argparse
import statistics

import torch

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from kernels import cuda_gemv, reference
from model import CONFIGS, ModelArgs
from scripts.bench import read_bandwidth, sparse_threshold

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def timeline(records: torch.Tensor) -> dict:
    """records int64 [CTAs, 4] (start, list ready, end in ns, SM) of one launch -> its summary in µs: first start,
    start spread, median prologue and stream, first and last end."""
    r = records.double() / 1e3
    start, ready, end = r[:, 0], r[:, 1], r[:, 2]
    return {"ctas": len(r), "first_start": start.min().item(), "start_spread": (start.max() - start.min()).item(),
            "prologue": statistics.median((ready - start).tolist()), "stream": statistics.median((end - ready).tolist()),
            "first_end": end.min().item(), "last_end": end.max().item(), "sms": len(set(records[:, 3].tolist()))}


def explained(values: torch.Tensor, groups: torch.Tensor) -> float:
    """The share of values' variance that their groups' means explain (0: none, 1: all)."""
    v = values.double()
    total = ((v - v.mean()) ** 2).sum()
    if total == 0:
        return 0.0
    ids, inverse = torch.unique(groups, return_inverse=True)
    means = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, v) / torch.bincount(inverse).double()
    return (((means[inverse] - v.mean()) ** 2).sum() / total).item()


def layer_report(names: list, records: list, tiles: list) -> list:
    """One line per launch (times from the first launch's first start), gaps between launches included, and how much
    of its CTAs' spread of stream times follows their SM or their column tile (records are in CTA order: tile
    fastest, `tiles` per K range)."""
    t0 = min(int(r[:, 0].min()) for r in records)
    lines, prev_end = [], None
    for name, rec, n_tiles in zip(names, records, tiles):
        s = timeline(rec - torch.tensor([t0, t0, t0, 0]))
        gap = "" if prev_end is None else f"{s['first_start'] - prev_end:5.2f}"
        stream = rec[:, 2] - rec[:, 1]
        by_sm, by_tile = explained(stream, rec[:, 3]), explained(stream, torch.arange(len(rec)) % n_tiles)
        lines.append(f"| {name} | {s['ctas']} | {gap} | {s['start_spread']:.2f} | {s['prologue']:.2f} | "
                     f"{s['stream']:.2f} | {s['last_end'] - s['first_end']:.2f} | {s['last_end']:.2f} | "
                     f"{by_sm:.2f} | {by_tile:.2f} |")
        prev_end = s["last_end"]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help=f"one of {', '.join(CONFIGS)}")
    p.add_argument("--sparsity", default="0.5", help="uniform sparsity level of every projection (0: dense)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    a = p.parse_args()
    if a.model not in CONFIGS:
        raise UserError(f"unknown model {a.model!r}; choose one of {', '.join(CONFIGS)}")
    levels = sparsity_list(a.sparsity, "--sparsity")
    if len(levels) != 1:
        raise UserError(f"--sparsity takes one level, got {a.sparsity!r}")
    s = levels[0]
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9 or not cuda_gemv.usable(0):
        raise UserError("trace_layer.py needs an sm_90 GPU and libnvrtc (it comes with torch's CUDA wheels)")
    args, dt = ModelArgs.from_name(a.model), DTYPES[a.dtype]
    D, I, hd = args.dim, args.intermediate_size, args.head_dim
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    h = torch.randn(D, device="cuda", dtype=dt) * 3
    g = (torch.rand(D, device="cuda") + 0.5).to(dt)
    xn = reference.rms_norm_ref(h, g, 1e-5)
    o_in = torch.randn(args.n_head * hd, device="cuda", dtype=dt)
    launches = []  # name, K, sizes, input, its values as thresholded, norm, residual, gated
    launches.append(("q/k/v", D, (args.n_head * hd, args.n_kv_head * hd, args.n_kv_head * hd), h, xn, True, False,
                     False))
    launches.append(("o", args.n_head * hd, (D,), o_in, o_in, False, True, False))
    launches.append(("gate/up", D, (I, I), h, xn, True, False, False))
    w13 = (torch.randn(D, 2 * I, device="cuda") / D ** 0.5).to(dt)
    gu = cuda_gemv.cuda_gemv_ref(h, w13, None, (I, I), g)
    launches.append(("down", I, (D,), gu, reference.parts_ref(gu.float().view(1, 2, 1, I), True, dt), False, True,
                     True))
    steps, nbytes = [], 0
    for name, K, sizes, x, basis, norm, res, glu in launches:
        w = w13 if name == "gate/up" else (torch.randn(K, sum(sizes), device="cuda") / K ** 0.5).to(dt)
        t = None if s == 0 else torch.full((len(sizes), K), sparse_threshold(basis, s), device="cuda")
        spec = cuda_gemv.spec_of(K, sizes, dt, t is not None, norm, glu, res, 1e-5,
                                 cuda_gemv.default_config(K, sum(sizes), n_sm, 9), t is not None, trace=True)
        kept = 1.0 if t is None else (basis.abs().float() > t[0, 0]).float().mean().item()
        nbytes += w.numel() * w.element_size() * kept
        bufs = (torch.zeros(sum(sizes) // cuda_gemv.COLS, dtype=torch.int32, device="cuda"),
                torch.empty(sum(sizes), dtype=dt, device="cuda"), torch.empty(spec.config.split, sum(sizes),
                                                                              device="cuda"),
                torch.zeros(cuda_gemv.grid(spec), 4, dtype=torch.int64, device="cuda"))
        steps.append((name, spec, x, w, t, g if norm else None, h if res else None, bufs))

    def layer():
        for name, spec, x, w, t, nw, r, (counters, y, part, trace) in steps:
            cuda_gemv.launch(spec, x, w, t, nw, r, counters, y, part, trace=trace)

    layer()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer()
    flush = torch.empty(4 * torch.cuda.get_device_properties(0).L2_cache_size, dtype=torch.uint8, device="cuda")
    flush.zero_()
    graph.replay()
    torch.cuda.synchronize()
    bw = read_bandwidth()
    records = [st[-1][-1].cpu() for st in steps]
    span = (max(int(r[:, 2].max()) for r in records) - min(int(r[:, 0].min()) for r in records)) / 1e3
    print(f"{torch.cuda.get_device_name()}, {a.model} {a.dtype}, sparsity {s}: one layer's four launches (µs)\n")
    print("| launch | CTAs | gap | start spread | prologue (median) | stream (median) | end spread | last end | "
          "stream spread by SM | by tile |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(layer_report([st[0] for st in steps], records, [st[1].N // cuda_gemv.COLS for st in steps])))
    print(f"\nspan {span:.2f} µs; its weight bytes ({nbytes / 1e6:.0f} MB) at {bw / 1e9:.0f} GB/s take "
          f"{nbytes / bw * 1e6:.2f} µs (CTAs record with one barrier more than the untraced launches)")


if __name__ == "__main__":
    run_cli(main)
