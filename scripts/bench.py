"""Decode benchmarks on random weights of real shapes (the protocol below). Needs a CUDA GPU.

    python scripts/bench.py [--models llama-2-7b,llama-3-8b,mistral-7b-v0.1] [--sparsities 0,0.25,0.4,0.5,0.65]
                            [--skip-kernels] [--skip-e2e] [--out docs/bench] [--json]
    torchrun --nproc-per-node N scripts/bench.py --models llama-2-70b --quant int8 --skip-kernels --merge
                                                 # end to end, tensor parallel over N GPUs (tp.py)

1. read bandwidth: a Triton streaming reduction over 4 GiB; every roofline below uses this number;
2. kernels: every projection of each model at sparsity 0 ... 0.9, replayed in a CUDA graph over >= 4 weight
   copies, 4x the L2 together (L2 cannot serve repeats), against torch.matmul and the (1-s) roofline line;
3. end to end: a 128-token random prompt (`--prompt-len`: a longer one, decode at long context), 256 greedy decode
   tokens, compiled with CUDA graphs; thresholds set in-process from the activations of the prompt's first 128
   tokens; median of 3 timed runs after a warm-up; measured sparsity.
   Sparsity 0 decodes the way generate.py does at 0: dense, projections through the NVRTC kernel on sm_90 (where
   libnvrtc is found), cuBLAS elsewhere.
Writes <out>/<gpu>.md, <gpu>.json (end-to-end records), <gpu>-kernels.json and PNG plots.
"""
import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from cli import HelpFormatter, add_quant_arg, run_cli, sparsity_list
from engine import Generator, bytes_per_token, cache_bytes_per_token, set_sparsity
from plan import decode_plan
from errors import UserError
from kernels import configs, cuda_attention, decode_attention, reference, sparse_gemv, sparse_mlp
from loading import random_model
from model import CONFIGS, ModelArgs
from paths import REPO
from kernels.formats import int4_variant, quant_format
from quantization import quantize_model
from sparsity import capture_inputs, measure_sparsity, parameter_weighted, per_projection, set_uniform_thresholds
from tp import TP, close, from_env

E2E_SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65)
KERNEL_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NEW_TOKENS = 256  # decoded per end-to-end run
PROMPT_LEN = 128  # end to end: the default prompt, and the tokens every prompt length takes its thresholds from


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, PER_PROG: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    base = pid.to(tl.int64) * PER_PROG
    for i in range(0, PER_PROG, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def read_bandwidth(gib: float = 4.0) -> float:
    """Bytes per second of a pure streaming read (the roofline's bandwidth)."""
    n = int(gib * 2 ** 30) // 2
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    per_prog, block = 1 << 20, 4096
    grid = triton.cdiv(n, per_prog)
    out = torch.empty(grid, device="cuda")
    fn = lambda: _read_kernel[(grid,)](x, out, n, BLOCK=block, PER_PROG=per_prog, num_warps=8)  # noqa: E731
    ms = triton.testing.do_bench(fn, warmup=50, rep=500, return_mode="median")
    assert torch.allclose(out.sum(), x.float().sum(), rtol=1e-3, atol=1.0)
    del x
    return n * 2 / (ms * 1e-3)


def capture_graph(fns: list, launches: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `launches` calls cycling through fns (each called once on a side stream first), replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    return g


def replay_time_us(g: torch.cuda.CUDAGraph, launches: int, replays: int = 20) -> float:
    """Median time per launch over `replays` replays of a graph holding `launches` calls."""
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / launches)
    return statistics.median(times)


def graph_time_us(fns: list, launches: int = 40, replays: int = 20) -> float:
    """Median time per launch of `launches` calls (cycling through fns) replayed in a CUDA graph."""
    return replay_time_us(capture_graph(fns, launches), launches, replays)


def projection_shapes(args: ModelArgs) -> dict:
    """name -> (K, sizes, glu) of the fused projections one layer launches."""
    sh = args.linear_shapes()
    return {"qkv": (args.dim, (sh["q"][1], sh["k"][1], sh["v"][1]), False), "o": (sh["o"][0], (args.dim,), False),
            "gate_up": (args.dim, (args.intermediate_size,) * 2, True), "down": (args.intermediate_size, (args.dim,), False)}


def projection_list(text: str) -> list:
    """A --projections flag: comma-separated names of projection_shapes' launches (qkv, o, gate_up, down)."""
    names = [q for q in text.split(",") if q]
    if not names or not set(names) <= {"qkv", "o", "gate_up", "down"}:
        raise UserError(f"--projections takes qkv, o, gate_up, down, got {text!r}")
    return names


class Roles(NamedTuple):
    """What a projection's launch fuses beside its GEMV in the decode step."""
    norm: bool  # RMS-normalises its input (q/k/v, gate/up)
    residual: bool  # adds the residual stream to its output (o, down)
    glu_in: bool  # its input is silu(gate) * up of gate/up's outputs (down)
    partials: bool  # the Triton path hands its split-K partials to the next kernel (q/k/v, gate/up)


def projection_roles(proj: str) -> Roles:
    """The roles of a projection named as projection_shapes names it."""
    first = proj in ("qkv", "gate_up")
    return Roles(norm=first, residual=not first, glu_in=proj == "down", partials=first)


def weight_copies(nbytes: int, l2_bytes: int) -> int:
    """Copies of a weight to rotate through so that a launch never finds its weight in L2: at least 4, and together
    4x the L2. Streaming loads marked evict_first would not need the second rule; anything with normal priority
    (a prefetch, say) survives 4 copies of a small weight (docs/perf-notes.md, session 4)."""
    return max(4, -(-4 * l2_bytes // nbytes))


def bench_kernels(name: str, args: ModelArgs, bw: float, n_sm: int) -> list:
    """Each projection as the decode step launches it (`us`: q/k/v and gate/up hand their split-K partials to
    the next kernel, down reads gate/up's partials), and on its own with its own reduction (`standalone_us`)."""
    rows = []
    dtype = torch.bfloat16
    gu_cfg = configs.default_config(1, args.dim, (args.intermediate_size,) * 2, True, n_sm)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for proj, (K, sizes, glu) in projection_shapes(args).items():
        N = sum(sizes)
        nbytes = K * N * 2
        copies = weight_copies(nbytes, l2)
        ws = [(torch.randn(K, N, device="cuda") / K ** 0.5).to(dtype) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]  # row-major, as F.linear / gpt-fast store it
        x = torch.randn(1, K, device="cuda", dtype=dtype)
        xin = x
        roles = projection_roles(proj)
        if roles.glu_in:  # gate/up partials as the decode step hands them over: the input is silu(gate) * up
            xin = torch.zeros(configs.k_layout(args.dim, gu_cfg)[1], 2, 1, K, device="cuda")
            xin[0] = torch.randn(2, 1, K, device="cuda") * 2
            x = reference.parts_ref(xin, True, dtype)
        t = torch.zeros(len(sizes), K, device="cuda")
        cfg = configs.default_config(1, K, sizes, glu, n_sm)
        counters = torch.zeros(configs.counters_size(sizes, glu, cfg[0]), dtype=torch.int32, device="cuda")
        alone = [lambda w=w: sparse_gemv.sparse_gemv(x, w, t, sizes, counters, cfg, glu=glu) for w in ws]
        if roles.partials:
            ours = [lambda w=w: sparse_gemv.sparse_gemv_parts(x, w, t, sizes, cfg, glu=glu) for w in ws]
        else:
            ours = [lambda w=w: sparse_gemv.sparse_gemv(xin, w, t, sizes, counters, cfg, glu=glu) for w in ws]
        mm = graph_time_us([lambda w=w: torch.matmul(x, w) for w in ws])
        lin = graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in wts])
        for s in KERNEL_SPARSITIES:
            t.fill_(sparse_threshold(x, s))
            measured = (x.abs().float() <= t[0]).float().mean().item()
            us = graph_time_us(ours)
            roof = (1 - measured) * nbytes / bw * 1e6
            rows.append({"model": name, "projection": proj, "K": K, "N": N, "sparsity": s, "measured": measured,
                         "us": us, "standalone_us": graph_time_us(alone) if proj != "o" else us,
                         "matmul_us": min(mm, lin), "roofline_us": roof, "config": list(cfg), "weight_copies": copies,
                         "gb_s": (1 - measured) * nbytes / us / 1e3})
        print(f"  {name} {proj:8s} K={K} N={N}: matmul {min(mm, lin):6.1f} us | "
              + " ".join(f"{r['sparsity']:.1f}:{r['us']:.1f}" for r in rows[-len(KERNEL_SPARSITIES):]), flush=True)
        del ws, wts
    return rows + bench_mlp(name, args, bw, n_sm)


def bench_mlp(name: str, args: ModelArgs, bw: float, n_sm: int) -> list:
    """The batch-1 MLP launch (norm fused, gate/up then down, residual added; `us`) against the two launches it
    replaces (gate/up partials, then down from them: `standalone_us`) and cuBLAS (`matmul_us`: gate|up, then down). Both
    stages at sparsity s: gate/up's thresholds from the normalised input, down's from gate/up's output."""
    dtype, D, I = torch.bfloat16, args.dim, args.intermediate_size
    gu_bytes, d_bytes = D * 2 * I * 2, I * D * 2
    copies = weight_copies(gu_bytes + d_bytes, torch.cuda.get_device_properties(0).L2_cache_size)
    wg = [(torch.randn(D, 2 * I, device="cuda") / D ** 0.5).to(dtype) for _ in range(copies)]
    wd = [(torch.randn(I, D, device="cuda") / I ** 0.5).to(dtype) for _ in range(copies)]
    x = torch.randn(1, D, device="cuda", dtype=dtype)
    g = torch.ones(D, device="cuda", dtype=dtype)
    ss_in = reference.sum_squares_ref(x, 128)
    xn = reference.rms_norm_ref(x, g, 1e-5)
    t, td = torch.zeros(2, D, device="cuda"), torch.zeros(1, I, device="cuda")
    gu_cfg = configs.default_config(1, D, (I, I), True, n_sm)
    d_cfg = configs.default_config(1, I, (D,), False, n_sm)
    dcfg = configs.default_down_config(D, I, gu_cfg)
    counters = torch.zeros(configs.mlp_counters_size(I, gu_cfg), dtype=torch.int32, device="cuda")
    d_counters = torch.zeros(configs.counters_size((D,), False, d_cfg.block_n), dtype=torch.int32, device="cuda")

    def two(i):
        parts = sparse_gemv.sparse_gemv_parts(x, wg[i], t, (I, I), gu_cfg, glu=True, norm_weight=g, ss_in=ss_in)
        return sparse_gemv.sparse_gemv_ss(parts, wd[i], td, (D,), d_counters, d_cfg, x)

    ours = [lambda i=i: sparse_mlp.sparse_mlp(x, wg[i], t, wd[i], td, counters, gu_cfg, dcfg, g, ss_in)
            for i in range(copies)]
    pair = [lambda i=i: two(i) for i in range(copies)]
    h = torch.randn(1, I, device="cuda", dtype=dtype)
    mm = graph_time_us([lambda i=i: (torch.matmul(xn, wg[i]), torch.matmul(h, wd[i])) for i in range(copies)])
    rows = []
    for s in KERNEL_SPARSITIES:
        t.fill_(sparse_threshold(xn, s))
        h = reference.parts_ref(sparse_gemv.sparse_gemv_parts(x, wg[0], t, (I, I), gu_cfg, glu=True, norm_weight=g,
                                                                ss_in=ss_in), True, dtype)
        td.fill_(sparse_threshold(h, s))
        m_gu = (xn.abs().float() <= t[0]).float().mean().item()
        m_d = (h.abs().float() <= td[0]).float().mean().item()
        nbytes = (1 - m_gu) * gu_bytes + (1 - m_d) * d_bytes
        us = graph_time_us(ours)
        rows.append({"model": name, "projection": "mlp", "K": D, "N": 3 * I, "sparsity": s,
                     "measured": 1 - nbytes / (gu_bytes + d_bytes), "us": us, "standalone_us": graph_time_us(pair),
                     "matmul_us": mm, "roofline_us": nbytes / bw * 1e6, "config": list(gu_cfg) + list(dcfg),
                     "weight_copies": copies, "gb_s": nbytes / us / 1e3})
    print(f"  {name} mlp      D={D} I={I}: matmul {mm:6.1f} us | "
          + " ".join(f"{r['sparsity']:.1f}:{r['us']:.1f}/{r['standalone_us']:.1f}" for r in rows), flush=True)
    return rows


def sparse_threshold(x: torch.Tensor, s: float) -> float:
    if s <= 0:
        return 0.0
    a = x.abs().float().flatten()
    return a.kthvalue(max(1, int(round(s * a.numel())))).values.item()


def bench_attention(name: str, args: ModelArgs, contexts=((384, 384), (2048, 2048), (384, 4096))) -> list:
    """The decode-attention kernel (RoPE, cache write, attention) against the PyTorch path it replaces, one
    layer's worth, at (context, cache length): the position near the context's end (a cache of 4096 with a short
    context is what a chat or the server decodes in). On sm_90 with libnvrtc also the CUDA C++ kernel
    (kernels/cuda_attention.py, `nvrtc_us`)."""
    rows = []
    H, Hkv, D = args.n_head, args.n_kv_head, args.head_dim
    on_nvrtc = decode_plan(torch.device("cuda")).nvrtc_arch >= 90 and cuda_attention.supported(H, Hkv, D)
    for C, T in contexts:
        qkv = torch.randn(1, (H + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16)
        caches = [(torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16),
                   torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
        rope = torch.randn(1, D // 2, 2, device="cuda")
        pos = torch.tensor([C - 2], device="cuda")
        counters = torch.zeros(Hkv, dtype=torch.int32, device="cuda")
        ours = graph_time_us([lambda c=c: decode_attention.decode_attention(qkv, rope, c[0], c[1], pos, counters, H,
                                                                            args.sliding_window) for c in caches])
        ref = graph_time_us([lambda c=c: decode_attention.decode_attention_ref(qkv, rope, c[0], c[1], C - 2, H,
                                                                               args.sliding_window) for c in caches])
        cuda = graph_time_us([lambda c=c: cuda_attention.cuda_attention(qkv, rope, c[0], c[1], pos, counters, H,
                                                                        args.sliding_window)
                              for c in caches]) if on_nvrtc else None
        rows.append({"model": name, "context": C, "cache": T, "us": ours, "torch_us": ref, "nvrtc_us": cuda,
                     "cache_bytes": 2 * Hkv * (C - 1) * D * 2})
        print(f"  {name} attention context {C}, cache {T}: kernel {ours:.1f} us | PyTorch (rope, cache write, SDPA) "
              f"{ref:.1f} us" + ("" if cuda is None else f" | NVRTC kernel {cuda:.1f} us"), flush=True)
    return rows


def bench_e2e(name: str, args: ModelArgs, sparsities, bw: float, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
              runs=3, fuse_norm: bool = True, attention: bool = True, defer_reduction: bool = True,
              fuse_mlp: bool = True, quant: Optional[str] = None, hopper_int4: Optional[bool] = None,
              hopper_mma: Optional[bool] = None, tp: Optional[TP] = None, graph: bool = False,
              group: int = 128, masked_stream: bool = False, nvrtc: Optional[bool] = None,
              nvrtc_sparse: Optional[bool] = None, nvrtc_int8: Optional[bool] = None, nvrtc_int4: bool = False,
              nvrtc_attention: Optional[bool] = None, attention_pdl: Optional[int] = None) -> list:
    """tp: this rank's slices (tensor parallel); the rooflines then read at every rank's bandwidth together."""
    torch._dynamo.reset()
    torch.manual_seed(0)  # every rank the same prompt
    model = random_model(args, tp.device if tp else "cuda", torch.bfloat16, seed=0, tp=tp)
    world = tp.world if tp else 1
    fmt = quant_format(quant)
    if group != 128:  # int4 (or AWQ's int4: the same kernels and bytes) in smaller scale groups
        fmt = int4_variant(group)
    quant = quant_label(quant, group)
    if fmt.quantized:
        quantize_model(model, fmt)
    model.set_plan(decode_plan(torch.device("cuda"), fuse_norm=fuse_norm, attention_kernel=attention,
                               defer_reduction=defer_reduction, fuse_mlp=fuse_mlp, masked_stream=masked_stream,
                               nvrtc=nvrtc, nvrtc_sparse=nvrtc_sparse, nvrtc_int8=nvrtc_int8, nvrtc_int4=nvrtc_int4,
                               nvrtc_attention=nvrtc_attention, attention_pdl=attention_pdl,
                               **({} if hopper_int4 is None else {"hopper_int4": hopper_int4}),
                               **({} if hopper_mma is None else {"hopper_mma": hopper_mma})))
    prompt = torch.randint(0, args.vocab_size, (1, prompt_len), device=model.tok_embeddings.weight.device)
    captured = capture_inputs(model, prompt[:, :PROMPT_LEN])  # thresholds of the same tokens at every prompt length
    gen = Generator(model, compile=True, graph=graph)
    gen.setup(1, prompt_len + new_tokens)
    records, first = [], model.layers[0].attention  # (what its steps run: the record's decode path)
    for s in sparsities:
        set_uniform_thresholds(model, captured, s)
        set_sparsity(model, None, s)  # the plan generate.py decodes level s with
        new, st = gen.generate(prompt, new_tokens)  # warm-up (the first one of each path compiles)
        speeds = []
        for _ in range(runs):
            new, st = gen.generate(prompt, new_tokens)
            speeds.append(st.decode_tok_s)
        tok_s = statistics.median(speeds)
        stats = measure_sparsity(model, torch.cat([prompt, new], 1), sparse_from=prompt_len, start=prompt_len)
        nbytes = bytes_per_token(args, stats, fmt=fmt)
        rec = {"model": name, "quant": quant or "none", "dtype": "bfloat16", "sparsity": s, "tok_s": round(tok_s, 1),
               "tp": world, "roofline_frac": round(tok_s * nbytes / (bw * world), 3), "measured_sparsity": round(parameter_weighted(model, stats), 4),
               "per_projection": {k: round(v, 3) for k, v in per_projection(stats).items()},
               "gb_s": round(tok_s * nbytes / 1e9, 1), "bytes_per_token": int(nbytes), "runs": [round(v, 1) for v in speeds],
               "ttft_ms": round(st.ttft_s * 1e3, 2), "gpu": torch.cuda.get_device_name(),
               "decode_path": decode_path(model.plan, first),
               "read_gb_s": round(bw / 1e9, 1), "prompt_len": prompt_len,
               "cache_bytes_per_token": int(cache_bytes_per_token(args, prompt_len + (new_tokens + 1) / 2)),
               "step": "graph" if graph and model.plan.sparse_decode else "compiled",
               "torch": torch.__version__}
        if tp is not None:
            rec["all_reduce_us"] = round(all_reduce_us(tp, args.dim), 2)
        records.append(rec)
        if tp is None or tp.rank == 0:
            print(f"  {name} s={s:.2f}: {tok_s:7.1f} tok/s  measured {rec['measured_sparsity']:.3f}  "
                  f"{rec['gb_s']:6.0f} GB/s  {rec['roofline_frac'] * 100:5.1f}% of roofline"
                  + (f"  (TP {world}, all-reduce {rec['all_reduce_us']:.1f} µs)" if tp else ""), flush=True)
    del model, gen, captured
    torch.cuda.empty_cache()
    return records


def decode_path(plan, attention, dtype: torch.dtype = torch.bfloat16) -> str:
    """What a record's decode step of `dtype` activations ran, read off its first layer's `attention` module: its
    projections (kernels/cuda_gemv.py where q/k/v takes it, SparseLinear.takes_cuda; else the sparse kernels:
    Triton's, Gluon's for int4; or dense), its attention (kernels/cuda_attention.py after an NVRTC q/k/v,
    Attention.takes_nvrtc_attention) and that attention's PDL trigger (Attention.attention_trigger)."""
    nvrtc = attention.wqkv.takes_cuda(plan, 1, plan.sparse_decode, None, dtype)
    if plan.sparse_decode:
        path = "NVRTC kernels" if nvrtc else "sparse kernels"
    else:
        path = "dense (NVRTC projections)" if nvrtc else "dense (cuBLAS projections)"
    if not (nvrtc and attention.takes_nvrtc_attention(plan)):
        return path
    trigger = attention.attention_trigger(plan)
    return path + ", NVRTC attention" + (f" (PDL {trigger})" if trigger else "")


def quant_label(quant: Optional[str], group: int) -> Optional[str]:
    """A record's weights: the --quant name, with the scale group where it is not 128 (int4-g32)."""
    return quant if group == 128 else f"{quant}-g{group}"


def all_reduce_us(tp: TP, dim: int, launches: int = 64) -> float:
    """µs of one decode step's all-reduce (a [1, dim] bf16 sum over the ranks, as o and down make), replayed in a
    CUDA graph as the compiled step makes it."""
    x = torch.ones(1, dim, dtype=torch.bfloat16, device=tp.device)
    fns = [lambda: torch.distributed.all_reduce(x, group=tp.group)]
    return graph_time_us(fns, launches)


def gpu_slug(gpu: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def e2e_key(r: dict) -> tuple:
    """What an end-to-end rerun replaces: the records of one model with one weight quantization on as many GPUs
    after a prompt as long."""
    return r["model"], r.get("quant", "none"), r.get("tp", 1), r.get("prompt_len", PROMPT_LEN)


def kernel_key(r: dict) -> str:
    """What a kernel (or attention) rerun replaces: the records of one model (the kernel table is bf16 only)."""
    return r["model"]


def previous_records(out: Path, gpu: str, suffix: str, drop: set, key=kernel_key) -> list:
    """The records of <out>/<gpu><suffix>.json whose key(record) is not in `drop` (for --merge)."""
    f = out / f"{gpu_slug(gpu)}{suffix}.json"
    if not f.exists():
        return []
    return [r for r in json.loads(f.read_text()) if key(r) not in drop]


def fixed_us_per_layer(r: dict):
    """Token time minus the time to read its weight bytes at the read bandwidth, per layer (µs); None for a record
    without the fields or of an unknown model."""
    if not {"tok_s", "bytes_per_token", "read_gb_s"} <= set(r) or r["model"] not in CONFIGS:
        return None
    n_layer = ModelArgs.from_name(r["model"]).n_layer
    return (1e6 / r["tok_s"] - r["bytes_per_token"] / (r["read_gb_s"] * 1e3 * r.get("tp", 1))) / n_layer


def write_outputs(out: Path, gpu: str, bw: float, e2e: list, kernels: list, attention: list, cmd: str,
                  merged: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    slug = gpu_slug(gpu)
    # merged runs: one order whatever ran last
    e2e = sorted(e2e, key=lambda r: (r["model"], r.get("quant", "none") != "none", r.get("quant", "none"),
                                     r.get("tp", 1), r.get("prompt_len", PROMPT_LEN), r["sparsity"]))
    kernels = sorted(kernels, key=lambda r: r["model"])  # stable: projections keep their order
    attention = sorted(attention, key=lambda r: r["model"])
    if e2e:
        (out / f"{slug}.json").write_text(json.dumps(e2e, indent=1) + "\n")
    if kernels:
        (out / f"{slug}-kernels.json").write_text(json.dumps(kernels, indent=1) + "\n")
    versions = sorted({r["torch"] for r in e2e if "torch" in r}) or [torch.__version__]  # the runs', not this one's
    lines = [f"# Decode benchmark: {gpu}", "", f"`{cmd}` on {time.strftime('%Y-%m-%d')}, torch {', '.join(versions)}, "
             f"triton {triton.__version__}. Read bandwidth (Triton streaming reduction over 4 GiB): "
             f"**{bw / 1e9:.0f} GB/s**; rooflines use it and the measured decode sparsity."
             + (" Rows of other models were kept from earlier runs (`--merge`), each against its own bandwidth "
                "probe (`read_gb_s` in the JSON)." if merged else ""), ""]
    runs = {}  # which command produced which models' rows (merged files mix runs)
    for r in e2e + kernels + attention:
        runs.setdefault(f"`{r['cmd']}` on {r['date']}" if "cmd" in r else "an earlier run (command not recorded)",
                        set()).add(r["model"])
    if len(runs) > 1:
        lines += ["Rows come from these runs:", ""] + [f"- {k}: {', '.join(sorted(v))}" for k, v in runs.items()] + [""]
    lines += anchor_lines(out, slug)
    if e2e:
        lines += [f"## End to end (batch 1, bf16, a random prompt, {NEW_TOKENS} decode tokens, median of 3)", "",
                  "| model | weights | prompt | sparsity | measured | tok/s | GB/s | roofline | fixed µs/layer | "
                  "q k v o gate up down |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            pp = " ".join(f"{r.get('per_projection', {}).get(p, 0):.2f}" for p in ("q", "k", "v", "o", "gate", "up", "down"))
            fixed = fixed_us_per_layer(r)
            weights = ("bf16" if r.get("quant", "none") == "none" else r["quant"]) + (
                " · NVRTC" if "NVRTC" in r.get("decode_path", "") else "")
            model = r["model"] + (f" (TP {r['tp']}, all-reduce {r['all_reduce_us']:.1f} µs)" if r.get("tp", 1) > 1 else "")
            lines.append(f"| {model} | {weights} | {r.get('prompt_len', PROMPT_LEN)} | {r['sparsity']:.2f} | "
                         f"{r['measured_sparsity']:.3f} | "
                         f"{r['tok_s']:.1f} | "
                         f"{r['gb_s']:.0f} | {r['roofline_frac'] * 100:.1f}% | "
                         f"{'–' if fixed is None else f'{fixed:.1f}'} | {pp} |")
        lines += ["", "Sparsity 0 decodes dense, as `generate.py --sparsity 0` does: projections on the NVRTC kernel "
                  "on sm_90 where libnvrtc is found (· NVRTC; kernels/cuda_gemv.py), cuBLAS elsewhere and in rows "
                  "made before 2026-12-06 (int8 weights: through the kernels, thresholds zero, the LM head int8 "
                  "too); · NVRTC on a sparse or int8 row: its projections on that kernel too (the default where "
                  "dense rows take it from session 33, 2026-12-06; `--nvrtc-sparse`, `--nvrtc-int8`). "
                  "Fixed µs/layer: the part of a token's time that its weight bytes at the read bandwidth do not "
                  "explain, per layer (launch boundaries, each kernel's dependent loads before it streams, split-K "
                  "tails, attention, the LM head's own excess); docs/perf-notes.md measures it per layer of launches. "
                  "It counts the KV cache's read too (`cache_bytes_per_token` in the JSON, at the mean decode "
                  "position): small after a 128-token prompt, most of the difference after a long one, whose "
                  "thresholds come from the same first 128 tokens. "
                  "TP N: tensor parallel over N GPUs (`torchrun`), roofline and fixed part against N GPUs' bandwidth; "
                  "all-reduce: one [1, dim] all-reduce in a CUDA graph (a layer makes two).",
                  ""]
    if kernels:
        lines += ["## Kernels (µs per launch in a CUDA graph; bf16, batch 1)", "",
                  "| model | proj | K×N | matmul | " + " | ".join(f"s={s}" for s in KERNEL_SPARSITIES) + " |",
                  "|---|---|---|---|" + "---|" * len(KERNEL_SPARSITIES)]
        groups = {}
        for r in kernels:
            groups.setdefault((r["model"], r["projection"]), []).append(r)
        for (m, p), rs in groups.items():
            cells = [f"{r['us']:.1f} ({r['us'] / r['roofline_us']:.2f}×)" if r["roofline_us"] > 0 else f"{r['us']:.1f}" for r in rs]
            lines.append(f"| {m} | {p} | {rs[0]['K']}×{rs[0]['N']} | {rs[0]['matmul_us']:.1f} | " + " | ".join(cells) + " |")
        lines += ["", "(×: time over the roofline (1−s)·bytes/bandwidth; the target is ≤ 1.10×, and at s=0 no slower "
                  "than matmul. Each launch as the decode step makes it: q/k/v and gate/up leave their split-K "
                  "partials unreduced for the attention and down kernels, down reads gate/up's partials; "
                  "`standalone_us` in the JSON has them with their own reduction. mlp: the batch-1 step's one MLP "
                  "launch, norm fused, gate/up then down (K×N: dim × 3·intermediate), against matmuls of gate|up and down; "
                  "its `standalone_us` is the two launches it replaces.)", ""]
    if attention:
        (out / f"{slug}-attention.json").write_text(json.dumps(attention, indent=1) + "\n")
        lines += ["## Decode attention (µs per layer in a CUDA graph; bf16, batch 1, position near the context's end)",
                  "",
                  "| model | context | cache | kernel | PyTorch (RoPE, cache write, SDPA) | cache GB/s | NVRTC kernel "
                  "(kernels/cuda_attention.py) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['context']} | {r.get('cache', r['context'])} | {r['us']:.1f} | "
                  f"{r['torch_us']:.1f} | {r['cache_bytes'] / r['us'] / 1e3:.0f} | "
                  f"{'–' if r.get('nvrtc_us') is None else format(r['nvrtc_us'], '.1f')} |" for r in attention]
        lines.append("")
    (out / f"{slug}.md").write_text("\n".join(lines))
    plot(out, slug, e2e, kernels, bw)


def anchor_lines(out: Path, slug: str) -> list:
    """The anchors measured on this GPU side by side with the project (<out>/anchors.json: TEAL's fork and
    upstream gpt-fast, same shapes and protocol), as a table to read the end-to-end rows against."""
    f = out / "anchors.json"
    anchors = json.loads(f.read_text()).get(slug) if f.exists() else None
    if not anchors:
        return []
    levels = sorted({lv for r in anchors["rows"] for lv in r["tok_s"]}, key=float)
    lines = [f"## Anchors ({anchors['model']}, batch 1, measured on this GPU on {anchors['date']}, same protocol)", "",
             "| engine | weights | " + " | ".join(f"s={lv}" for lv in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for r in anchors["rows"]:
        cells = [f"{r['tok_s'][lv]:.1f}" if lv in r["tok_s"] else "–" for lv in levels]
        lines.append(f"| {r['engine']} | {r['weights']} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(out: Path, slug: str, e2e: list, kernels: list, bw: float):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return
    if e2e:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in dict.fromkeys(map(e2e_key, e2e)):  # one curve per model, weights, ranks and prompt
            rs = [r for r in e2e if e2e_key(r) == key]
            name, quant, _, prompt = key
            m = (name if quant == "none" else f"{name} {quant}") + ("" if prompt == PROMPT_LEN else f" ({prompt}-token prompt)")
            line, = ax.plot([r["measured_sparsity"] for r in rs], [r["tok_s"] for r in rs], "o-", label=m)
            ax.plot([r["measured_sparsity"] for r in rs], [r["tok_s"] / r["roofline_frac"] for r in rs], ":", alpha=0.5,
                    color=line.get_color(),
                    label=f"{m} roofline")
        ax.set_xlabel("measured sparsity")
        ax.set_ylabel("decode tok/s")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{slug}-e2e.png", dpi=110)
    if kernels:
        groups = {}
        for r in kernels:
            groups.setdefault((r["model"], r["projection"]), []).append(r)
        n = len(groups)
        cols = 4
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + cols - 1) // cols)), squeeze=False)
        for ax, ((m, p), rs) in zip(axes.flat, groups.items()):
            s = [r["measured"] for r in rs]
            ax.plot(s, [r["us"] for r in rs], "o-", label="ours")
            ax.plot(s, [r["roofline_us"] for r in rs], "k--", label="(1-s) roofline")
            ax.axhline(rs[0]["matmul_us"], color="r", ls=":", label="torch.matmul")
            ax.set_title(f"{m} {p} {rs[0]['K']}x{rs[0]['N']}", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.supxlabel("sparsity")
        fig.supylabel("µs per launch")
        fig.tight_layout()
        fig.savefig(out / f"{slug}-kernels.png", dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", default="llama-2-7b,llama-3-8b,mistral-7b-v0.1",
                   help=f"comma-separated configs, of: {', '.join(CONFIGS)}")
    p.add_argument("--sparsities", default=",".join(str(s) for s in E2E_SPARSITIES),
                   help="comma-separated sparsity levels of the end-to-end runs")
    p.add_argument("--skip-kernels", action="store_true", help="no kernel or attention tables")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end decode runs")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench", help="directory of the tables, JSON and plots")
    p.add_argument("--json", action="store_true", help="print the end-to-end records as the last line")
    p.add_argument("--merge", action="store_true",
                   help="keep the records of other models already in --out (runs split by model)")
    p.add_argument("--fuse-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="RMSNorm inside the q/k/v and gate/up kernels")
    p.add_argument("--attention-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="RoPE, cache write and attention in one kernel")
    p.add_argument("--defer-reduction", action=argparse.BooleanOptionalAction, default=True,
                   help="q/k/v and gate/up partials summed by the attention and down kernels")
    p.add_argument("--fuse-mlp", action=argparse.BooleanOptionalAction, default=True,
                   help="batch 1: gate/up and down in one launch")
    p.add_argument("--hopper-int4", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-1 int4 projections through the Gluon kernels (default: on sm_90 GPUs)")
    p.add_argument("--hopper-mma", action=argparse.BooleanOptionalAction, default=None,
                   help="of them those it takes on tensor cores (default: with --hopper-int4)")
    p.add_argument("--masked-stream", action="store_true",
                   help="batch-1 16/8-bit projections stream their rows in order with masked loads, no kept list")
    p.add_argument("--nvrtc", action=argparse.BooleanOptionalAction, default=None,
                   help="dense 16-bit steps' projections on the CUDA C++ kernel compiled with NVRTC "
                   "(kernels/cuda_gemv.py; default: on sm_90 where libnvrtc is found)")
    p.add_argument("--nvrtc-sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="sparse steps' projections on it too (default: wherever dense steps are)")
    p.add_argument("--nvrtc-int8", action=argparse.BooleanOptionalAction, default=None,
                   help="int8 weights' projections on it (--quant int8; default: wherever dense steps are)")
    p.add_argument("--nvrtc-int4", action="store_true",
                   help="int4 weights' projections on it, on tensor cores (--quant int4 / awq; default: Gluon's kernels)")
    p.add_argument("--nvrtc-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="one-token attention on the CUDA C++ kernel (kernels/cuda_attention.py) after q/k/v on the "
                   "NVRTC projections (default: with them)")
    p.add_argument("--attention-pdl", type=int, default=None, choices=(0, 3, 4),
                   help="the NVRTC attention under PDL, q/k/v triggering it at its start (3) or after its rows (4); 0: "
                   "launched plainly (default: 3 with the NVRTC attention)")
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN,
                   help="end to end: tokens of the random prompt before the 256 decoded (a long one: decode at long "
                   "context; its rows sit beside the 128-token ones)")
    p.add_argument("--group", type=int, default=128, choices=(128, 64, 32),
                   help="int4 and awq: inputs per scale group (awq runs int4's kernels on the same bytes: random "
                   "weights rounded to nearest stand for it)")
    p.add_argument("--graph", action="store_true",
                   help="sparse decode steps recorded as a CUDA graph of their eager launches, not compiled")
    add_quant_arg(p)  # end to end only: the kernel table stays bf16
    a = p.parse_args()
    tp = from_env("cuda") if torch.cuda.is_available() else None  # under torchrun: end to end only, rank 0 writes
    if tp is not None and not a.skip_kernels:
        raise UserError("tensor-parallel runs are end to end only: add --skip-kernels")
    models = [m for m in a.models.split(",") if m]
    model_args = {m: ModelArgs.from_name(m) for m in models}  # an unknown name fails here, before any GPU work
    levels = sparsity_list(a.sparsities, "--sparsities")
    for m, margs in model_args.items():
        if not 1 <= a.prompt_len <= margs.max_seq_len - NEW_TOKENS:
            raise UserError(f"--prompt-len must be in [1, {margs.max_seq_len - NEW_TOKENS}] for {m} ({NEW_TOKENS} tokens "
                            f"are decoded after it within its {margs.max_seq_len} positions)")
    if a.group != 128 and a.quant not in ("int4", "awq"):
        raise UserError("--group applies to --quant int4 or awq")
    if not torch.cuda.is_available():
        raise UserError("bench.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    bw = read_bandwidth()
    print(f"{gpu}: read bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    writes = tp is None or tp.rank == 0
    kernels, e2e, attention = [], [], []
    cmd = (f"torchrun --nproc-per-node {tp.world} " if tp else "python ") + "scripts/bench.py " + " ".join(sys.argv[1:])
    if a.merge:  # other models' records, and this run's models' records of the parts it skips
        rerun_k = set() if a.skip_kernels else set(models)
        rerun_e = set() if a.skip_e2e else {(m, quant_label(a.quant, a.group) or "none", tp.world if tp else 1,
                                             a.prompt_len) for m in models}
        kernels = previous_records(a.out, gpu, "-kernels", rerun_k)
        attention = previous_records(a.out, gpu, "-attention", rerun_k)
        e2e = previous_records(a.out, gpu, "", rerun_e, e2e_key)
    run = {"cmd": cmd, "date": time.strftime("%Y-%m-%d")}
    if not a.skip_kernels:
        for m in models:
            kernels += [dict(r, **run) for r in bench_kernels(m, model_args[m], bw, n_sm)]
            attention += [dict(r, **run) for r in bench_attention(m, model_args[m])]
        write_outputs(a.out, gpu, bw, e2e, kernels, attention, cmd, a.merge)
    if not a.skip_e2e:
        for m in models:  # files rewritten after each model: a run cut short still leaves its results
            e2e += [dict(r, **run) for r in bench_e2e(m, model_args[m], levels, bw, fuse_norm=a.fuse_norm,
                                                      attention=a.attention_kernel, defer_reduction=a.defer_reduction,
                                                      fuse_mlp=a.fuse_mlp, quant=a.quant,
                                                      hopper_int4=a.hopper_int4, hopper_mma=a.hopper_mma, tp=tp,
                                                      graph=a.graph, group=a.group,
                                                      masked_stream=a.masked_stream, nvrtc=a.nvrtc,
                                                      nvrtc_sparse=a.nvrtc_sparse, nvrtc_int8=a.nvrtc_int8,
                                                      nvrtc_int4=a.nvrtc_int4,
                                                      nvrtc_attention=a.nvrtc_attention,
                                                      attention_pdl=a.attention_pdl, prompt_len=a.prompt_len)]
            if writes:
                write_outputs(a.out, gpu, bw, e2e, kernels, attention, cmd, a.merge)
    if a.json and writes:
        print(json.dumps(e2e))
    close(tp)


if __name__ == "__main__":
    run_cli(main)
