"""Every kernel against its PyTorch reference: odd sizes, fp16 and bf16, batch 1 and 3, sparsity 0 / 0.5 /
0.95, scalar and per-channel thresholds, poisoned outputs. On a machine without a GPU they run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import common, configs, decode_attention, gate_up_rows, reference, sparse_gemv, sparse_mlp
from kernels.formats import FLOAT, INT4, INT8, int4_group, rtn_int4, rtn_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the GLU epilogue rounds four times where the reference rounds (and the interpreter truncates)
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def thresholds_for(x, n_seg, sparsity, per_channel):
    """[n_seg, K] float32 thresholds giving about `sparsity` zeros on x, different per segment."""
    K = x.shape[-1]
    a = x.abs().float().reshape(-1, K)
    if sparsity == 0:
        return torch.zeros(n_seg, K, device=x.device)
    if per_channel:  # a per-input-channel vector, as the weight-aware criterion produces
        base = torch.quantile(a, sparsity, dim=0) if a.shape[0] > 1 else a[0] * sparsity
        scale = torch.rand(n_seg, K, device=x.device) * 0.4 + 0.8
        return (base * scale).contiguous()
    levels = torch.linspace(sparsity * 0.9, sparsity, n_seg).tolist()
    return torch.stack([torch.quantile(a.flatten(), s).expand(K) for s in levels]).contiguous()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


CASES = {  # name: (K, sizes, glu, residual)
    "qkv": (100, (48, 20, 20), False, False),
    "o+residual": (72, (37,), False, True),
    "gate_up": (90, (33, 33), True, False),
    "down+residual": (131, (45,), False, True),
    "qkv-even": (80, (64, 32, 32), False, False),  # segments multiples of BLOCK_N: the unmasked-column path
    "gate_up-even": (96, (32, 32), True, False),
}
C = configs.Config


def configs_for(M, K, sizes, glu, fmt=FLOAT):
    # batch 1: one program per column tile, split-K with a K range of several chunks, one warp (the list
    # compaction then spans several passes of the warp), and the default (int8 weights have their own)
    fma = [C(16, 16, 1, 4, 1, 0), C(16, 32, 3, 4, 1, 0), C(32, 16, 2, 1, 1, 0)] if M == 1 else []
    if fmt is INT8 and M == 1:  # what Llama-2-7B's int8 o and gate/up launch with on an H100 (128-row groups for o)
        fma += [configs.default_config(1, 4096, (4096,), False, fmt=INT8),
                configs.default_config(1, 4096, (11008, 11008), True, fmt=INT8)]
    return fma + [C(16, 16, 1, 4, 1, 1), C(32, 32, 4, 4, 2, 1),
                  configs.default_config(M, K, sizes, glu, n_sm=4, fmt=fmt)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_gemv_matches_reference(case, sparsity, M, dtype):
    check_sparse_gemv(case, sparsity, M, dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("case", ["qkv", "gate_up", "down+residual"])
def test_sparse_gemv_float32(case, sparsity):
    """fp32 inputs keep their values in a second list (16-bit inputs ride in the list entries)."""
    check_sparse_gemv(case, sparsity, 1, torch.float32)


def check_sparse_gemv(case, sparsity, M, dtype):
    K, sizes, glu, has_res = CASES[case]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    res = torch.randn(M, sizes[0] if glu else sum(sizes), dtype=dtype, device=DEVICE) if has_res else None
    for per_channel in (False, True):
        t = thresholds_for(x, len(sizes), sparsity, per_channel)
        ref = reference.sparse_gemv_ref(x.float(), w.float(), t, sizes, glu=glu,
                                          residual=None if res is None else res.float())
        n_out = ref.shape[1]
        for config in configs_for(M, K, sizes, glu):
            counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
            out = poisoned((M, n_out), dtype)
            sparse_gemv.launch(x, w, t, counters, sizes, glu, config, res, out)
            assert not out.isnan().any(), f"unwritten outputs with {config}"
            assert rel_err(out, ref) < TOL.get(dtype, 1e-5), (config, per_channel)
            assert not counters.any(), "the tile counters must be left at zero"


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("case", ["qkv", "o+residual", "gate_up", "down+residual"])
def test_sparse_gemv_int8(case, sparsity, M):
    """int8 weights with a scale per output column (quantize.rtn_int8), bf16 inputs: the kernel against the
    reference on the same int8 weights; also unreduced partials (scaled) and, for down, gate/up's int8 partials
    as its input."""
    K, sizes, glu, has_res = CASES[case]
    dtype = torch.bfloat16
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    q, scale = rtn_int8(torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5)
    res = torch.randn(M, sizes[0] if glu else sum(sizes), dtype=dtype, device=DEVICE) if has_res else None
    t = thresholds_for(x, len(sizes), sparsity, True)
    ref = reference.sparse_gemv_ref(x, q, t, sizes, glu=glu, residual=res, fmt=INT8, scale=scale)
    for config in configs_for(M, K, sizes, glu, fmt=INT8):
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(tuple(ref.shape), dtype)
        sparse_gemv.launch(x, q, t, counters, sizes, glu, config, res, out, fmt=INT8, scale=scale)
        assert not out.isnan().any() and not counters.any(), config
        assert rel_err(out, ref) < 2e-2, config
        if not has_res:
            P = configs.k_layout(K, config)[1]
            parts = torch.full((P, 2 if glu else 1, M, ref.shape[1]), float("nan"), device=DEVICE)
            sparse_gemv.launch(x, q, t, None, sizes, glu, config, None, parts, partial_out=True, fmt=INT8, scale=scale)
            assert rel_err(reference.parts_ref(parts, glu, dtype), ref) < 2e-2, config
    if glu:  # down (int8) from these partials
        qd, sd = rtn_int8(torch.randn(sizes[0], 40, device=DEVICE) / sizes[0] ** 0.5)
        h = reference.parts_ref(parts, True, dtype)
        td = halfway_thresholds(h, sparsity)
        r = torch.randn(M, 40, dtype=dtype, device=DEVICE)
        y = sparse_gemv.sparse_gemv(parts, qd, td, (40,), torch.zeros(64, dtype=torch.int32, device=DEVICE),
                                    configs_for(M, sizes[0], (40,), False, fmt=INT8)[-1], residual=r, fmt=INT8, scale=sd)
        assert y.dtype == dtype  # (the interpreter truncates bf16 casts where GPUs round: h differs by an ulp)
        tol = 5e-2 if common.INTERPRETED else 2e-2
        assert rel_err(y, reference.sparse_gemv_ref(h, qd, td, (40,), residual=r, fmt=INT8, scale=sd)) < tol


INT4_CASES = {  # name: (K, sizes, glu, residual): sizes whole int32 words (multiples of 8), K whole groups
    "qkv": (96, (48, 24, 24), False, False),
    "o+residual": (64, (40,), False, True),
    "gate_up": (96, (48, 48), True, False),
    "down+residual": (160, (56,), False, True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("case", list(INT4_CASES))
def test_sparse_gemv_int4(case, sparsity, M, dtype):
    """int4 weights (quantize.rtn_int4: eight to a word, a scale and offset per group of inputs): the kernel against
    the reference on the same weights (dequantized in float32); configs whose steps are smaller than a group, as
    large as one, and K ranges of one or several groups; also unreduced partials and, for down, gate/up's
    partials as its input."""
    K, sizes, glu, has_res = INT4_CASES[case]
    group = int4_group(K)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    q, scale = rtn_int4(torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5, group)
    res = torch.randn(M, sizes[0] if glu else sum(sizes), dtype=dtype, device=DEVICE) if has_res else None
    t = thresholds_for(x, len(sizes), sparsity, True)
    ref = reference.sparse_gemv_ref(x.float(), q, t, sizes, glu=glu, residual=None if res is None else res.float(),
                                    fmt=INT4, scale=scale)
    tol = TOL.get(dtype, 1e-5)
    fma = [C(16, 16, 1, 4, 1, 0), C(32, 32, 2, 1, 1, 0), C(8, 32, 3, 4, 1, 0)] if M == 1 else []
    for config in fma + [C(16, 16, 1, 4, 1, 1), configs.default_config(M, K, sizes, glu, n_sm=4, group=group)]:
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(tuple(ref.shape), dtype)
        sparse_gemv.launch(x, q, t, counters, sizes, glu, config, res, out, fmt=INT4, scale=scale)
        assert not out.isnan().any() and not counters.any(), config
        assert rel_err(out, ref) < tol, config
        if not has_res:
            P = configs.k_layout(K, config, group)[1]
            parts = torch.full((P, 2 if glu else 1, M, ref.shape[1]), float("nan"), device=DEVICE)
            sparse_gemv.launch(x, q, t, None, sizes, glu, config, None, parts, partial_out=True, fmt=INT4, scale=scale)
            assert rel_err(reference.parts_ref(parts, glu, dtype), ref) < tol, config
    if glu:  # down (int4, groups of 16 inputs) from these partials
        qd, sd = rtn_int4(torch.randn(sizes[0], 48, device=DEVICE) / sizes[0] ** 0.5, 16)
        h = reference.parts_ref(parts, True, dtype)
        td = halfway_thresholds(h, sparsity)
        r = torch.randn(M, 48, dtype=dtype, device=DEVICE)
        y = sparse_gemv.sparse_gemv(parts, qd, td, (48,), torch.zeros(64, dtype=torch.int32, device=DEVICE),
                                    C(16, 16, 2, 4, 1, int(M > 1)), residual=r, fmt=INT4, scale=sd)
        assert rel_err(y, reference.sparse_gemv_ref(h.float(), qd, td, (48,), residual=r.float(), fmt=INT4, scale=sd)) < tol


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("V", [512, 600], ids=["even", "odd"])
def test_int8_lm_head(V, M):
    """The int8 LM head as the decode step runs it: zero thresholds (every row streamed), the final RMSNorm fused
    from the last layer's sums of squares, the head's own launch config (256-column tiles; two K ranges and one)
    and a small one, against the reference on the same int8 weights."""
    K, dtype = 200, torch.bfloat16
    x = torch.randn(M, K, dtype=dtype, device=DEVICE) * 3
    g = (torch.rand(K, device=DEVICE) + 0.5).to(dtype)
    q, scale = rtn_int8(torch.randn(K, V, device=DEVICE) / K ** 0.5)
    t = torch.zeros(1, K, device=DEVICE)
    ref = reference.sparse_gemv_ref(reference.rms_norm_ref(x, g, 1e-5), q, t, (V,), fmt=INT8, scale=scale)
    head = configs.default_config(M, K, (V,), False, n_sm=4, fmt=INT8, head=True)
    cfgs = [head, head._replace(split_k=2), C(64, 32, 1, 4, 1, 0)] if M == 1 else [head]
    assert M > 1 or head.block_n == (256 if V % 256 == 0 else 64)
    for config in cfgs:
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(tuple(ref.shape), dtype)
        sparse_gemv.launch(x, q, t, counters, (V,), False, config, None, out, norm_weight=g,
                           ss_in=reference.sum_squares_ref(x, 32), eps=1e-5, fmt=INT8, scale=scale)
        assert not out.isnan().any() and not counters.any(), config
        assert rel_err(out, ref) < 2e-2, config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_sparse_gemv_k_range_over_several_compaction_chunks(sparsity, glu, dtype):
    """A K range longer than one compaction chunk (2048 inputs, e.g. Llama-2-70B's gate/up): the kept list and
    its positions carry over from chunk to chunk."""
    K, sizes = 2100, ((16, 16) if glu else (16,))
    x = torch.randn(1, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    t = thresholds_for(x, len(sizes), sparsity, True)
    ref = reference.sparse_gemv_ref(x.float(), w.float(), t, sizes, glu=glu)
    config = C(16, 64, 1, 4, 1, 0)
    assert configs.k_layout(K, config)[0] > 2048
    out = poisoned(tuple(ref.shape), dtype)
    sparse_gemv.launch(x, w, t, torch.zeros(4, dtype=torch.int32, device=DEVICE), sizes, glu, config, None, out)
    assert rel_err(out, ref) < TOL.get(dtype, 1e-5)


@pytest.mark.parametrize("M", [1, 2])
def test_sparse_gemv_skips_masked_rows(M):
    """Rows whose input is below threshold in every batch row must not be read: poison them."""
    K, N = 64, 40
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
    x[:, ::2] = 0.01  # below threshold in every row
    w = torch.randn(K, N, device=DEVICE, dtype=torch.float16) / 8
    t = torch.full((1, K), 0.05, device=DEVICE)
    ref = reference.sparse_gemv_ref(x.float(), w.float(), t, (N,))
    w[::2] = float("nan")  # any read of a skipped row would poison the result
    for config in ([C(16, 16, 2, 4, 1, 0), C(32, 16, 1, 1, 1, 0)] if M == 1 else [C(16, 16, 2, 4, 1, 1)]):
        out = poisoned((M, N), torch.float16)
        counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)
        sparse_gemv.launch(x, w, t, counters, (N,), False, config, None, out)
        assert rel_err(out, ref) < 2e-3, config


def test_sparse_gemv_op_and_union_over_batch():
    """The registered op; a row kept by one batch row does not leak into another row's sum."""
    K, N = 48, 24
    x = torch.randn(2, K, device=DEVICE, dtype=torch.bfloat16)
    x[1, :24] = 0.001  # row 1 drops the first half, row 0 keeps it: loaded, but only row 0 may use it
    w = (torch.randn(K, N, device=DEVICE) / 7).to(torch.bfloat16)
    t = torch.full((1, K), 0.01, device=DEVICE)
    counters = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    y = sparse_gemv.sparse_gemv(x, w, t, (N,), counters, C(16, 16, 2, 4, 1, 1))
    ref = reference.sparse_gemv_ref(x.float(), w.float(), t, (N,))
    assert rel_err(y, ref) < 1.5e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_gate_up_rows_matches_reference(sparsity, M, dtype):
    K, I = 70, 53
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    gate = torch.randn(M, I, dtype=dtype, device=DEVICE)
    w_up = (torch.randn(I, K, device=DEVICE) / K ** 0.5).to(dtype)
    a = torch.nn.functional.silu(gate.float()).abs()
    t = torch.quantile(a.flatten(), sparsity).expand(I).contiguous() if sparsity else torch.zeros(I, device=DEVICE)
    t = t * (torch.rand(I, device=DEVICE) * 0.4 + 0.8)  # per-row thresholds
    ref = gate_up_rows.gate_up_rows_ref(x.float(), gate.float(), w_up.float(), t)
    for config in [(8, 32, 4), (16, 16, 2), gate_up_rows.default_config(M)]:
        out = poisoned((M, I), dtype)
        gate_up_rows.launch(x, gate, w_up, t, config, out)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL[dtype]
        kept = ref != 0
        assert torch.equal(out != 0, kept) or sparsity == 0  # exact zeros where the mask is off
    y = gate_up_rows.gate_up_rows(x, gate, w_up, t, gate_up_rows.default_config(M))
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("case", ["qkv", "gate_up", "gate_up-even"])
def test_sparse_gemv_fused_rmsnorm(case, sparsity, M, dtype):
    """RMSNorm inside the kernel: x is the raw residual stream, its sums of squares come from the producer
    (any column tiling: the consumer adds them up), thresholds apply to the normalised input."""
    interpreted = common.INTERPRETED and dtype == torch.bfloat16
    if interpreted and sparsity > 0:
        pytest.skip("Triton's interpreter truncates bf16 casts (GPUs round), which moves normalised activations "
                    "across thresholds; scripts/gpu_check.py covers this case on the GPU")
    tol = 5e-2 if interpreted else TOL.get(dtype, 1e-5)  # two more truncated roundings than the unfused kernel
    K, sizes, glu, _ = CASES[case]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE) * 3
    g = (torch.rand(K, device=DEVICE) + 0.5).to(dtype)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    xn = reference.rms_norm_ref(x, g, 1e-5)
    # a threshold halfway between two activations: the interpreter truncates bf16 casts where GPUs round, and
    # an activation sitting on the threshold would flip
    v = xn.abs().float().flatten().sort().values
    i = max(1, int(sparsity * v.numel()))
    t = torch.full((len(sizes), K), float((v[i - 1] + v[i]) / 2) if sparsity else 0.0, device=DEVICE)
    # the normalised input rounded to the dtype, as the model's RMSNorm and the kernel round it
    ref = reference.sparse_gemv_ref(xn.float(), w.float(), t, sizes, glu=glu)
    for config, tiles in zip(configs_for(M, K, sizes, glu), (16, 7, 32, 64, 128)):
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(ref.shape, dtype)
        sparse_gemv.launch(x, w, t, counters, sizes, glu, config, None, out, norm_weight=g,
                           ss_in=reference.sum_squares_ref(x, tiles), eps=1e-5)
        assert not out.isnan().any()
        assert rel_err(out, ref) < tol, config


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_residual_projection_feeds_the_next_norm(dtype, M):
    """A residual projection's per-tile sums of squares (ss_out) are those of the stream it writes, and a
    following projection normalising with them matches RMSNorm of that stream."""
    K, N = 72, 80
    x, res = torch.randn(M, K, dtype=dtype, device=DEVICE), torch.randn(M, N, dtype=dtype, device=DEVICE) * 3
    w = (torch.randn(K, N, device=DEVICE) / K ** 0.5).to(dtype)
    t = torch.zeros(1, K, device=DEVICE)
    g = (torch.rand(N, device=DEVICE) + 0.5).to(dtype)
    sizes2 = (32, 16, 16)
    w2 = (torch.randn(N, sum(sizes2), device=DEVICE) / N ** 0.5).to(dtype)
    t2 = torch.full((3, N), 0.3, device=DEVICE)
    for config in configs_for(M, K, (N,), False):
        n_tiles = configs.counters_size((N,), False, config.block_n)
        h, ss = poisoned((M, N), dtype), torch.full((M, n_tiles), float("nan"), device=DEVICE)
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        sparse_gemv.launch(x, w, t, counters, (N,), False, config, res, h, ss_out=ss)
        ref = reference.sparse_gemv_ref(x.float(), w.float(), t, (N,), residual=res.float())
        assert rel_err(h, ref) < TOL.get(dtype, 1e-5)
        assert rel_err(ss, reference.sum_squares_ref(h, config.block_n)) < 1e-5, config
        y = poisoned((M, sum(sizes2)), dtype)
        sparse_gemv.launch(h, w2, t2, counters, sizes2, False, config, None, y, norm_weight=g, ss_in=ss)
        hn = reference.rms_norm_ref(h, g, 1e-5)  # rounded where the model rounds
        ref2 = reference.sparse_gemv_ref(hn.float(), w2.float(), t2, sizes2)
        assert rel_err(y, ref2) < TOL.get(dtype, 1e-5), config
        assert not counters.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("case", ["qkv", "gate_up"])
def test_sparse_gemv_partial_sums(case, sparsity, M, dtype):
    """partial_out: one unreduced float32 partial per program along K, which add up to the projection (gate
    and up before the GLU); every partial is written."""
    K, sizes, glu, _ = CASES[case]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    t = thresholds_for(x, len(sizes), sparsity, per_channel=True)
    n_out = sizes[0] if glu else sum(sizes)
    halves = reference.sparse_gemv_ref(x.float(), w.float(), t, sizes).view(M, -1, n_out).transpose(0, 1)
    for config in configs_for(M, K, sizes, glu):
        P = configs.k_layout(K, config)[1]
        parts = poisoned((P, 2 if glu else 1, M, n_out), torch.float32)
        sparse_gemv.launch(x, w, t, None, sizes, glu, config, None, parts, partial_out=True)
        assert not parts.isnan().any(), f"unwritten partials with {config}"
        assert rel_err(parts.sum(0), halves) < 1e-5, config  # float32 sums of the same products
        # the op returns the same partials
        op = sparse_gemv.sparse_gemv_parts(x, w, t, sizes, config, glu=glu)
        assert op.shape == parts.shape and rel_err(op, parts) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_down_projection_from_gate_up_partials(sparsity, M, dtype):
    """The down kernel fed gate/up partials [P, 2, M, K] sums them and applies the GLU as it loads its input:
    the result is the down projection (with residual and sums of squares) of silu(gate) * up."""
    if common.INTERPRETED and dtype == torch.bfloat16 and sparsity > 0:
        pytest.skip("Triton's interpreter truncates bf16 casts (GPUs round), which moves the gated inputs across "
                    "thresholds; scripts/gpu_check.py covers this case on the GPU")
    K, N = 131, 45
    parts = torch.randn(3, 2, M, K, device=DEVICE) * 2
    h = reference.parts_ref(parts, True, dtype)  # [M, K]: what the kernel sees, rounded as the GLU rounds
    v = h.abs().float().flatten().sort().values  # thresholds halfway between two inputs (see the norm test)
    i = max(1, int(sparsity * v.numel()))
    t = torch.full((1, K), float((v[i - 1] + v[i]) / 2) if sparsity else 0.0, device=DEVICE)
    w = (torch.randn(K, N, device=DEVICE) / K ** 0.5).to(dtype)
    res = torch.randn(M, N, dtype=dtype, device=DEVICE)
    ref = reference.sparse_gemv_ref(h.float(), w.float(), t, (N,), residual=res.float())
    for config in configs_for(M, K, (N,), False):
        n_tiles = configs.counters_size((N,), False, config.block_n)
        out, ss = poisoned((M, N), dtype), torch.full((M, n_tiles), float("nan"), device=DEVICE)
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        sparse_gemv.launch(parts, w, t, counters, (N,), False, config, res, out, ss_out=ss)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL.get(dtype, 1e-5), config
        assert rel_err(ss, reference.sum_squares_ref(out, config.block_n)) < 1e-5, config
        assert not counters.any()
    y, _ = sparse_gemv.sparse_gemv_ss(parts, w, t, (N,), counters, configs_for(M, K, (N,), False)[-1], res)
    assert y.dtype == dtype and rel_err(y, ref) < TOL.get(dtype, 1e-5)


ATTENTION = {  # name: (n_head, n_kv_head, head_dim, cache length, window)
    "mha": (4, 4, 32, 40, None),
    "gqa": (6, 2, 32, 100, None),
    "gqa-d64": (4, 1, 64, 300, None),
    "window": (8, 2, 32, 64, 5),
}


def halfway_thresholds(a, sparsity):
    """[1, K] thresholds giving about `sparsity` zeros on a [1, K], each halfway between two of its values: a
    rounding difference between kernel and reference then never flips an input across its threshold."""
    v = a.abs().float().flatten().sort().values
    i = max(1, int(sparsity * v.numel()))
    return torch.full((1, a.shape[-1]), float((v[i - 1] + v[i]) / 2) if sparsity else 0.0, device=a.device)


MLP_CONFIGS = [C(32, 16, 1, 4, 1, 0), C(32, 32, 3, 4, 1, 0), C(16, 64, 2, 1, 1, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("D,I", [(72, 96), (130, 200)])
def test_sparse_mlp_matches_reference(D, I, sparsity, dtype):
    """The whole MLP in one launch (batch 1, norm fused) against the reference, and against the two launches it
    replaces (gate/up partials, then down from them), which round where it rounds: odd sizes (the last gate/up
    tile and the last output slice partial), one to three programs along K, fp32 lists of kept rows."""
    interpreted_bf16 = common.INTERPRETED and dtype == torch.bfloat16
    x = torch.randn(1, D, device=DEVICE).to(dtype) * 3
    g = (torch.rand(D, device=DEVICE) + 0.5).to(dtype)
    ss_in = reference.sum_squares_ref(x, 16)
    w = (torch.randn(D, 2 * I, device=DEVICE) / D ** 0.5).to(dtype)
    wd = (torch.randn(I, D, device=DEVICE) / I ** 0.5).to(dtype)
    t = halfway_thresholds(reference.rms_norm_ref(x, g, 1e-5), sparsity).expand(2, D).contiguous()
    t[1] *= 0.9  # gate and up keep different inputs
    h = reference.sparse_gemv_ref(reference.rms_norm_ref(x, g, 1e-5), w, t, (I, I), glu=True)
    td = halfway_thresholds(h, sparsity)
    ref = reference.sparse_mlp_ref(x, w, t, wd, td, g, 1e-5)
    for config in MLP_CONFIGS + [configs.default_config(1, D, (I, I), True, n_sm=4)]:
        for dcfg in (configs.default_down_config(D, I, config), configs.DownConfig(32, 4, 3)):
            out, ss = poisoned((1, D), dtype), torch.full((1, dcfg.n_red), float("nan"), device=DEVICE)
            counters = torch.zeros(configs.mlp_counters_size(I, config) + 8, dtype=torch.int32, device=DEVICE)
            sparse_mlp.launch_mlp(x, w, t, wd, td, counters, config, dcfg, out, ss, norm_weight=g, ss_in=ss_in)
            assert not out.isnan().any() and not counters.any(), (config, dcfg)
            red_d = triton.next_power_of_2(triton.cdiv(D, dcfg.n_red))
            assert rel_err(ss, reference.sum_squares_ref(out, red_d)) < 1e-5, (config, dcfg)
            # the two launches of the deferred path, with the same kernel code (and the interpreter's roundings)
            parts = sparse_gemv.sparse_gemv_parts(x, w, t, (I, I), config, glu=True, norm_weight=g, ss_in=ss_in)
            pair = sparse_gemv.launch(parts, wd, td, torch.zeros(64, dtype=torch.int32, device=DEVICE), (D,), False,
                                      C(32, 16, 2, 4, 1, 0), x, poisoned((1, D), dtype))
            assert rel_err(out, pair) < TOL.get(dtype, 1e-5) / 10, (config, dcfg)
            if not interpreted_bf16 or sparsity == 0:  # the interpreter truncates bf16 casts where GPUs round
                assert rel_err(out, ref) < (5e-2 if interpreted_bf16 else TOL.get(dtype, 1e-5)), (config, dcfg)
    config = configs.default_config(1, D, (I, I), True, n_sm=4)
    dcfg = configs.default_down_config(D, I, config)
    counters = torch.zeros(configs.mlp_counters_size(I, config), dtype=torch.int32, device=DEVICE)
    y, ss = sparse_mlp.sparse_mlp(x, w, t, wd, td, counters, config, dcfg, g, ss_in)
    assert y.dtype == dtype and ss.shape == (1, dcfg.n_red) and rel_err(y, out) < 1e-6 and not counters.any()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_sparse_mlp_int8(sparsity):
    """The one-launch MLP on int8 gate/up and down weights against the reference on the same weights."""
    D, I, dtype = 72, 96, torch.bfloat16
    x = torch.randn(1, D, device=DEVICE).to(dtype) * 3
    g = (torch.rand(D, device=DEVICE) + 0.5).to(dtype)
    ss_in = reference.sum_squares_ref(x, 16)
    q, s = rtn_int8(torch.randn(D, 2 * I, device=DEVICE) / D ** 0.5)
    qd, sd = rtn_int8(torch.randn(I, D, device=DEVICE) / I ** 0.5)
    t = halfway_thresholds(reference.rms_norm_ref(x, g, 1e-5), sparsity).expand(2, D).contiguous()
    h = reference.sparse_gemv_ref(reference.rms_norm_ref(x, g, 1e-5), q, t, (I, I), glu=True, fmt=INT8, scale=s)
    td = halfway_thresholds(h, sparsity)
    ref = reference.sparse_mlp_ref(x, q, t, qd, td, g, 1e-5, fmt=INT8, scale=s, scale_down=sd)
    for config in MLP_CONFIGS:
        dcfg = configs.default_down_config(D, I, config)
        counters = torch.zeros(configs.mlp_counters_size(I, config), dtype=torch.int32, device=DEVICE)
        y, ss = sparse_mlp.sparse_mlp(x, q, t, qd, td, counters, config, dcfg, g, ss_in, fmt=INT8, scale=s, scale_down=sd)
        assert not counters.any() and not y.isnan().any()
        assert rel_err(y, ref) < 5e-2 if common.INTERPRETED and sparsity else rel_err(y, ref) < 2e-2, config


def test_sparse_mlp_rejects_what_it_does_not_serve():
    x, w, wd = torch.randn(2, 64), torch.randn(64, 64), torch.randn(32, 64)
    cfg, dcfg = configs.default_config(1, 64, (32, 32), True, n_sm=4), configs.DownConfig(64, 8, 4)
    counters = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(AssertionError, match="batch 1"):
        sparse_mlp.launch_mlp(x, w, torch.zeros(2, 64), wd, torch.zeros(1, 32), counters, cfg, dcfg,
                               torch.empty(2, 64), torch.empty(1, 4))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_decode_attention_matches_reference(case, B, dtype):
    """Fresh caches, positions at the first entry, on both sides of a split boundary and at the cache end."""
    H, Hkv, D, T, window = ATTENTION[case]
    block_t = 16
    split = decode_attention.split_size(T, block_t)
    angles = torch.rand(D // 2, device=DEVICE) * 6
    rope = torch.stack([angles.cos(), angles.sin()], -1)[None].float()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for pos in sorted({0, split - 1, split, T - 1}):
        qkv = torch.randn(B, (H + 2 * Hkv) * D, dtype=dtype, device=DEVICE)
        k = torch.randn(B + 1, Hkv, T, D, dtype=dtype, device=DEVICE)
        v = torch.randn(B + 1, Hkv, T, D, dtype=dtype, device=DEVICE)
        k_ref, v_ref = k.double(), v.double()
        ref = decode_attention.decode_attention_ref(qkv.double(), rope.double(), k_ref, v_ref, pos, H, window)
        counters = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
        out = poisoned((B, H * D), dtype)
        decode_attention.launch(qkv, rope, k, v, torch.tensor([pos], device=DEVICE), counters, H, window, out,
                                block_t=block_t)
        assert not out.isnan().any() and not counters.any()
        assert rel_err(out, ref) < tol, pos
        assert rel_err(k[:B, :, pos], k_ref[:B, :, pos]) < tol, "the rotated key is cached"
        assert torch.equal(v[:B, :, pos].double(), v_ref[:B, :, pos]), "the value is cached"
        others = torch.ones(T, dtype=torch.bool, device=DEVICE)
        others[pos] = False
        assert torch.equal(k[:, :, others].double(), k_ref[:, :, others]), "only the new position is written"
        assert torch.equal(k[B:].double(), k_ref[B:]), "only the batch's rows are written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 3])
def test_decode_attention_from_qkv_partials(B, dtype):
    """q/k/v as the projection's unreduced partials [P, B, N] float32: summed in the kernel, rounded to the
    cache dtype, then the same attention and cache writes as from the reduced projection."""
    H, Hkv, D, T, window = ATTENTION["gqa"]
    angles = torch.rand(D // 2, device=DEVICE) * 6
    rope = torch.stack([angles.cos(), angles.sin()], -1)[None].float()
    parts = torch.randn(3, B, (H + 2 * Hkv) * D, device=DEVICE) * 0.6  # sums of unit scale, like the other cases
    qkv = reference.parts_ref(parts[:, None], False, dtype)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, Hkv, T, D, dtype=dtype, device=DEVICE)
    for pos in (0, 50, T - 1):
        k_ref, v_ref = k.double(), v.double()
        ref = decode_attention.decode_attention_ref(qkv.double(), rope.double(), k_ref, v_ref, pos, H, window)
        counters = torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE)
        out = poisoned((B, H * D), dtype)
        decode_attention.launch(parts, rope, k, v, torch.tensor([pos], device=DEVICE), counters, H, window, out,
                                block_t=16)
        assert not out.isnan().any() and not counters.any()
        tol = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}[dtype]  # the interpreter truncates bf16 casts
        assert rel_err(out, ref) < tol, pos
        assert rel_err(v[:, :, pos], v_ref[:, :, pos]) < tol and rel_err(k[:, :, pos], k_ref[:, :, pos]) < tol
    y = decode_attention.decode_attention(parts, rope, k, v, torch.tensor([T - 1], device=DEVICE),
                                          torch.zeros(B * Hkv, dtype=torch.int32, device=DEVICE), H, window)
    assert y.dtype == dtype and y.shape == (B, H * D)


def test_decode_attention_op():
    H, Hkv, D, T, _ = ATTENTION["gqa"]
    qkv = torch.randn(1, (H + 2 * Hkv) * D, device=DEVICE)
    k, v = torch.randn(1, Hkv, T, D, device=DEVICE), torch.randn(1, Hkv, T, D, device=DEVICE)
    angles = torch.rand(D // 2, device=DEVICE) * 6
    rope = torch.stack([angles.cos(), angles.sin()], -1)[None]
    ref = decode_attention.decode_attention_ref(qkv.clone(), rope, k.clone(), v.clone(), 70, H)
    y = decode_attention.decode_attention(qkv, rope, k, v, torch.tensor([70], device=DEVICE),
                                          torch.zeros(Hkv, dtype=torch.int32, device=DEVICE), H, None)
    assert rel_err(y, ref) < 1e-5


def test_decode_step_traces_whole_and_kernels_write_only_outputs():
    """tests/compile_checks.py, in a process without the interpreter: the decode step traces with fullgraph
    through the kernel ops, torch.compile's analysis finds every launch writing only its outputs and
    workspaces (an input it could not rule out would be cloned on every call: a weight, a full copy per token),
    and every launch of real-shape decode steps compiles to an sm_90 cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tests" / "compile_checks.py")], capture_output=True, text=True,
                       env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "assuming every input is mutated" not in r.stderr, r.stderr
    assert re.search(r"sm_90 builds of the decode step's launches: \d+ distinct, 0 failed", r.stdout), r.stdout
