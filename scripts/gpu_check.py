"""GPU correctness check (run through the device tool; needs CUDA).

1. every kernel on real and odd shapes, fp16/bf16, batch 1/3/8, sparsity 0/0.5/0.95, against a float64
   reference: relative error within dtype bounds, every output written, tile counters left at zero; the GEMV
   also with its RMSNorm fused (sums of squares in) and with the sums of squares it emits (out), and at batch 1
   with the masked stream in place of the kept list (plan.masked_stream); decode
   attention over real head layouts, context lengths, positions and a sliding window; the deferred split-K
   reduction: q/k/v and gate/up partials summed by the attention and down kernels; the one-launch MLP against
   the two launches it replaces, bit-identical over three runs; int8 weights under bf16 activations with the
   configs the model uses, the int8 LM head included (check_quant_kernels); on sm_90, the Gluon int4 kernel against
   the reference and the Triton kernel, bit for bit against itself, partials out (q/k/v, gate/up) and with the
   residual added (o, down from gate/up's partials), and the tensor-core kernel (kernels/gluon_mma.py) on the
   partials shapes it takes (check_hopper_int4); the NVRTC GEMV (kernels/cuda_gemv.py) against its reference, every
   split and tail, dense and sparse, fused norm / residual / gated input, bit for bit over two launches
   (check_cuda_gemv);
2. a random Llama-2-7B-shaped model (few layers), also with int8 weights: compiled sparse decode (fullgraph,
   CUDA graphs, Triton kernels) against eager reference decode: same tokens over 32 steps, or, where a near-tie
   flips one, logits within dtype bounds at every step (both fed the reference's tokens); in fp32, with the
   thresholds moved into wide gaps between the inputs of the reference decode, so that rounding differences
   cannot flip a mask (the Gluon int4 kernel, 16-bit inputs only, decodes in the bf16 runs on sm_90);
   with the NVRTC GEMV where libnvrtc is found: dense bf16 and fp16 (as decode_plan's default on sm_90), sparse bf16
   reported (nvrtc_sparse), int8 weights at 0 (the kernel without thresholds) and sparse;
3. a new sparsity level (a copy_ into the threshold buffers) neither recompiles nor re-records graphs.

    python scripts/gpu_check.py [--layers 4] [--out DIR] [--kernels-only | --models-only]
"""
import argparse
import dataclasses
import itertools
import json
import sys
from typing import Optional
from pathlib import Path

import torch
import triton

from cli import HelpFormatter
from engine import Generator, GraphStep, compile_step
from kernels import (configs, cuda_attention, cuda_gemv, decode_attention, gate_up_rows, gluon_gemv, gluon_mma, nvrtc,
                     reference, sparse_gemv, sparse_mlp)
from loading import random_model
from model import ModelArgs
from kernels.common import PROFILE_SLOTS
from kernels.formats import INT4, INT8, int4_variant, quant_format
from plan import decode_plan
from errors import UserError
from scripts.bench import decode_path, graph_time_us, weight_copies
from quantization import quantize_model
from sparsity import capture_inputs, input_hooks, measure_sparsity, parameter_weighted, set_uniform_thresholds

BOUND = {torch.float16: 3e-3, torch.bfloat16: 1.2e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def projection_input(M: int, K: int, dtype: torch.dtype, norm: bool, device="cuda") -> tuple:
    """(x [M, K], norm weight, the producer's sums of squares, what the projection sees): with norm, x is a residual
    stream (scaled up) that the launch normalises from the sums of squares, as a producer's epilogue writes them."""
    x = torch.randn(M, K, device=device, dtype=dtype) * (3 if norm else 1)
    if not norm:
        return x, None, None, x
    g = (torch.rand(K, device=device) + 0.5).to(dtype)
    return x, g, reference.sum_squares_ref(x, 128), reference.rms_norm_ref(x, g, 1e-5)


def spread_thresholds(xin: torch.Tensor, n_seg: int, s: float) -> torch.Tensor:
    """[n_seg, K] thresholds at about sparsity s of xin, varied by ±20% per channel and per segment."""
    t = torch.quantile(xin.abs().float().flatten()[:100000], s).expand(n_seg, xin.shape[-1]).contiguous()
    return t * (torch.rand_like(t) * 0.4 + 0.8)


def check_kernels(n_sm: int) -> list:
    failures, rows = [], 0
    shapes = {  # K, sizes, glu, residual
        "l2-qkv": (4096, (4096, 4096, 4096), False, False), "l3-qkv": (4096, (4096, 1024, 1024), False, False),
        "o": (4096, (4096,), False, True), "l2-gate_up": (4096, (11008, 11008), True, False),
        "l2-down": (11008, (4096,), False, True), "odd-qkv": (1000, (333, 77, 77), False, False),
        "odd-gate_up": (777, (301, 301), True, False), "odd-down": (3001, (555,), False, True),
    }
    for name, (K, sizes, glu, has_res) in shapes.items():
        # q/k/v and gate/up take RMSNorm fused; o and down take their input as it comes, down also as gate/up
        # partials (the deferred reduction)
        variants = ("plain", "norm") if not has_res else ("plain", "parts") if "down" in name else ("plain",)
        for dtype, M, s, var, masked in itertools.product((torch.float16, torch.bfloat16), (1, 3, 8),
                                                          (0.0, 0.5, 0.95), variants, (False, True)):
            if masked and M > 1:  # the masked stream (plan.masked_stream) is batch 1's
                continue
            norm = var == "norm"
            if var == "parts":  # what a gate/up launch with two programs along K hands over
                x = torch.randn(2, 2, M, K, device="cuda") * 2
                g, ss_in, xin = None, None, reference.parts_ref(x, True, dtype)
            else:
                x, g, ss_in, xin = projection_input(M, K, dtype, norm)
            w = (torch.randn(K, sum(sizes), device="cuda") / K ** 0.5).to(dtype)
            n_out = sizes[0] if glu else sum(sizes)
            res = torch.randn(M, n_out, device="cuda", dtype=dtype) if has_res else None
            t = spread_thresholds(xin, len(sizes), s)
            ref = reference.sparse_gemv_ref(xin.double(), w.double(), t.double(), sizes, glu=glu,
                                              residual=None if res is None else res.double())
            cfg = configs.default_config(M, K, sizes, glu, n_sm)._replace(masked=int(masked))
            counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
            out = torch.full((M, n_out), float("nan"), device="cuda", dtype=dtype)
            n_tiles = configs.counters_size(sizes, glu, cfg[0])
            ss_out = torch.full((M, n_tiles), float("nan"), device="cuda") if has_res else None
            sparse_gemv.launch(x, w, t, counters, sizes, glu, cfg, res, out, norm_weight=g, ss_in=ss_in, eps=1e-5,
                               ss_out=ss_out)
            parts_err = 0.0
            if not has_res:  # the same projection handing over unreduced partials
                parts = torch.full((configs.k_layout(K, cfg)[1], 2 if glu else 1, M, n_out), float("nan"),
                                   device="cuda")
                sparse_gemv.launch(x, w, t, None, sizes, glu, cfg, None, parts, norm_weight=g, ss_in=ss_in,
                                   eps=1e-5, partial_out=True)
                parts_err = rel_err(reference.parts_ref(parts, glu, dtype), ref)
            torch.cuda.synchronize()
            err = rel_err(out, ref)
            ss_err = rel_err(ss_out, reference.sum_squares_ref(out, cfg[0])) if has_res else 0.0
            rows += 1
            if not (err < BOUND[dtype] and parts_err < BOUND[dtype]) or out.isnan().any() or counters.any() \
                    or not ss_err < 1e-5:
                failures.append(f"sparse_gemv {name} {dtype} M={M} s={s} {var} cfg={cfg}: err {err:.2e} "
                                f"partials err {parts_err:.2e} sums of squares err {ss_err:.2e}")
    for dtype in (torch.float16, torch.bfloat16):
        for M in (1, 3, 8):
            for s in (0.0, 0.5, 0.95):
                K, I = 4096, 11008
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                g = torch.randn(M, I, device="cuda", dtype=dtype)
                w = (torch.randn(I, K, device="cuda") / K ** 0.5).to(dtype)
                a = torch.nn.functional.silu(g.float()).abs()
                t = torch.quantile(a.flatten(), s).expand(I).contiguous()
                # the mask as the kernel sees it: silu(gate) rounded to the dtype (as the model's eager path)
                keep = torch.nn.functional.silu(g).abs().double() > t.double()
                ref = gate_up_rows.gate_up_rows_ref(x.double(), g.double(), w.double(), None) * keep
                out = torch.full((M, I), float("nan"), device="cuda", dtype=dtype)
                gate_up_rows.launch(x, g, w, t, gate_up_rows.default_config(M), out)
                torch.cuda.synchronize()
                err = rel_err(out, ref)
                rows += 1
                if not (err < BOUND[dtype]) or out.isnan().any():
                    failures.append(f"gate_up_rows {dtype} M={M} s={s}: err {err:.2e}")
    for (D, I), dtype, s in itertools.product(((4096, 11008), (4096, 14336), (777, 301)),
                                              (torch.float16, torch.bfloat16), (0.0, 0.5, 0.95)):
        # the whole MLP in one launch against the two launches it replaces (the same roundings; only the order
        # of the float32 sums differs), three times over: its work units are handed out at run time, yet the
        # result must not change by a bit
        x, g, ss_in, xn = projection_input(1, D, dtype, norm=True)
        w = (torch.randn(D, 2 * I, device="cuda") / D ** 0.5).to(dtype)
        wd = (torch.randn(I, D, device="cuda") / I ** 0.5).to(dtype)
        t = spread_thresholds(xn, 2, s)
        cfg = configs.default_config(1, D, (I, I), True, n_sm)
        parts = sparse_gemv.sparse_gemv_parts(x, w, t, (I, I), cfg, glu=True, norm_weight=g, ss_in=ss_in)
        h = reference.parts_ref(parts, True, dtype)
        td = spread_thresholds(h, 1, s)
        pair = sparse_gemv.launch(parts, wd, td, torch.zeros(4096, dtype=torch.int32, device="cuda"), (D,), False,
                                  configs.default_config(1, I, (D,), False, n_sm), x,
                                  torch.full((1, D), float("nan"), device="cuda", dtype=dtype))
        dcfg = configs.default_down_config(D, I, cfg)
        counters = torch.zeros(configs.mlp_counters_size(I, cfg), dtype=torch.int32, device="cuda")
        outs = []
        for _ in range(3):
            out = torch.full((1, D), float("nan"), device="cuda", dtype=dtype)
            ss = torch.full((1, dcfg.n_red), float("nan"), device="cuda")
            sparse_mlp.launch_mlp(x, w, t, wd, td, counters, cfg, dcfg, out, ss, norm_weight=g, ss_in=ss_in)
            outs.append((out, ss))
        torch.cuda.synchronize()
        out, ss = outs[0]
        red_d = triton.next_power_of_2(triton.cdiv(D, dcfg.n_red))
        err, ss_err = rel_err(out, pair), rel_err(ss, reference.sum_squares_ref(out, red_d))
        same = all(torch.equal(o, out) and torch.equal(q, ss) for o, q in outs[1:])
        rows += 1
        if not (err < BOUND[dtype] / 10 and ss_err < 1e-5 and same) or out.isnan().any() or counters.any():
            failures.append(f"sparse_mlp D={D} I={I} {dtype} s={s}: err against the two launches {err:.2e}, sums of "
                            f"squares {ss_err:.2e}, repeatable {same}, counters left zero {not counters.any()}")
    for (H, Hkv, D), T, window, dtype, B in itertools.product(
            ((32, 32, 128), (32, 8, 128), (9, 3, 64)), (384, 4096), (None, 100), (torch.float16, torch.bfloat16),
            (1, 3)):
        for pos, parts in itertools.product((0, 63, 64, 200, T - 1), (False, True)):
            qkv = torch.randn(B, (H + 2 * Hkv) * D, device="cuda", dtype=dtype)
            if parts:  # the q/k/v projection's unreduced partials, summed by the kernel
                qkv = torch.randn(4, B, (H + 2 * Hkv) * D, device="cuda") * 0.5  # sums of unit scale
            qkv_in = reference.parts_ref(qkv[:, None], False, dtype) if parts else qkv
            kc = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype)
            vc = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype)
            ang = torch.rand(D // 2, device="cuda") * 6
            rope = torch.stack([ang.cos(), ang.sin()], -1)[None].float()
            kr, vr = kc.double(), vc.double()
            ref = decode_attention.decode_attention_ref(qkv_in.double(), rope.double(), kr, vr, pos, H, window)
            counters = torch.zeros(B * Hkv, dtype=torch.int32, device="cuda")
            out = torch.full((B, H * D), float("nan"), device="cuda", dtype=dtype)
            decode_attention.launch(qkv, rope, kc, vc, torch.tensor([pos], device="cuda"), counters, H, window, out)
            torch.cuda.synchronize()
            err = rel_err(out, ref)
            cache_err = max(rel_err(kc[:, :, pos], kr[:, :, pos]), rel_err(vc[:, :, pos], vr[:, :, pos]))
            rows += 1
            if not (err < BOUND[dtype]) or out.isnan().any() or counters.any() or not cache_err < BOUND[dtype]:
                failures.append(f"decode_attention H={H} Hkv={Hkv} D={D} T={T} window={window} {dtype} B={B} "
                                f"pos={pos} partials={parts}: err {err:.2e}, cache err {cache_err:.2e}")
    print(f"kernels: {rows} cases, {len(failures)} failures")
    return failures


QUANT_SHAPES = {  # K, sizes, glu, residual, LM head
    "l2-qkv": (4096, (4096, 4096, 4096), False, False, False), "o": (4096, (4096,), False, True, False),
    "l3-qkv": (4096, (4096, 1024, 1024), False, False, False),
    "l2-gate_up": (4096, (11008, 11008), True, False, False), "l3-gate_up": (4096, (14336, 14336), True, False, False),
    "l2-down": (11008, (4096,), False, True, False), "l2-head": (4096, (32000,), False, False, True),
    "l3-head": (4096, (128256,), False, False, True), "odd-head": (777, (3001,), False, False, True),
}


def check_quant_kernels(n_sm: int, shapes=QUANT_SHAPES, levels=(0.0, 0.5, 0.95), device="cuda",
                       bound: float = BOUND[torch.bfloat16], quant: str = "int8") -> list:
    """int8 weights (quantize.rtn_int8), or int4 ones (quant "int4", quantize.rtn_int4; their LM head is int8, so
    head shapes are skipped) under bf16 activations with the configs the model launches them with: the
    projections at each sparsity (zero thresholds at 0: the dense branch), the LM head with zero thresholds only;
    q/k/v, gate/up and the head with the RMSNorm fused. Against the reference on the dequantized weights."""
    failures, rows, dtype = [], 0, torch.bfloat16
    for name, (K, sizes, glu, has_res, head) in shapes.items():
        w = torch.randn(K, sum(sizes), device=device) / K ** 0.5
        fmt = quant_format(quant)
        if fmt is INT4 and head:
            continue
        q, scale = fmt.quantize_weight(w)
        group = fmt.group_of(q, scale)
        w = fmt.dequantize(q, scale).double()
        n_out = sizes[0] if glu else sum(sizes)
        for M, s in itertools.product((1, 3), levels[:1] if head else levels):
            x, g, ss_in, xin = projection_input(M, K, dtype, norm=not has_res, device=device)
            t = spread_thresholds(xin, len(sizes), s) if s > 0 else torch.zeros(len(sizes), K, device=device)
            res = torch.randn(M, n_out, device=device, dtype=dtype) if has_res else None
            ref = reference.sparse_gemv_ref(xin.double(), w, t.double(), sizes, glu=glu,
                                              residual=None if res is None else res.double())
            cfg = configs.default_config(M, K, sizes, glu, n_sm, fmt, head=head, group=group)
            counters = torch.zeros(4096, dtype=torch.int32, device=device)
            out = torch.full((M, n_out), float("nan"), device=device, dtype=dtype)
            sparse_gemv.launch(x, q, t, counters, sizes, glu, cfg, res, out, fmt=fmt, scale=scale, norm_weight=g,
                               ss_in=ss_in, eps=1e-5)
            err = rel_err(out, ref)
            rows += 1
            if not err < bound or out.isnan().any() or counters.any():
                failures.append(f"sparse_gemv {quant} {name} M={M} s={s} cfg={cfg}: err {err:.2e}")
    print(f"{quant} kernels: {rows} cases, {len(failures)} failures")
    return failures


HOPPER_SHAPES = {  # (K, sizes, glu, group): Llama-2-7B's q/k/v and gate/up, Llama-3's q/k/v and gate/up, small and
    # odd ones (the tensor-core kernel takes all but the last: 512-column tiles where the segments allow, else 256)
    "l2-qkv": (4096, (4096,) * 3, False, 128), "l2-gate_up": (4096, (11008,) * 2, True, 128),
    "l3-qkv": (4096, (4096, 1024, 1024), False, 128), "l3-gate_up": (4096, (14336,) * 2, True, 128),
    "g64-256": (1152, (512, 256, 256), False, 64), "small-g64": (1152, (384, 128, 128), False, 64),
    # AWQ's groups of 32: the tensor-core kernel only (the CUDA-core one takes 64 and 128)
    "l2-qkv-g32": (4096, (4096,) * 3, False, 32), "l2-gate_up-g32": (4096, (11008,) * 2, True, 32),
}


def check_hopper_int4(n_sm: int, levels=(0.0, 0.5, 0.95)) -> list:
    """The Gluon int4 kernel (kernels/gluon_gemv.py, sm_90) with the configs the model launches it with, bf16 and
    fp16, RMSNorm fused or not: the sum of its partials against the float64 reference on the dequantized weights,
    against the Triton kernel's partials (bounds of the dtype: both normalise the input themselves, and a near-tie
    may round one input across its threshold), and bit for bit against a second run."""
    failures, rows = [], 0
    for (name, (K, sizes, glu, group)), dtype, norm in itertools.product(
            HOPPER_SHAPES.items(), (torch.bfloat16, torch.float16), (True, False)):
        q, scale = INT4.quantize(torch.randn(K, sum(sizes), device="cuda") / K ** 0.5, group)
        w = INT4.dequantize(q, scale).double()
        cfg = gluon_gemv.default_config(K, sizes, group, n_sm)
        tcfg = configs.default_config(1, K, sizes, glu, n_sm, INT4, group=group)
        mcfg = gluon_mma.default_config(K, sizes, group, n_sm)
        qm = None if mcfg is None else gluon_mma.to_mma_layout(q, mcfg.wb)
        for s in levels:
            x, g, ss_in, xin = projection_input(1, K, dtype, norm=norm)
            t = spread_thresholds(xin, len(sizes), s) if s > 0 else torch.zeros(len(sizes), K, device="cuda")
            ref = reference.sparse_gemv_ref(xin.double(), w, t.double(), sizes)
            triton_parts = sparse_gemv.sparse_gemv_parts(x, q, t, sizes, tcfg, glu, g, ss_in, fmt=INT4, scale=scale)
            def check(label: str, launch):  # a second run must give the same bits
                parts, again = launch(), launch()
                y = parts.sum(0).reshape(1, -1)
                err = rel_err(y, ref)
                err_triton = rel_err(y, triton_parts.sum(0).reshape(1, -1).double())
                if not (err < BOUND[dtype] and err_triton < BOUND[dtype] and torch.equal(parts, again)
                        and not y.isnan().any()):
                    failures.append(f"{label}: err {err:.2e}, against Triton {err_triton:.2e}, repeatable "
                                    f"{torch.equal(parts, again)}")

            if cfg is not None:
                check(f"gluon int4 {name} {dtype} norm={norm} s={s} cfg={tuple(cfg)}",
                      lambda: gluon_gemv.int4_parts(x, q, t, sizes, cfg, scale, glu, g, ss_in))
                rows += 1
            if mcfg is None or not norm:
                continue
            # the tensor-core kernel (q/k/v, gate/up: always norm-fused in the model), its weights in mma order
            check(f"gluon mma int4 {name} {dtype} s={s} cfg={tuple(mcfg)}",
                  lambda: gluon_mma.int4_parts(x, qm, t, sizes, mcfg, scale, glu, g, ss_in))
            rows += 1
    # o, and down from gate/up's partials: the residual added, the split-K sums reduced in the kernel, the sums of
    # squares written; against the reference, the Triton kernel, and a second run (counters must be left zero)
    for (K, N, P, group), dtype in itertools.product(
            ((4096, 4096, 0, 128), (11008, 4096, 5, 128), (1152, 384, 3, 64), (4096, 4096, 0, 32), (11008, 4096, 5, 32)),
            (torch.bfloat16, torch.float16)):
        q, scale = INT4.quantize(torch.randn(K, N, device="cuda") / K ** 0.5, group)
        w = INT4.dequantize(q, scale).double()
        cfg = gluon_gemv.default_config(K, (N,), group, n_sm)
        tcfg = configs.default_config(1, K, (N,), False, n_sm, INT4, group=group)
        mcfg = gluon_mma.default_config(K, (N,), group, n_sm)  # (not the last shape)
        qm = None if mcfg is None else gluon_mma.to_mma_layout(q, mcfg.wb)
        for s in levels:
            parts = torch.randn(P, 2, 1, K, device="cuda") * 2
            x = parts if P else torch.randn(1, K, device="cuda", dtype=dtype)
            xin = reference.parts_ref(parts, True, dtype) if P else x
            t = spread_thresholds(xin, 1, s) if s > 0 else torch.zeros(1, K, device="cuda")
            res = torch.randn(1, N, device="cuda", dtype=dtype)
            counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
            ref = reference.sparse_gemv_ref(xin.double(), w, t.double(), (N,), residual=res.double())
            ty, _ = sparse_gemv.sparse_gemv_ss(x, q, t, (N,), counters, tcfg, res, fmt=INT4, scale=scale)
            if cfg is not None:
                y, ss = gluon_gemv.int4_residual(x, q, t, (N,), cfg, scale, counters, res)
                y2, ss2 = gluon_gemv.int4_residual(x, q, t, (N,), cfg, scale, counters, res)
                err, err_triton = rel_err(y, ref), rel_err(y, ty.double())
                ss_err = rel_err(ss.sum(), reference.sum_squares_ref(y, N).sum().double())
                rows += 1
                if not (err < BOUND[dtype] and err_triton < BOUND[dtype] and ss_err < 1e-5 and torch.equal(y, y2)
                        and torch.equal(ss, ss2) and not counters.any() and not y.isnan().any()):
                    failures.append(f"gluon int4 residual K={K} N={N} parts={P} {dtype} s={s} cfg={tuple(cfg)}: err "
                                    f"{err:.2e}, against Triton {err_triton:.2e}, sums of squares {ss_err:.2e}, "
                                    f"repeatable {torch.equal(y, y2)}, counters left {int(counters.sum())}")
            if mcfg is None:
                continue
            y, ss = gluon_mma.int4_residual(x, qm, t, (N,), mcfg, scale, counters, res)
            y2, ss2 = gluon_mma.int4_residual(x, qm, t, (N,), mcfg, scale, counters, res)
            err, err_triton = rel_err(y, ref), rel_err(y, ty.double())
            ss_err = rel_err(ss.sum(), reference.sum_squares_ref(y, N).sum().double())
            rows += 1
            if not (err < BOUND[dtype] and err_triton < BOUND[dtype] and ss_err < 1e-5 and torch.equal(y, y2)
                    and torch.equal(ss, ss2) and not counters.any() and not y.isnan().any()):
                failures.append(f"gluon mma int4 residual K={K} N={N} parts={P} {dtype} s={s} cfg={tuple(mcfg)}: "
                                f"err {err:.2e}, against Triton {err_triton:.2e}, sums of squares {ss_err:.2e}, "
                                f"repeatable {torch.equal(y, y2)}, counters left {int(counters.sum())}")
    print(f"gluon int4 kernel: {rows} cases, {len(failures)} failures")
    return failures


def check_pdl_chain() -> tuple:
    """Programmatic dependent launch (sm_90) on kernels/cuda_gemv.py: o-like launches each write the next gate/up-like
    launch's input while that one may already run (trigger at the start, 1, or after the stream, 2); every consumer
    output must match the reference of what its producer wrote (a stale read of the input would not).
    (failures, cases)."""
    failures, cases, major = [], 0, torch.cuda.get_device_capability()[0]
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count  # the configs the model's launches take here
    K, dtype = 4096, torch.bfloat16
    wa = (torch.randn(K, K, device="cuda") / K ** 0.5).to(dtype)
    wb = (torch.randn(K, 2 * 11008, device="cuda") / K ** 0.5).to(dtype)
    g = (1 + 0.1 * torch.randn(K, device="cuda")).to(dtype)
    for pdl in (1, 2):
        xs = [(torch.randn(K, device="cuda") * 2).to(dtype) for _ in range(8)]
        rs = [torch.randn(K, device="cuda").to(dtype) for _ in range(8)]
        sa = cuda_gemv.spec_of(K, (K,), dtype, False, False, False, True, 1e-5,
                               cuda_gemv.default_config(K, (K,), n_sm, major)._replace(pdl=pdl))
        cb = cuda_gemv.default_config(K, (11008, 11008), n_sm, major)._replace(pdl=pdl)
        tb = torch.full((2, K), 0.5, device="cuda", dtype=dtype)
        sb = cuda_gemv.spec_of(K, (11008, 11008), dtype, True, True, False, False, 1e-5, cb)
        ca = torch.zeros(K // cuda_gemv.COLS, dtype=torch.int32, device="cuda")
        cnt = torch.zeros(2 * 11008 // cuda_gemv.COLS, dtype=torch.int32, device="cuda")
        pa, pb = torch.empty(sa.config.split, K, device="cuda"), torch.empty(cb.split, 2 * 11008, device="cuda")
        ya = [torch.full((K,), float("nan"), device="cuda", dtype=dtype) for _ in xs]
        yb = [torch.full((2 * 11008,), float("nan"), device="cuda", dtype=dtype) for _ in xs]
        for i in range(len(xs)):  # back to back on one stream: each launch may start during the previous one
            cuda_gemv.launch(sa, xs[i], wa, None, None, rs[i], ca, ya[i], pa)
            cuda_gemv.launch(sb, ya[i], wb, tb, g, None, cnt, yb[i], pb)
        torch.cuda.synchronize()
        for i in range(len(xs)):
            ra = cuda_gemv.cuda_gemv_ref(xs[i], wa, None, (K,), residual=rs[i])
            rb = cuda_gemv.cuda_gemv_ref(ya[i], wb, tb, (11008, 11008), g, 1e-5)  # of what was written
            err = rel_err(yb[i], rb)
            cases += 1
            if not rel_err(ya[i], ra) <= BOUND[dtype] or not err <= BOUND[dtype]:  # (NaN fails too)
                failures.append(f"cuda_gemv PDL {pdl} chain {i}: producer err {rel_err(ya[i], ra):.2e}, "
                                f"consumer err {err:.2e}")
    return failures, cases


def gemv_case_inputs(K: int, N: int, dtype: torch.dtype, norm: bool, res: bool, glu_in: bool) -> tuple:
    """(x, norm weight, what the projection sees, residual) of one kernels/cuda_gemv.py case: x [K] ([2, K] gate/up
    outputs with glu_in, gated by the launch), the residual [N] where res."""
    x, g, _, xin = projection_input(1, K, dtype, norm)
    if glu_in:
        x = (torch.randn(2, K, device="cuda") * 2).to(dtype)
        xin = reference.parts_ref(x.float().view(1, 2, 1, K), True, dtype)
    return x, g, xin, torch.randn(N, device="cuda", dtype=dtype) if res else None


def cuda_gemv_case(spec, x, w, t, g, r, scale, ref) -> Optional[str]:
    """One launch config of kernels/cuda_gemv.py, launched twice into poisoned outputs: None if within the dtype's
    bound of `ref`, bit for bit the same both times and its counters left at zero, else what went wrong."""
    N, dtype = ref.numel(), ref.dtype
    counters = torch.zeros(N // cuda_gemv.COLS, dtype=torch.int32, device="cuda")
    part = torch.empty(spec.config.split, N, device="cuda")
    outs = []
    for _ in range(2):
        y = torch.full((N,), float("nan"), device="cuda", dtype=dtype)
        cuda_gemv.launch(spec, x.reshape(-1), w, t, g, r, counters, y, part, scale)
        outs.append(y)
    torch.cuda.synchronize()
    err, same, left = rel_err(outs[0], ref), torch.equal(outs[0], outs[1]), int(counters.abs().sum())
    if err <= BOUND[dtype] and same and left == 0:
        return None
    return f"err {err:.2e}, repeatable {same}, counters left {left}"


def nvrtc_hopper(script: str) -> tuple:
    """(SMs, L2 bytes) of the GPU a probe of kernels/cuda_gemv.py runs on; UserError unless it is sm_90 with
    libnvrtc."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not nvrtc.available():
        raise UserError(f"{script} needs an sm_90 (Hopper) GPU and libnvrtc")
    props = torch.cuda.get_device_properties(0)
    return props.multi_processor_count, props.L2_cache_size


def checked_cuda_gemv_us(spec, w: torch.Tensor, scale, sizes, s: float, what: str) -> float:
    """One kernels/cuda_gemv.py launch of `spec` on weights w (scale) at sparsity s, its inputs as the decode step
    gives them (gemv_case_inputs): checked as check_cuda_gemv checks the kernel (cuda_gemv_case against
    cuda_gemv_ref; a failure is a UserError naming `what`), then its L2-cold µs, CUDA-graph replays over copies of
    w (as bench.py times kernels)."""
    K, N, dtype = w.shape[0], sum(sizes), torch.float16 if spec.fp16 else torch.bfloat16
    nbytes = w.numel() * w.element_size() + (0 if scale is None else scale.numel() * scale.element_size())
    ws = [w] + [w.clone() for _ in range(weight_copies(nbytes, torch.cuda.get_device_properties(0).L2_cache_size)
                                         - 1)]
    x, g, xin, r = gemv_case_inputs(K, N, dtype, spec.norm, spec.residual, spec.glu_in)
    x = x.reshape(-1)
    t = spread_thresholds(xin, len(sizes), s) if s > 0 else None
    bad = cuda_gemv_case(spec, x, w, t, g, r, scale,
                         cuda_gemv.cuda_gemv_ref(x, w, t, sizes, g, spec.eps, r, spec.glu_in, scale))
    if bad:
        raise UserError(f"{what} s={s} against cuda_gemv_ref: {bad}")
    counters = torch.zeros(N // cuda_gemv.COLS, dtype=torch.int32, device="cuda")
    part = torch.empty(spec.config.split, N, device="cuda")
    y = torch.empty(N, device="cuda", dtype=dtype)
    return graph_time_us([lambda wi=wi: cuda_gemv.launch(spec, x, wi, t, g, r, counters, y, part, scale) for wi in ws])


def check_cuda_gemv(levels=(0.0, 0.5, 0.95)) -> list:
    """kernels/cuda_gemv.py (NVRTC) against its reference on real and odd shapes, fp16/bf16, dense and sparse, with
    the norm fused, the residual added and gate/up's outputs gated, float32 or 16-bit thresholds, 16-bit or int8
    weights (bf16 activations), every split and both tails: relative error within dtype bounds, every output
    written (poisoned), counters left at zero, bit for bit over two launches."""
    failures, cases = [], 0
    major = torch.cuda.get_device_capability()[0]
    shapes = [  # (K, sizes, norm, residual, glu_in)
        (4096, (4096, 4096, 4096), True, False, False), (4096, (4096, 1024, 1024), True, False, False),
        (4096, (4096,), False, True, False), (4096, (11008, 11008), True, False, False),
        (11008, (4096,), False, True, True), (584, (128, 64, 64), True, False, False), (1032, (192,), False, True, True),
        (1032, (64,), False, False, False)]
    for (K, sizes, norm, res, glu_in), (dtype, int8) in itertools.product(
            shapes, ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True))):
        N = sum(sizes)
        w = (torch.randn(K, N, device="cuda") / K ** 0.5).to(dtype)
        scale = None
        if int8:  # int8 weights, column scales on the sums (kernels/formats.py INT8)
            w, scale = INT8.quantize_weight(w)
        x, g, xin, r = gemv_case_inputs(K, N, dtype, norm, res, glu_in)
        splits = [s for s in (1, 2, 4, 8, 16) if cuda_gemv.k_per(K, s) <= cuda_gemv.MAX_KPER
                  and (s < 16 or cuda_gemv.tile_cols(sizes, int8) > cuda_gemv.COLS)]  # 16: int8's wide tiles
        for s, split, t32 in itertools.product(levels, splits, (True, False)):
            if s == 0 and not t32:
                continue
            t = spread_thresholds(xin, len(sizes), s).to(torch.float32 if t32 else dtype) if s > 0 else None
            ref = cuda_gemv.cuda_gemv_ref(x, w, t, sizes, g, 1e-5, r, glu_in, scale)
            for cluster in (0, 1) if 1 < split <= 8 and major >= 9 else (0,):
                cfg = cuda_gemv.Config(split, 8, cluster, int(major >= 9))
                spec = cuda_gemv.spec_of(K, sizes, dtype, t is not None, g is not None, glu_in, res, 1e-5, cfg,
                                         t is not None and t32, int8)
                bad = cuda_gemv_case(spec, x, w, t, g, r, scale, ref)
                cases += 1
                if bad:
                    failures.append(f"cuda_gemv K={K} sizes={sizes} {dtype} int8={int8} s={s} t32={t32} norm={norm} "
                                    f"res={res} glu_in={glu_in} cfg={tuple(cfg)}: {bad}")
    if major >= 9:
        pdl_failures, pdl_cases = check_pdl_chain()
        failures += pdl_failures
        cases += pdl_cases
    # the profiled variant (scripts/profile_phases.py --nvrtc): the same output bit for bit, every CTA's stamps there,
    # in order; the config the model's launch takes on this GPU
    K, sizes, dtype = 4096, (4096, 1024, 1024), torch.bfloat16
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    w = (torch.randn(K, sum(sizes), device="cuda") / K ** 0.5).to(dtype)
    x, g, _, xin = projection_input(1, K, dtype, True)
    t = spread_thresholds(xin, len(sizes), 0.5)
    outs = []
    for profile in (False, True):
        spec = cuda_gemv.spec_of(K, sizes, dtype, True, True, False, False, 1e-5,
                                 cuda_gemv.default_config(K, sizes, n_sm, major), True, profile=profile)
        rec = torch.zeros(cuda_gemv.grid(spec), PROFILE_SLOTS, dtype=torch.int64, device="cuda") if profile else None
        y = torch.full((sum(sizes),), float("nan"), device="cuda", dtype=dtype)
        cuda_gemv.launch(spec, x.reshape(-1), w, t, g, None,
                         torch.zeros(sum(sizes) // cuda_gemv.COLS, dtype=torch.int32, device="cuda"), y,
                         torch.empty(spec.config.split, sum(sizes), device="cuda"), prof=rec)
        outs.append(y)
    torch.cuda.synchronize()
    cases += 1
    stamps = rec[:, [0, 2, 6, 10]]  # start, kept list ready, rows streamed, result written
    ordered = bool(((stamps[:, 0] > 0) & (stamps[:, 1:] >= stamps[:, :-1]).all(dim=1)).all())
    if not (torch.equal(outs[0], outs[1]) and ordered):
        failures.append(f"cuda_gemv profiled: same output {torch.equal(outs[0], outs[1])}, records in order {ordered}")
    print(f"cuda_gemv (NVRTC): {cases} cases, {len(failures)} failures")
    return failures


def check_cuda_gemv_int4(levels=(0.0, 0.5, 0.95)) -> list:
    """kernels/cuda_gemv.py's int4 mode (tensor cores) against its reference: real and odd shapes, scale groups of
    128 / 64 / 32 inputs, bf16 and fp16, dense and sparse, the norm fused, the residual added, gate/up's outputs
    gated, the fewest K ranges (8 scale groups each) and the default split with both tails, 2 steps in flight (1
    and 3 too on the odd shapes: a ring that ends part way); relative error within dtype bounds, every output
    written (poisoned), counters left at zero, bit for bit over two launches."""
    failures, cases = [], 0
    major = torch.cuda.get_device_capability()[0]
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [  # (K, sizes, norm, residual, glu_in, groups)
        (4096, (4096, 4096, 4096), True, False, False, (128,)), (4096, (4096, 1024, 1024), True, False, False, (128,)),
        (4096, (4096,), False, True, False, (128, 32)), (4096, (11008, 11008), True, False, False, (128,)),
        (11008, (4096,), False, True, True, (128,)), (640, (256, 512, 256), True, False, False, (128, 64, 32)),
        (1056, (512,), False, True, True, (32,)), (352, (256,), False, False, False, (32,))]
    for (K, sizes, norm, res, glu_in, groups), dtype in itertools.product(shapes, (torch.bfloat16, torch.float16)):
        N = sum(sizes)
        w16 = torch.randn(K, N, device="cuda") / K ** 0.5
        x, g, xin, r = gemv_case_inputs(K, N, dtype, norm, res, glu_in)
        for group in groups:
            w, scale = int4_variant(group).quantize_weight(w16)
            fewest = cuda_gemv.int4_config(K, sizes, 0, major, group).split  # (no SMs to fill: 8 groups a range)
            splits = sorted({fewest, cuda_gemv.int4_config(K, sizes, n_sm, major, group).split})
            for s, split in itertools.product(levels, splits):
                t = spread_thresholds(xin, len(sizes), s) if s > 0 else None
                ref = cuda_gemv.cuda_gemv_ref(x, w, t, sizes, g, 1e-5, r, glu_in, scale)
                for cluster, rows in itertools.product((0, 1) if 1 < split <= 8 and major >= 9 else (0,),
                                                       (1, 2, 3) if K < 2048 else (2,)):
                    cfg = cuda_gemv.Config(split, rows, cluster)
                    spec = cuda_gemv.spec_of(K, sizes, dtype, t is not None, g is not None, glu_in, res, 1e-5, cfg,
                                             True, group=group)
                    bad = cuda_gemv_case(spec, x, w, t, g, r, scale, ref)
                    cases += 1
                    if bad:
                        failures.append(f"cuda_gemv int4 K={K} sizes={sizes} {dtype} group={group} s={s} norm={norm} "
                                        f"res={res} glu_in={glu_in} cfg={tuple(cfg)}: {bad}")
    print(f"cuda_gemv int4 (NVRTC, tensor cores): {cases} cases, {len(failures)} failures")
    return failures


def check_cuda_attention(**variant) -> list:
    """kernels/cuda_attention.py (NVRTC, sm_90) against decode_attention_ref: MHA and GQA heads, head dims 128 and
    64, caches whose split count takes the cluster (2, 6 splits) or the counter (16), positions at block edges,
    with and without a sliding window, bf16 and fp16, int64 and int32 positions: output within dtype bounds and
    written everywhere (poisoned), the new key and value in the caches, counters left at zero, bit for bit over two
    launches. variant: cuda_attention.launch's sweep parameters (the defaults without)."""
    failures, cases = [], 0
    if torch.cuda.get_device_capability()[0] < 9 or not nvrtc.available():
        return failures
    for (H, Hkv, D), T, window, dtype in itertools.product(((32, 32, 128), (32, 8, 128), (9, 3, 64)), (128, 384, 2048),
                                                           (None, 100), (torch.bfloat16, torch.float16)):
        for p in sorted({0, 1, 15, 16, 63, 100, T // 2 + 7, T - 1}):
            pos_t = torch.tensor([p], device="cuda", dtype=torch.int64 if p % 2 else torch.int32)
            qkv = torch.randn((H + 2 * Hkv) * D, device="cuda").to(dtype)
            rope = torch.randn(D // 2, 2, device="cuda")
            kc, vc = (torch.randn(1, Hkv, T, D, device="cuda").to(dtype) for _ in range(2))
            counters = torch.zeros(Hkv, dtype=torch.int32, device="cuda")
            rk, rv = kc.clone(), vc.clone()
            ref = cuda_attention.cuda_attention_ref(qkv, rope, rk, rv, pos_t, H, window)
            outs = []
            for _ in range(2):
                out = torch.full((H * D,), float("nan"), device="cuda", dtype=dtype)
                ck, cv = kc.clone(), vc.clone()
                cuda_attention.launch(qkv, rope, ck, cv, pos_t, counters, H, window, out, **variant)
                outs.append(out)
            torch.cuda.synchronize()
            cases += 1
            err = rel_err(outs[0], ref)
            caches = rel_err(ck, rk) < 1e-2 and torch.equal(cv, rv) and torch.equal(ck[:, :, :p], rk[:, :, :p])
            if not (err <= BOUND[dtype] and torch.equal(outs[0], outs[1]) and caches and int(counters.sum()) == 0):
                failures.append(f"cuda_attention H={H} Hkv={Hkv} D={D} T={T} window={window} {dtype} pos={p}: err "
                                f"{err:.2e}, repeatable {torch.equal(outs[0], outs[1])}, caches {caches}, counters "
                                f"{int(counters.sum())}")
    print(f"cuda_attention (NVRTC{''.join(f', {k} {v}' for k, v in variant.items())}): {cases} cases, "
          f"{len(failures)} failures")
    return failures


def check_model(layers: int, sparsity: float, dtype: torch.dtype, steps: int = 32, sparse: bool = True,
                quant: Optional[str] = None, nvrtc: bool = False, nvrtc_attention: Optional[bool] = None,
                attention_pdl: Optional[int] = None) -> tuple:
    """sparse=False: the compiled step decodes dense (cuBLAS projections, what generate.py does at 0); quant: the
    sparse linears quantized (quantize.py, "int8" or "int4"), both decodes on the same quantized weights; nvrtc:
    the compiled step's batch-1 projections on kernels/cuda_gemv.py (plan.nvrtc_arch; int4 weights' too), and its attention on
    kernels/cuda_attention.py unless nvrtc_attention is False."""
    args = ModelArgs.from_name("llama-2-7b")
    args.n_layer = layers
    model = random_model(args, "cuda", dtype, seed=1)
    if quant:
        quantize_model(model, quant_format(quant))
    prompt = torch.randint(0, args.vocab_size, (1, 64), device="cuda")
    # thresholds from other text: quantiles of the decoded prompt's own activations would sit exactly on some
    # of them (layer 0's input depends on the token alone), and any rounding difference would flip those
    calib = torch.randint(0, args.vocab_size, (1, 64), device="cuda")
    set_uniform_thresholds(model, capture_inputs(model, calib), sparsity)
    model.setup_caches(1, 128)
    # eager reference decode (plain PyTorch path)
    ref_gen = Generator(model, compile=False)
    ref_tokens, _ = ref_gen.generate(prompt, steps)
    if sparsity > 0 and dtype == torch.float32:  # the decode that finds the gaps gives the reference logits too
        margin, ref_logits = move_thresholds_into_gaps(model, prompt, ref_tokens)
        free_ref, _ = ref_gen.generate(prompt, steps)  # greedy tokens under the moved thresholds
    else:
        margin, ref_logits = None, decode_logits(model, prompt, ref_tokens)
        free_ref = ref_tokens
    # compiled decode with the Triton kernels, fed the reference tokens
    model.set_plan(dataclasses.replace(decode_plan(torch.device("cuda"), sparsity=sparsity, nvrtc=nvrtc,
                                                   nvrtc_sparse=nvrtc, nvrtc_int4=bool(nvrtc) and quant == "int4",
                                                   nvrtc_attention=nvrtc_attention if nvrtc else False,
                                                   attention_pdl=attention_pdl if nvrtc else 0),
                                       sparse_decode=sparse))
    gen = Generator(model, compile=True)
    free_tokens, _ = gen.generate(prompt, steps)
    step = compile_step(lambda cur, pos: model(cur, pos, sparse_from=0 if sparse else None)[:, -1],
                        mode="reduce-overhead")
    comp_logits = decode_logits(model, prompt, ref_tokens, step=step)
    # the same step's eager launches recorded as a CUDA graph (generate.py --graph)
    graph_logits = decode_logits(model, prompt, ref_tokens, step=GraphStep(
        lambda cur, pos: model(cur, pos, sparse_from=0 if sparse else None)[:, -1], lambda: None))
    errs = [max(rel_err(c, r), rel_err(g, r)) for c, g, r in zip(comp_logits, graph_logits, ref_logits)]
    same = int((free_tokens == free_ref).all(dim=0).long().cumprod(0).sum().item())
    stats = measure_sparsity(model, torch.cat([prompt, ref_tokens], 1), sparse_from=64, start=64)
    return errs, same, parameter_weighted(model, stats), model, gen, prompt, margin


@torch.no_grad()
def move_thresholds_into_gaps(model, prompt, tokens, window: float = 2e-3) -> tuple:
    """Moves each (uniform) threshold into the middle of the widest gap between consecutive inputs of the eager
    decode of `tokens` among the `window` fraction of its inputs nearest it (its sparsity moves by at most half
    that). Different but equally valid roundings (inductor's fused RMSNorm against eager's, the kernel's split
    partials against one matmul) then cannot flip an input across its threshold unless they move it by the gap.
    A quantile alone sits within ~1e-7 of some input about once per run in fp32, and even the gap around it can be
    that narrow (5.8e-7 failed once on int8 weights); such a flip moves the logits by several percent.
    Moving a threshold changes the masks of the inputs it passes, hence every later projection's inputs: the
    projections are treated in forward order, one eager decode each. Returns the smallest gap margin, relative to
    the threshold, and the logits of the decode with every threshold moved."""
    margin, done = float("inf"), set()
    while True:
        seen = {}  # the first projection in forward order not yet moved: its decode inputs

        def grab(mod, a):
            if a.shape[1] == 1 and mod not in done and (not seen or mod in seen):  # decode steps: prefill is dense
                seen.setdefault(mod, []).append(a.float().abs().flatten())

        with input_hooks(model, grab):
            logits = decode_logits(model, prompt, tokens)
        if not seen:
            return margin, logits
        (mod, vals), = seen.items()
        done.add(mod)
        v = torch.cat(vals).sort().values
        t = mod.threshold.flatten()[0]
        assert (mod.threshold == t).all(), "uniform thresholds"
        i = int(torch.searchsorted(v, t, right=True))
        half = max(1, int(window * v.numel() / 2))
        lo, hi = max(1, i - half), min(v.numel() - 1, i + half)  # the gaps v[j - 1] .. v[j], j in [lo, hi]
        if lo <= hi:
            j = lo + int(torch.argmax(v[lo:hi + 1] - v[lo - 1:hi]))
            new = (v[j - 1] + v[j]) / 2
            mod.threshold.fill_(new.item())
            margin = min(margin, ((v[j] - v[j - 1]) / 2 / new).item())


def decode_logits(model, prompt, tokens, step=None) -> list:
    """Logits of each decode step when fed `tokens` (teacher forcing) after a dense prefill."""
    T = prompt.shape[1]
    dev = prompt.device
    model(prompt, torch.arange(T, device=dev), sparse_from=None)
    out = []
    cur = tokens[:, :1]
    for i in range(tokens.shape[1] - 1):
        pos = torch.tensor([T + i], device=dev)
        logits = step(cur, pos) if step else model(cur, pos, sparse_from=0)[:, -1]
        out.append(logits.float().clone())
        cur = tokens[:, i + 1:i + 2]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="layers of the random model in the model checks (2 and 3)")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity level of the sparse model checks")
    p.add_argument("--out", type=Path, default=None, help="directory for gpu_check.json (default: none written)")
    p.add_argument("--kernels-only", action="store_true", help="skip the compiled-model checks (2 and 3)")
    p.add_argument("--models-only", action="store_true", help="skip the kernel cases (1)")
    p.add_argument("--attention-pdl", type=int, default=None, choices=(0, 3, 4),
                   help="the NVRTC rows with the attention under PDL (q/k/v triggering it: 3 at its start, 4 later; 0 "
                   "off; default: as the plan decides, 3)")
    p.add_argument("--nvrtc-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="the NVRTC rows of the model checks with attention on kernels/cuda_attention.py (default: as "
                   "the plan decides, on)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: gpu_check.py needs a CUDA GPU")
    torch.manual_seed(0)
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    failures = [] if a.models_only else (check_kernels(n_sm) + check_cuda_gemv() + check_cuda_gemv_int4()
                                         + check_cuda_attention()
                                         + check_quant_kernels(n_sm)
                                         + check_quant_kernels(n_sm, quant="int4")
                                         + (check_hopper_int4(n_sm) if torch.cuda.get_device_capability() == (9, 0)
                                            else []))
    if a.kernels_only:
        print("\n".join(failures) if failures else "ALL KERNEL CHECKS PASSED")
        sys.exit(1 if failures else 0)
    # Thresholding is discontinuous: in bf16 the kernel's and cuBLAS's different summation orders move some
    # activations across their threshold (near-ties), and on a random model each flip shifts the logits by
    # about t/|x| ~ 1%, so sparse bf16 decode is reported but judged in fp32, with the thresholds moved into gaps
    # between the reference decode's inputs (move_thresholds_into_gaps): no input then sits within rounding of one.
    on_nvrtc = True if nvrtc.available() else None  # (None: rows skipped)
    for level, dtype, bound, sparse, quant, cuda in ((0.0, torch.bfloat16, 3e-2, False, None, False),
                                                     (0.0, torch.bfloat16, 3e-2, True, None, False),
                                                     (a.sparsity, torch.float32, 1e-3, True, None, False),
                                                     (a.sparsity, torch.bfloat16, None, True, None, False),
                                                     (0.0, torch.bfloat16, 3e-2, False, None, on_nvrtc),
                                                     (0.0, torch.float16, 1e-2, False, None, on_nvrtc),
                                                     (a.sparsity, torch.bfloat16, None, True, None, on_nvrtc),
                                                     (0.0, torch.bfloat16, 3e-2, True, "int8", False),
                                                     (a.sparsity, torch.float32, 1e-3, True, "int8", False),
                                                     (a.sparsity, torch.bfloat16, None, True, "int8", False),
                                                     (0.0, torch.bfloat16, 3e-2, True, "int8", on_nvrtc),
                                                     (a.sparsity, torch.bfloat16, None, True, "int8", on_nvrtc),
                                                     (0.0, torch.bfloat16, 3e-2, True, "int4", False),
                                                     (a.sparsity, torch.float32, 1e-3, True, "int4", False),
                                                     (a.sparsity, torch.bfloat16, None, True, "int4", False),
                                                     (0.0, torch.bfloat16, 3e-2, True, "int4", on_nvrtc),
                                                     (a.sparsity, torch.bfloat16, None, True, "int4", on_nvrtc)):
        if cuda is None:
            continue
        torch._dynamo.reset()
        errs, same, measured, model, gen, prompt, margin = check_model(a.layers, level, dtype, sparse=sparse,
                                                                       quant=quant, nvrtc=cuda,
                                                                       nvrtc_attention=a.nvrtc_attention,
                                                                       attention_pdl=a.attention_pdl)
        worst = max(errs)
        path = decode_path(model.plan, model.layers[0].attention, dtype)
        print(f"model {dtype}{f' {quant} weights' if quant else ''} at {level} ({path}): "
              f"compiled (and CUDA-graph) vs eager decode: "
              f"same tokens for {same}/{len(errs) + 1} steps; "
              f"worst logits rel err {worst:.2e}; measured sparsity {measured:.3f}"
              + ("" if margin is None else f"; thresholds moved into gaps, smallest margin {margin:.1e}")
              + ("" if bound else " (reported only: near-tie flips)"))
        # greedy tokens may part at a near-tie of the top logits; teacher-forced logits must stay within bounds
        if bound is not None and worst > bound:
            failures.append(f"compiled decode differs from eager at sparsity {level} {dtype} quant={quant}: "
                            f"{same} same tokens, logits err {worst:.2e}")

    counters = torch._dynamo.utils.counters  # torch._dynamo is loaded by now (torch.compile above)
    graphs = counters["stats"]["unique_graphs"]
    recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    before = (graphs, dict(counters["inductor"]))
    set_uniform_thresholds(model, capture_inputs(model, prompt), 0.3)
    model.setup_caches(1, 128)
    gen.generate(prompt, 8)
    after = (counters["stats"]["unique_graphs"], dict(counters["inductor"]))
    recompiled = after[0] != before[0]
    print(f"new sparsity level: unique graphs {before[0]} -> {after[0]}")
    if recompiled:
        failures.append("changing the sparsity level recompiled the decode step")
    report = {"failures": failures, "logit_errors": errs, "same_tokens": same, "measured_sparsity": measured,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "recorded": recorded}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("\n".join(failures) if failures else "ALL GPU CHECKS PASSED")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
