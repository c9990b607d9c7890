"""In-kernel timeline of one decode layer: every program of every launch stamps the GPU clocks at its phase
boundaries (the kernels' PROFILE builds: sparse_gemv.launch, decode_attention.launch, and with --nvrtc
cuda_gemv.launch and cuda_attention.launch, given a `prof` buffer).
Needs a CUDA GPU.

    python scripts/profile_phases.py [--model llama-2-7b] [--sparsities 0.5,0.999] [--context 384] [--nvrtc
        [--quant int8|int4] [--no-nvrtc-attention | --attention-pdl 3|4]] [--out DIR]

One layer's five launches (q/k/v partials with the norm fused, attention, o with the residual, gate/up partials,
down) run in a CUDA graph over 4 layer copies, as the decode step makes them with the MLP unfused
(a plan with fuse_mlp=False; the fused MLP launch has no stamps). Per launch it prints the gap after the
previous launch, the median time of each phase over the launch's programs, the skew (last program's end minus the
median program's end) and the span. GEMV phases: input loads in, list positions known (scan), list stored, first
entries reloaded, weights streamed, partials reduced in registers, split-K counter, tail. Attention: q/k/v in, cache
read, counter (the splits met: the counter, or the cluster's barrier), combine. `--nvrtc` (sm_90, libnvrtc): the
step sm_90 runs instead, its projections on kernels/cuda_gemv.py (q/k/v reduced in their launch, down gating
gate/up's outputs); its phases: prologue (inputs, norm, thresholds, scan: the kept list ready), stream, tail (row
groups and K ranges summed, result written), and the share of the spread of its CTAs' stream times that their SM,
or their column tile (the addresses they read), explains.
`--quant int8`: those projections with int8 weights (per-column scales), as `bench.py --quant int8` runs them on
that path; `--quant int4`: with int4 weights (RTN, scale groups of 128) on the kernel's tensor-core mode, as
`bench.py --quant int4 --nvrtc-int4` runs them (not the default int4 route). The
attention there is kernels/cuda_attention.py where the step takes it (cuda_attention.supported), unless
`--no-nvrtc-attention`; `--attention-pdl 3|4` launches it under PDL, q/k/v triggering it (the step's launch where
cuda_attention.pdl_pays; the default here is the plain launch).

Each stamp (%globaltimer and %clock64 through inline assembly) waits on the value it marks, so work cannot move
across it; that costs ~0.2 us per stamp, which the phases include (the layer time with and without stamps is
printed). The stamped launches must give bit-identical outputs; the script checks that first.
"""
import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

import torch

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from kernels import configs, cuda_attention, cuda_gemv, decode_attention, reference, sparse_gemv
from kernels.common import PROFILE_SLOTS
from kernels.formats import INT8, quant_format
from kernels.reference import rms_norm_ref
from model import ModelArgs
from scripts.bench import capture_graph, graph_time_us, replay_time_us, sparse_threshold

SLOTS = PROFILE_SLOTS  # per program: (globaltimer, clock64) pairs at even slots, counts at 12-14


def explained(values: torch.Tensor, groups: torch.Tensor) -> float:
    """The share of values' variance that their groups' means explain (0: none, 1: all)."""
    v = values.double()
    total = ((v - v.mean()) ** 2).sum()
    if total == 0:
        return 0.0
    ids, inverse = torch.unique(groups, return_inverse=True)
    means = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, v) / torch.bincount(inverse).double()
    return (((means[inverse] - v.mean()) ** 2).sum() / total).item()


def summarise(buf, ghz: float, t0: int, prev_end: float, attention: bool, tiles: Optional[int] = None) -> dict:
    """Phase medians (us) of one launch's programs from their stamps [programs, SLOTS] (int64, zeros unused);
    tiles: an NVRTC GEMV launch of that many column tiles (its CTAs in order, tile fastest)."""
    rows = buf[buf[:, 0] > 0]

    def med(i, j):
        v = [(r[j + 1] - r[i + 1]) / ghz / 1e3 for r in rows.tolist() if r[i] and r[j]]
        return round(statistics.median(v), 2) if v else None
    ends = [(max(r[0:12:2]) - t0) / 1e3 for r in rows.tolist()]
    start = (int(rows[:, 0].min()) - t0) / 1e3
    out = {"programs": len(rows), "gap": round(start - prev_end, 2) if prev_end is not None else None}
    if attention:
        out.update(qkv_in=med(0, 2), cache=med(2, 4), counter=med(4, 6), combine=med(6, 8))
    elif tiles is not None:
        stream = rows[:, 6] - rows[:, 2]
        out.update(prologue=med(0, 2), stream=med(2, 6), tail=med(6, 10), kept=int(statistics.median(rows[:, 12].tolist())),
                   spread_by_sm=round(explained(stream, rows[:, 13]), 2),
                   spread_by_tile=round(explained(stream, torch.arange(len(rows)) % tiles), 2))
    else:
        first_rows, loop = med(4, 20), med(20, 22)
        out.update(loads=med(0, 16), scan=med(16, 18), list_store=med(18, 2), list_reload=med(2, 4),
                   stream=round(first_rows + loop, 2) if first_rows is not None else med(2, 6),  # dense: in order
                   reduce=med(22, 6),
                   counter=med(6, 8), tail=med(8, 10), kept=int(statistics.median(rows[:, 12].tolist())))
    out.update(skew=round(max(ends) - statistics.median(ends), 2), span=round(max(ends) - start, 2), end=max(ends))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="config whose layer shapes are timed")
    p.add_argument("--sparsities", default="0.5,0.999", help="comma-separated sparsity levels in [0, 1]")
    p.add_argument("--context", type=int, default=384, help="cache positions the attention reads")
    p.add_argument("--nvrtc", action="store_true", help="the projections on kernels/cuda_gemv.py (sm_90's path)")
    p.add_argument("--quant", choices=("int8", "int4"), default=None,
                   help="with --nvrtc: int8 weights (per-column scales) or int4 (RTN, groups of 128)")
    p.add_argument("--nvrtc-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="with --nvrtc: attention on kernels/cuda_attention.py (default: where the step takes it)")
    p.add_argument("--attention-pdl", type=int, default=0, choices=(0, 3, 4),
                   help="with the NVRTC attention: launched under PDL, q/k/v triggering it at its start (3) or after "
                   "its rows (4), as the step does where cuda_attention.pdl_pays (default 0: plainly)")
    p.add_argument("--out", type=Path, default=None, help="directory for phases.json (default: none written)")
    a = p.parse_args()
    args = ModelArgs.from_name(a.model)
    sparsities = sparsity_list(a.sparsities, "--sparsities", up_to_one=True)  # 1: the phases with nothing to stream
    if a.quant and not a.nvrtc:
        raise UserError("--quant profiles the NVRTC projections: add --nvrtc")
    if a.nvrtc_attention and not a.nvrtc:
        raise UserError("--nvrtc-attention follows the NVRTC projections: add --nvrtc")
    if a.attention_pdl and (not a.nvrtc or a.nvrtc_attention is False):
        raise UserError("--attention-pdl applies to the NVRTC attention (--nvrtc, a model whose heads it takes)")
    if not torch.cuda.is_available():
        raise UserError("profile_phases.py needs a CUDA GPU")
    if a.nvrtc and not (torch.cuda.get_device_capability()[0] >= 9 and cuda_gemv.usable(0)):
        raise UserError("--nvrtc needs an sm_90 GPU and libnvrtc (it comes with torch's CUDA wheels)")

    dev, dt, L = "cuda", torch.bfloat16, 4
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    H, Hkv, D, dim, inter = args.n_head, args.n_kv_head, args.head_dim, args.dim, args.intermediate_size
    szq = (H * D, Hkv * D, Hkv * D)
    rnd = lambda k, n: (torch.randn(k, n, device=dev) / k ** 0.5).to(dt)  # noqa: E731
    Wq, Wo = [rnd(dim, sum(szq)) for _ in range(L)], [rnd(H * D, dim) for _ in range(L)]
    Wg, Wd = [rnd(dim, 2 * inter) for _ in range(L)], [rnd(inter, dim) for _ in range(L)]
    g1, g2 = torch.ones(dim, device=dev, dtype=dt), torch.ones(dim, device=dev, dtype=dt)
    T = a.context
    cuda_att = a.nvrtc and (cuda_attention.supported(H, Hkv, D) if a.nvrtc_attention is None else a.nvrtc_attention)
    if cuda_att and not cuda_attention.supported(H, Hkv, D):
        raise UserError(f"kernels/cuda_attention.py does not take {a.model}'s heads")
    if a.attention_pdl and not cuda_att:  # (heads it does not take)
        raise UserError("--attention-pdl applies to the NVRTC attention (--nvrtc, a model whose heads it takes)")
    caches = [tuple(torch.randn(1, Hkv, T, D, device=dev, dtype=dt) for _ in range(2)) for _ in range(L)]
    rope = torch.randn(1, D // 2, 2, device=dev)
    pos = torch.tensor([T - 2], device=dev)
    att_cnt = torch.zeros(Hkv, dtype=torch.int32, device=dev)
    cnt = torch.zeros(4096, dtype=torch.int32, device=dev)
    h0 = torch.randn(1, dim, device=dev, dtype=dt)
    cfg = dict(q=configs.default_config(1, dim, szq, False, n_sm),
               o=configs.default_config(1, H * D, (dim,), False, n_sm),
               g=configs.default_config(1, dim, (inter, inter), True, n_sm),
               d=configs.default_config(1, inter, (dim,), False, n_sm))
    tq, to = torch.zeros(3, dim, device=dev), torch.zeros(1, H * D, device=dev)
    tg, td = torch.zeros(2, dim, device=dev), torch.zeros(1, inter, device=dev)
    ss0 = reference.sum_squares_ref(h0, cfg["o"].block_n)
    shapes = dict(q=(dim, szq), o=(H * D, (dim,)), g=(dim, (inter, inter)), d=(inter, (dim,)))
    fmt = quant_format(a.quant)
    int8 = fmt.code == INT8.code
    ncfg = {p: cuda_gemv.default_config(K, sz, n_sm, 9, int8, fmt.group(K)) for p, (K, sz) in shapes.items()}
    ntiles = {p: sum(sz) // cuda_gemv.tile_cols(sz, int8, fmt.group(K)) for p, (K, sz) in shapes.items()}
    if a.attention_pdl and not (ncfg["q"].cluster or ncfg["q"].split == 1):
        raise UserError("--attention-pdl: q/k/v's launch leaves global partials here (Attention.attention_trigger)")
    # (launch, layer copy) -> (quantized weights, scales)
    qw = {(p, i): fmt.quantize_weight(W[i]) for p, W in zip("qogd", (Wq, Wo, Wg, Wd)) for i in range(L)
          if fmt.quantized}
    n_prog = max([1024] + [sum(sz) // cuda_gemv.COLS * ncfg[p].split for p, (K, sz) in shapes.items()])
    bufs = {(i, p): torch.zeros(n_prog, SLOTS, dtype=torch.int64, device=dev) for i in range(L) for p in "qaogd"}
    sparse_step = [True]  # the level being profiled is above 0 (the NVRTC launches are dense at 0, as the step's)

    def layer_triton(i, stamped):
        """One layer's five launches as the decode step makes them, each stamping into its buffer if `stamped`."""
        prof = (lambda p: bufs[(i, p)]) if stamped else (lambda p: None)  # noqa: E731
        pq, pg = configs.k_layout(dim, cfg["q"])[1], configs.k_layout(dim, cfg["g"])[1]
        qp = torch.empty(pq, 1, 1, sum(szq), device=dev)
        sparse_gemv.launch(h0, Wq[i], tq, None, szq, False, cfg["q"], None, qp, norm_weight=g1, ss_in=ss0,
                           partial_out=True, prof=prof("q"))
        y = torch.empty(1, H * D, device=dev, dtype=dt)
        decode_attention.launch(qp[:, 0], rope, caches[i][0], caches[i][1], pos, att_cnt, H, None, y, prof=prof("a"))
        h1 = torch.empty(1, dim, device=dev, dtype=dt)
        ss1 = torch.empty(1, configs.counters_size((dim,), False, cfg["o"].block_n), device=dev)
        sparse_gemv.launch(y, Wo[i], to, cnt, (dim,), False, cfg["o"], h0, h1, ss_out=ss1, prof=prof("o"))
        gp = torch.empty(pg, 2, 1, inter, device=dev)
        sparse_gemv.launch(h1, Wg[i], tg, None, (inter, inter), True, cfg["g"], None, gp, norm_weight=g2, ss_in=ss1,
                           partial_out=True, prof=prof("g"))
        h2 = torch.empty(1, dim, device=dev, dtype=dt)
        ss2 = torch.empty(1, configs.counters_size((dim,), False, cfg["d"].block_n), device=dev)
        sparse_gemv.launch(gp, Wd[i], td, cnt, (dim,), False, cfg["d"], h1, h2, ss_out=ss2, prof=prof("d"))
        return qp, y, h1, gp, h2, ss2

    def layer_nvrtc(i, stamped):
        """The same layer as sm_90's step makes it: q/k/v (norm fused, reduced in its launch), attention, o (residual
        added), gate/up (norm fused), down (gating gate/up's outputs, residual added)."""
        prof = (lambda p: bufs[(i, p)]) if stamped else (lambda p: None)  # noqa: E731

        def proj(p, x, w, t, nw=None, res=None, glu=False, trigger=0):
            K, sizes = shapes[p]
            t = t if sparse_step[0] else None
            spec = cuda_gemv.spec_of(K, sizes, dt, t is not None, nw is not None, glu, res is not None, 1e-5,
                                     ncfg[p]._replace(pdl=trigger), t is not None, int8, profile=stamped,
                                     group=fmt.group(K))
            w, scale = qw.get((p, i), (w, None))
            y = torch.empty(sum(sizes), device=dev, dtype=dt)
            cuda_gemv.launch(spec, x.reshape(-1), w, t, nw, None if res is None else res.reshape(-1), cnt, y,
                             torch.empty(ncfg[p].split, sum(sizes), device=dev), scale, prof=prof(p))
            return y

        qkv = proj("q", h0, Wq[i], tq, nw=g1, trigger=a.attention_pdl)
        y = torch.empty(1, H * D, device=dev, dtype=dt)
        if cuda_att:
            cuda_attention.launch(qkv, rope.view(D // 2, 2), caches[i][0], caches[i][1], pos, att_cnt, H, None,
                                  y.view(-1), prof=prof("a"), pdl=a.attention_pdl > 0)
        else:
            decode_attention.launch(qkv.view(1, -1), rope, caches[i][0], caches[i][1], pos, att_cnt, H, None, y,
                                    prof=prof("a"))
        h1 = proj("o", y, Wo[i], to, res=h0).view(1, dim)
        gu = proj("g", h1, Wg[i], tg, nw=g2)
        h2 = proj("d", gu, Wd[i], td, res=h1, glu=True).view(1, dim)
        return qkv, y, h1, gu, h2

    layer = layer_nvrtc if a.nvrtc else layer_triton
    records = []
    for s in sparsities:
        sparse_step[0] = s > 0
        for t in (tq, to, tg, td):  # thresholds from each stage's input, one stage at a time
            t.zero_()
        tq.fill_(sparse_threshold(rms_norm_ref(h0, g1, 1e-5), s))
        to.fill_(sparse_threshold(layer(0, False)[1], s))
        tg.fill_(sparse_threshold(rms_norm_ref(layer(0, False)[2], g2, 1e-5), s))
        gates = layer(0, False)[3]  # gate/up's partials [P, 2, 1, I] (Triton), or their outputs [2 I] (NVRTC)
        td.fill_(sparse_threshold(reference.parts_ref(gates.float().view(1, 2, 1, inter) if a.nvrtc else gates,
                                                      True, dt), s))
        if not all(torch.equal(x, y) for x, y in zip(layer(0, False), layer(0, True))):
            raise UserError("the stamped launches do not reproduce the kernels' outputs")
        plain = graph_time_us([lambda: [layer(i, False) for i in range(L)]], launches=10) / L
        graph = capture_graph([lambda: [layer(i, True) for i in range(L)]], 1)
        stamped = replay_time_us(graph, L, replays=30)
        for b in bufs.values():
            b.zero_()
        graph.replay()
        torch.cuda.synchronize()
        st = {k: b.cpu() for k, b in bufs.items()}
        spans = [((r[7] - r[1]) / (r[6] - r[0])) for b in st.values() for r in b.tolist() if r[6] - r[0] > 5000]
        ghz = statistics.median(spans) if spans else 1.98
        t0 = int(st[(1, "q")][:, 0][st[(1, "q")][:, 0] > 0].min())  # layer copy 1: copy 0 follows the capture's start
        path = (f" (NVRTC projections{f', {a.quant} weights' if a.quant else ''}"
                f"{', NVRTC attention' if cuda_att else ''}"
                f"{f' (PDL {a.attention_pdl})' if a.attention_pdl else ''})") if a.nvrtc else ""
        print(f"\n{a.model}{path}, sparsity {s}, {T} positions: one layer {plain:.1f} us ({stamped:.1f} with stamps), "
              f"SM clock {ghz:.2f} GHz; us, medians over each launch's programs")
        prev = None
        for p, name in zip("qaogd", ("q/k/v", "attention", "o", "gate/up", "down")):
            r = summarise(st[(1, p)], ghz, t0, prev, p == "a", ntiles.get(p) if a.nvrtc else None)
            prev = r.pop("end")
            records.append({"model": a.model, "quant": a.quant, "nvrtc_attention": cuda_att,
                            "attention_pdl": a.attention_pdl, "sparsity": s,
                            "context": T, "launch": name,
                            "layer_us": round(plain, 2), "layer_us_stamped": round(stamped, 2), **r})
            print(f"  {name:9s} " + "  ".join(f"{k} {v}" for k, v in r.items() if v is not None))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "phases.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
