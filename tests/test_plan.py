"""plan.py: how a DecodePlan routes each call (projection, attention, deferred partials, fused MLP), its variants
(at_level, materialised), decode_plan on a CPU, and Transformer.set_plan fitting a plan to the model's weights and
heads while keeping the buffers a captured CUDA graph reads."""
from dataclasses import fields, replace

import pytest
import torch

import plan as plan_module
from errors import UserError
from kernels.common import MAX_ROWS
from kernels.formats import AWQ, FLOAT, INT4, INT8
from loading import random_model
from model import FeedForward, ModelArgs, SparseLinear
from plan import REFERENCE, DecodePlan, decode_plan
from quantization import quantize_model

CPU = torch.device("cpu")
ACTIVE = torch.tensor([False, True])  # partial prefill sparsity: some positions keep dense inputs


def test_projection_routes():
    on, off = DecodePlan(kernels=True), DecodePlan(kernels=False)
    for p in (on, off):
        assert p.projection(1, False, None) == "dense"  # not sparse: x @ W whatever else holds
        assert p.projection(1, False, ACTIVE) == "dense"
    assert on.projection(1, True, None) == "kernel" and on.projection(MAX_ROWS, True, None) == "kernel"
    assert on.projection(MAX_ROWS + 1, True, None) == "sparse"  # more rows than a kernel serves
    assert on.projection(1, True, ACTIVE) == "sparse"
    assert off.projection(1, True, None) == "sparse"  # the reference path with thresholds


def test_fused_launch_conditions():
    p = DecodePlan(kernels=True)
    assert p.attention(1, 1, None) and p.attention(MAX_ROWS, 1, None)
    assert not p.attention(1, 2, None) and not p.attention(MAX_ROWS + 1, 1, None) and not p.attention(1, 1, ACTIVE)
    assert not replace(p, attention_kernel=False).attention(1, 1, None)
    assert not DecodePlan(kernels=False).attention(1, 1, None)
    assert p.defers(3, True, None) and not p.defers(3, False, None) and not p.defers(MAX_ROWS + 1, True, None)
    assert not replace(p, defer_reduction=False).defers(1, True, None)
    assert p.fused_mlp(1, True, None)
    assert not p.fused_mlp(2, True, None)  # batch 1 only
    assert not p.fused_mlp(1, False, None) and not p.fused_mlp(1, True, ACTIVE)
    assert not replace(p, quantized=True).fused_mlp(1, True, None)  # quantized weights: two launches
    assert not replace(p, fuse_norm=False).fused_mlp(1, True, None)  # the MLP kernel takes the norm fused only
    assert not replace(p, fuse_mlp=False).fused_mlp(1, True, None)
    assert not DecodePlan(kernels=False).fused_mlp(1, True, None)


def test_nvrtc_route_by_weights_and_level():
    """Batch-1 steps on kernels/cuda_gemv.py (plan.cuda): 16-bit dense and sparse ones, int8 weights' at every level,
    never several rows or active rows; thresholds applied except at level 0 (cuda_thresholds: int8 steps there stay
    on the sparse route, and the kernel's dense mode is faster: docs/perf-notes.md, session 36)."""
    p = DecodePlan(kernels=True, nvrtc_arch=90, nvrtc_sparse=True, nvrtc_int8=True)
    for level in (0.0, 0.5):
        f = p.at_level(level)
        assert f.cuda(1, level > 0, None)
        assert not f.cuda(2, True, None) and not f.cuda(1, True, ACTIVE)
    assert not replace(p, nvrtc_sparse=False).at_level(0.5).cuda(1, True, None)
    assert replace(p, nvrtc_sparse=False).at_level(0.0).cuda(1, False, None)
    q = replace(p, quantized=True)
    assert q.at_level(0.5).cuda(1, True, None) and q.at_level(0.0).cuda(1, True, None)
    assert q.at_level(0.5).cuda_thresholds(True) and not q.at_level(0.0).cuda_thresholds(True)
    assert not q.at_level(0.5).cuda_thresholds(False)
    assert not replace(q, nvrtc_int8=False).at_level(0.5).cuda(1, True, None)
    assert not replace(p, nvrtc_arch=0).at_level(0.5).cuda(1, True, None)


def test_nvrtc_weights_by_format():
    """Which stored weights may take kernels/cuda_gemv.py: 16-bit wherever nvrtc_arch is set, int8 with nvrtc_int8,
    int4 (RTN or AWQ) only with nvrtc_int4 (off by default: slower than Gluon's kernels, perf-notes session 44)."""
    p = DecodePlan(kernels=True, nvrtc_arch=90, nvrtc_sparse=True, nvrtc_int8=True)
    assert p.nvrtc_weights(FLOAT) and p.nvrtc_weights(INT8)
    assert not p.nvrtc_weights(INT4) and not p.nvrtc_weights(AWQ)
    assert replace(p, nvrtc_int4=True).nvrtc_weights(INT4) and replace(p, nvrtc_int4=True).nvrtc_weights(AWQ)
    assert not replace(p, nvrtc_int8=False).nvrtc_weights(INT8)
    assert not replace(p, nvrtc_arch=75, nvrtc_int4=True).nvrtc_weights(INT4)  # mma.sync in bf16: sm_80 on
    assert not replace(p, nvrtc_arch=0).nvrtc_weights(FLOAT)


def test_at_level_and_materialised():
    p = DecodePlan(kernels=True)
    assert not p.at_level(0.0).sparse_decode and p.at_level(0.25).sparse_decode
    assert replace(p, quantized=True).at_level(0.0).sparse_decode  # zero thresholds on the kernels are dense
    assert p.at_level(0.0).zero_level and not p.at_level(0.25).zero_level
    m = p.materialised()
    assert not m.defer_reduction and not m.fuse_mlp
    assert not m.defers(1, True, None) and not m.fused_mlp(1, True, None)
    assert m.projection(1, True, None) == "kernel" and m.attention(1, 1, None)  # nothing else changes
    assert {f.name for f in fields(p) if getattr(p, f.name) != getattr(m, f.name)} == {"defer_reduction", "fuse_mlp"}
    assert REFERENCE == DecodePlan() and not REFERENCE.kernels


def test_decode_plan_on_cpu(monkeypatch):
    p = decode_plan(CPU)
    assert not p.kernels and p.n_sm == 0 and not p.sparse_decode and not p.quantized
    assert decode_plan(CPU, sparsity=0.5).sparse_decode
    q = decode_plan(CPU, INT8, sparsity=0.0)
    assert q.quantized and q.sparse_decode
    assert not decode_plan(CPU, fuse_mlp=False, defer_reduction=False).fuse_mlp
    monkeypatch.setattr(plan_module, "INTERPRETED", True)  # Triton's interpreter: the kernels run on the CPU
    k = decode_plan(CPU, kernels=True)
    assert k.kernels and k.n_sm == plan_module.n_sm_of(CPU)
    monkeypatch.setattr(plan_module, "INTERPRETED", False)
    with pytest.raises(UserError, match="CUDA"):
        decode_plan(CPU, kernels=True)
    built = decode_plan(CPU, kernels=True, n_sm=132)  # building a GPU's launches on the CPU (scripts/sm90.py)
    assert built.kernels and built.n_sm == 132


def small_model(**over):
    args = ModelArgs(**{**dict(dim=128, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=192, vocab_size=101,
                               max_seq_len=64), **over})
    return random_model(args, "cpu", torch.float32)


def kernel_plan(**kw):
    return decode_plan(CPU, kernels=True, n_sm=4, **kw)  # (n_sm given: no interpreter needed, nothing runs)


def test_set_plan_fits_the_weights_and_heads():
    model = small_model()
    model.set_plan(kernel_plan(sparsity=0.0))
    assert model.plan.attention_kernel and not model.plan.quantized and not model.plan.sparse_decode
    quantize_model(model, INT8)
    model.set_plan(kernel_plan(sparsity=0.0))  # a FLOAT plan: set_plan reads the format from the weights
    assert model.plan.quantized and model.plan.sparse_decode
    odd = small_model(dim=96, n_head=2, n_kv_head=1)  # head_dim 48: not a power of two
    odd.set_plan(kernel_plan(sparsity=0.5))
    assert odd.args.head_dim == 48 and not odd.plan.attention_kernel and odd.plan.kernels


def test_set_plan_keeps_buffers_when_only_flags_change():
    """A second plan differing only in sparse_decode (a new level) keeps every counters buffer and launch config
    (the same objects: a captured CUDA graph reads them); another SM count sizes them anew."""
    model = small_model()
    model.set_plan(kernel_plan(sparsity=0.5))

    def buffers():
        return [(m, m.counters, m.kernel_configs if isinstance(m, SparseLinear) else m.down_config)
                for m in model.modules() if isinstance(m, (SparseLinear, FeedForward)) and hasattr(m, "counters")]

    before = buffers()
    assert len(before) == 5 * model.args.n_layer  # per layer: wqkv, wo, w13, w2 and the one-launch MLP's
    model.set_plan(model.plan.at_level(0.0))
    assert not model.plan.sparse_decode
    assert all(a is c and b is d and e is f for (a, b, e), (c, d, f) in zip(before, buffers()))
    model.set_plan(replace(model.plan, n_sm=8))
    assert all(b is not d for (_, b, _), (_, d, _) in zip(before, buffers()))


def test_masked_stream_sets_the_batch1_configs():
    """plan.masked_stream: every batch-1 16/8-bit projection (not the int8 LM head, never thresholded) launches the
    masked stream (without it, 16-bit o alone), and a model's launch configs are made anew when the flag changes
    (the decode's logits: tests/test_model.py)."""
    model = small_model()
    model.set_plan(kernel_plan(sparsity=0.5))
    linears = [m for m in model.modules() if isinstance(m, SparseLinear)]
    o = [m.kernel_configs[1].masked == 1 for m in linears if len(m.sizes) == 1 and m.in_features <= m.sizes[0]]
    assert o and all(o) and sum(m.kernel_configs[1].masked for m in linears) == len(o)  # by default: 16-bit o alone
    model.set_plan(replace(model.plan, masked_stream=True))
    assert all(m.kernel_configs[1].masked == 1 and m.kernel_configs[2].masked == 0 for m in linears)
    quantized = small_model()
    quantize_model(quantized, INT8)
    quantized.set_plan(replace(kernel_plan(sparsity=0.5), masked_stream=True))
    heads = [m.head for m in quantized.modules() if isinstance(m, SparseLinear)]
    assert any(heads) and all(m.kernel_configs[1].masked == (0 if m.head else 1) for m in quantized.modules()
                              if isinstance(m, SparseLinear))


def test_nvrtc_attention_needs_the_nvrtc_route():
    """nvrtc_attention without the NVRTC projections on an sm_90 GPU (here: a CPU) is refused with one clear line."""
    with pytest.raises(UserError, match="NVRTC attention"):
        decode_plan(torch.device("cpu"), nvrtc_attention=True)
    assert not decode_plan(torch.device("cpu")).nvrtc_attention


def test_nvrtc_attention_follows_the_nvrtc_route(monkeypatch):
    """On an sm_90 GPU with libnvrtc (simulated here) the NVRTC attention comes with the NVRTC projections unless
    told off; off without them; asked for without them, refused."""
    monkeypatch.setattr(plan_module.cuda_gemv, "usable", lambda index: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = torch.device("cuda", 0)
    assert decode_plan(gpu, n_sm=132).nvrtc_attention
    assert not decode_plan(gpu, n_sm=132, nvrtc_attention=False).nvrtc_attention
    assert not decode_plan(gpu, n_sm=132, nvrtc=False).nvrtc_attention
    with pytest.raises(UserError, match="NVRTC attention"):
        decode_plan(gpu, n_sm=132, nvrtc=False, nvrtc_attention=True)
    # the attention under PDL (q/k/v triggering it at its start) comes with it; 4 or 0 where told
    assert decode_plan(gpu, n_sm=132).attention_pdl == 3
    assert decode_plan(gpu, n_sm=132, attention_pdl=4).attention_pdl == 4
    assert decode_plan(gpu, n_sm=132, attention_pdl=0).attention_pdl == 0
    assert decode_plan(gpu, n_sm=132, nvrtc_attention=False).attention_pdl == 0
    for bad in (dict(attention_pdl=3, nvrtc_attention=False), dict(attention_pdl=1)):
        with pytest.raises(UserError, match="--attention-pdl"):
            decode_plan(gpu, n_sm=132, **bad)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # no NVRTC route by default
    assert not decode_plan(gpu, n_sm=132).nvrtc_attention and decode_plan(gpu, n_sm=132).attention_pdl == 0
