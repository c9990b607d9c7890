"""model.py: logits against transformers (prefill and decode), masks, named configs, compiled against eager, zero
thresholds, the kernel layout, and the decode on the Triton kernels (interpreted on CPU) against the reference path."""
import copy
import dataclasses
import re

import pytest
import torch

from errors import UserError
from kernels import cuda_attention, cuda_gemv, sparse_mlp
from loading import load_model, random_model
from model import CONFIGS, ModelArgs, Transformer, attention_mask
from plan import decode_plan
from kernels.formats import quant_format
from quantization import quantize_model
from sparsity import capture_inputs, set_uniform_thresholds
from tests.helpers import VARIANTS, hf_checkpoint, reference_and_kernel_models


def decode_both(ref_model, model, prompt, steps, cache_len, **step_kw):
    """Both models prefilled densely with prompt [B, P], then fed steps [B, n] one position at a time: the
    (reference, model) logits of each step."""
    P, out = prompt.shape[1], []
    with torch.no_grad():
        for m in (ref_model, model):
            m.setup_caches(prompt.shape[0], cache_len)
            m(prompt, torch.arange(P), sparse_from=None)
        for i in range(steps.shape[1]):
            pos = torch.tensor([P + i])
            out.append(tuple(m(steps[:, i:i + 1], pos, **step_kw) for m in (ref_model, model)))
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_prefill_and_decode(variant, tmp_path):
    hf, _, ckpt = hf_checkpoint(variant, tmp_path)
    model = load_model(ckpt)
    B, T = 2, 12
    idx = torch.randint(0, hf.config.vocab_size, (B, T))
    with torch.no_grad():
        ref = hf(idx).logits
    model.setup_caches(B, 16)
    with torch.no_grad():
        full = model(idx, torch.arange(T), sparse_from=None)
    assert rel_err(full, ref) < 1e-5
    model.setup_caches(B, 32)  # a fresh cache: decode one token at a time through it
    with torch.no_grad():
        steps = torch.cat([model(idx[:, i:i + 1], torch.tensor([i])) for i in range(T)], dim=1)
    assert rel_err(steps, ref) < 1e-5


def test_sliding_window_mask():
    m = attention_mask(torch.tensor([0, 3, 6]), 8, window=3)
    assert m.tolist() == [
        [True, False, False, False, False, False, False, False],
        [False, True, True, True, False, False, False, False],
        [False, False, False, False, True, True, True, False],
    ]


def test_named_configs_build():
    for name in CONFIGS:
        a = ModelArgs.from_name(name)
        assert a.n_head % a.n_kv_head == 0 and a.head_dim * a.n_head >= a.dim // 2
    a = ModelArgs.from_name("llama-2-7b")
    # non-embedding parameters of Llama-2-7B: 6.61e9 (13.21 GB in fp16)
    assert abs(a.n_params() * 2 / 1e9 - 13.21) < 0.01
    assert ModelArgs.from_name("mistral-7b-v0.1").sliding_window == 4096
    assert ModelArgs.from_name("llama-3.1-8b").rope_scaling["factor"] == 8.0


def test_unknown_architecture_refused():
    with pytest.raises(UserError, match="Qwen2ForCausalLM"):
        ModelArgs.from_hf_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8})
    with pytest.raises(UserError, match="unknown model config"):
        ModelArgs.from_name("gpt-5")


def test_compiled_equals_eager(tmp_path):
    _, _, ckpt = hf_checkpoint("gqa-tied", tmp_path)
    model = load_model(ckpt)
    model.setup_caches(1, 16)
    idx = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        eager = [model(idx, torch.arange(6))]
        eager += [model(idx[:, i:i + 1], torch.tensor([6 + i])) for i in range(3)]
        step = torch.compile(model, fullgraph=True)
        comp = [model(idx, torch.arange(6))]
        comp += [step(idx[:, i:i + 1], torch.tensor([6 + i])) for i in range(3)]
    for a, b in zip(comp, eager):
        assert rel_err(a, b) < 1e-5


def test_zero_thresholds_are_dense(tmp_path):
    _, _, ckpt = hf_checkpoint("gqa-tied", tmp_path)
    model = load_model(ckpt)
    model.setup_caches(1, 16)
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        dense = model(idx, torch.arange(10), sparse_from=None)
        sparse = model(idx, torch.arange(10), sparse_from=0)
    assert torch.equal(dense, sparse)


def test_meta_model_has_kernel_layout():
    with torch.device("meta"):
        m = Transformer(ModelArgs.from_name("llama-3-8b"))
    att = m.layers[0].attention
    assert tuple(att.wqkv.weight.shape) == (4096, 4096 + 2 * 1024)
    assert tuple(att.wqkv.threshold.shape) == (3, 4096)
    assert tuple(m.layers[0].feed_forward.w13.weight.shape) == (4096, 2 * 14336)


@pytest.mark.parametrize("fuse_norm,attention,defer,fuse_mlp,quant,masked", [(True, True, True, True, None, False)] + [
    pytest.param(*p, marks=pytest.mark.slow) for p in [
        (True, True, True, False, None, False), (True, True, False, False, None, False),
        (False, False, True, True, None, False), (True, True, True, True, None, True),
        (True, True, True, True, "int8", False), (True, True, False, False, "int8", True),
        (True, True, True, True, "int4", False)]])
def test_kernel_path_matches_reference_decode(fuse_norm, attention, defer, fuse_mlp, quant, masked, monkeypatch):
    """Decode through the Triton kernels (Triton's interpreter on CPU) equals the reference path: sparse
    projections, RMSNorm fused from the residual kernels' sums of squares, RoPE + cache write + attention
    in one kernel, q/k/v and gate/up partials summed by the kernels that read them (defer), and the whole MLP
    in one launch (fuse_mlp; with the norm fused only), over positions that cross a split of the attention
    kernel, GQA and a sliding window; with int8 and int4 weights (quantize.py) too, and the masked stream in
    place of kept-row lists (masked)."""
    ref_model, model = reference_and_kernel_models(2, 256, 40, quant=quant, fuse_norm=fuse_norm,
                                                   attention_kernel=attention, defer_reduction=defer, fuse_mlp=fuse_mlp,
                                                   masked_stream=masked)
    prompt, steps = torch.randint(0, 101, (1, 62)), torch.randint(0, 101, (1, 3))  # positions 62..64
    fused = []  # the fused MLP's launches: it must be the path taken when it applies, not a silent fallback
    launch_mlp = sparse_mlp.sparse_mlp
    monkeypatch.setattr(sparse_mlp, "sparse_mlp", lambda *a, **k: fused.append(1) or launch_mlp(*a, **k))
    # attention splits of 64 positions: the steps cross position 64
    for i, (ref, out) in enumerate(decode_both(ref_model, model, prompt, steps, 128)):
        assert rel_err(out, ref) < 1e-5, i
    # (quantized weights take the two launches)
    assert len(fused) == (len(model.layers) * steps.shape[1] if fuse_mlp and fuse_norm and not quant else 0)
    for layer in range(len(model.layers)):  # the kernel wrote the same keys and values into its cache
        a, b = model.layers[layer].attention.kv_cache, ref_model.layers[layer].attention.kv_cache
        assert rel_err(a.k, b.k) < 1e-6 and rel_err(a.v, b.v) < 1e-6


def test_compiled_kernel_path_calls_the_ops_on_the_weights_themselves():
    """torch.compile of the kernel-path decode step (the kernels interpreted on CPU) gives the eager kernel path's
    logits, and its generated code calls the opaque kernel ops with the parameters and buffers themselves: no clone
    or copy of a weight, a cache or a counter before a call (the ops declare what they write), no kernel body traced
    (no triton_kernel_wrapper)."""
    from torch._inductor.utils import run_and_get_code
    _, model = reference_and_kernel_models(2, 128)
    model.setup_caches(1, 64)
    eager_model = copy.deepcopy(model)
    step = torch.compile(lambda t, p: model(t, p), fullgraph=True)
    prompt = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        for m in (model, eager_model):
            m(prompt, torch.arange(8), sparse_from=None)
        for i, tok in enumerate(torch.randint(0, 101, (2,)).tolist()):
            pos = torch.tensor([8 + i])
            out, code = run_and_get_code(step, torch.tensor([[tok]]), pos)
            assert rel_err(out, eager_model(torch.tensor([[tok]]), pos)) < 1e-6, i
    code = "\n".join(code)
    calls = re.findall(r"torch\.ops\.teal\.(\w+)\.default\(", code)
    assert sorted(set(calls)) == ["decode_attention", "sparse_gemv_parts", "sparse_gemv_ss", "sparse_mlp"], calls
    assert len(calls) == 4 * len(model.layers)
    assert "clone" not in code and "copy_" not in code and "triton_kernel_wrapper" not in code


@pytest.mark.parametrize("quant", [None, "int8", "int4"], ids=["fp32", "int8", "int4"])
def test_kernel_path_matches_reference_decode_batch(quant):
    """Three sequences at once (tensor-core GEMV path, mask = union over the batch; partials handed over per row)."""
    ref_model, model = reference_and_kernel_models(quant=quant)
    prompt, steps = torch.randint(0, 101, (3, 20)), torch.randint(0, 101, (3, 3))
    for i, (ref, out) in enumerate(decode_both(ref_model, model, prompt, steps, 64)):
        assert rel_err(out, ref) < 1e-5, i


@pytest.mark.parametrize("sparse,quant,level", [(True, None, 0.5), (False, None, 0.5), (True, "int8", 0.5),
                                                 (True, "int8", 0.0)], ids=["sparse", "dense", "int8", "int8-level0"])
def test_nvrtc_route_matches_reference_decode(sparse, quant, level, monkeypatch):
    """A plan with the NVRTC kernels (plan.nvrtc_arch; on a CPU their op runs kernels/cuda_gemv.py's reference)
    decodes as the reference path in bf16, bit for bit: every projection of a step takes that op, q/k/v and gate/up
    with the norm fused, o and down with the residual added, down gating gate/up's outputs; dense steps (sparse_from
    None) too; int8 weights with their column scales (nvrtc_int8), at level 0 without thresholds (the kernel's
    dense mode).
    Attention on the reference path here (the kernel's rounding differs from SDPA's and flips masks)."""
    ref_model, _ = reference_and_kernel_models(2, 128)
    ref_model = ref_model.to(torch.bfloat16)
    if quant:
        quantize_model(ref_model, quant_format(quant))
    if level == 0:  # what set_sparsity(level 0) leaves: zero thresholds
        for _, _, m, _ in ref_model.sparse_modules():
            m.threshold.zero_()
    model = copy.deepcopy(ref_model)
    plan = decode_plan(torch.device("cpu"), sparsity=level, kernels=True, attention_kernel=False)
    model.set_plan(dataclasses.replace(plan, nvrtc_arch=90, nvrtc_sparse=True, nvrtc_int8=True))
    assert all(m.cuda_config is not None for _, _, m, _ in model.sparse_modules())
    calls, thresholded = [], []
    launch = cuda_gemv.cuda_gemv
    monkeypatch.setattr(cuda_gemv, "cuda_gemv", lambda *a, **k: calls.append(k.get("glu_in"))
                        or thresholded.append(a[2] is not None) or launch(*a, **k))
    prompt, steps = torch.randint(0, 101, (1, 20)), torch.randint(0, 101, (1, 3))
    for i, (ref, out) in enumerate(decode_both(ref_model, model, prompt, steps, 64, sparse_from=0 if sparse else None)):
        # (int8: the LM head on the Triton kernel, interpreted, beside the reference path's)
        assert torch.equal(out, ref) if quant is None else rel_err(out, ref) < 1e-2, i
    assert len(calls) == 4 * len(model.layers) * steps.shape[1]  # q/k/v, o, gate/up, down
    assert all(thresholded) if sparse and level else not any(thresholded)
    assert calls.count(True) == len(model.layers) * steps.shape[1]  # down gates gate/up's outputs


def test_nvrtc_int4_route_matches_reference_decode(monkeypatch):
    """plan.nvrtc_int4: int4 weights' one-token projections take kernels/cuda_gemv.py's int4 mode (on a CPU its op
    runs the reference), all four a layer, their weights back in column order where an earlier plan held them in
    the tensor-core kernel's order; the decode matches the reference path (the int8 LM head on Triton's kernel)."""
    args = ModelArgs(dim=256, n_layer=2, n_head=4, n_kv_head=4, intermediate_size=512, vocab_size=101,
                     max_seq_len=128)
    ref_model = random_model(args, "cpu", torch.bfloat16, seed=0)
    quantize_model(ref_model, quant_format("int4"))
    set_uniform_thresholds(ref_model, capture_inputs(ref_model, torch.randint(0, 101, (1, 48))), 0.5)
    model = copy.deepcopy(ref_model)
    words = [m.weight.clone() for _, _, m, _ in model.sparse_modules()]
    plan = decode_plan(torch.device("cpu"), sparsity=0.5, kernels=True, attention_kernel=False)
    model.set_plan(dataclasses.replace(plan, hopper_int4=True, hopper_mma=True))  # tensor-core order where it fits
    assert all(m.mma_config is not None for _, _, m, _ in model.sparse_modules())
    model.set_plan(dataclasses.replace(plan, nvrtc_arch=90, nvrtc_int4=True))
    mods = [m for _, _, m, _ in model.sparse_modules()]
    assert all(m.cuda_config is not None and m.mma_config is None for m in mods)
    assert all(torch.equal(m.weight, w) for m, w in zip(mods, words))
    calls = []
    launch = cuda_gemv.cuda_gemv
    monkeypatch.setattr(cuda_gemv, "cuda_gemv", lambda *a, **k: calls.append(a[1].dtype) or launch(*a, **k))
    prompt, steps = torch.randint(0, 101, (1, 20)), torch.randint(0, 101, (1, 2))
    for i, (ref, out) in enumerate(decode_both(ref_model, model, prompt, steps, 64, sparse_from=0)):
        assert rel_err(out, ref) < 1e-2, i
    assert calls == [torch.int32] * 4 * len(model.layers) * steps.shape[1]


@pytest.mark.parametrize("window", [None, 24])
def test_nvrtc_attention_route_matches_reference_decode(window, monkeypatch):
    """plan.nvrtc_attention: a one-token step whose q/k/v ran on the NVRTC projection takes kernels/cuda_attention.py
    in every layer (on a CPU its op runs the reference: the cache write and the attention the reference path makes),
    bit for bit with the reference path in bf16 (head dim 64, two queries per KV head; with a sliding window shorter
    than the context). Dense steps do too; without nvrtc_attention the Triton kernel's op runs instead."""
    args = ModelArgs(dim=128, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=192, vocab_size=101,
                     max_seq_len=128, sliding_window=window)
    ref_model = random_model(args, "cpu", torch.float32, seed=0)
    set_uniform_thresholds(ref_model, capture_inputs(ref_model, torch.randint(0, 101, (1, 48))), 0.5)
    ref_model = ref_model.to(torch.bfloat16)
    model = copy.deepcopy(ref_model)
    plan = dataclasses.replace(decode_plan(torch.device("cpu"), sparsity=0.5, kernels=True), nvrtc_arch=90,
                               nvrtc_sparse=True, nvrtc_attention=True)
    model.set_plan(plan)
    calls = []
    attend = cuda_attention.cuda_attention
    monkeypatch.setattr(cuda_attention, "cuda_attention", lambda *a, **k: calls.append(1) or attend(*a, **k))
    prompt, steps = torch.randint(0, 101, (1, 30)), torch.randint(0, 101, (1, 3))
    for sparse_from in (0, None):
        for i, (ref, out) in enumerate(decode_both(ref_model, model, prompt, steps, 64, sparse_from=sparse_from)):
            assert torch.equal(out, ref), (sparse_from, i)
    assert len(calls) == 2 * len(model.layers) * steps.shape[1]
    model.set_plan(dataclasses.replace(plan, nvrtc_attention=False))
    decode_both(ref_model, model, prompt, steps[:, :1], 64, sparse_from=0)
    assert len(calls) == 2 * len(model.layers) * steps.shape[1]


def test_attention_pdl_route(monkeypatch):
    """plan.attention_pdl: the q/k/v launch before the NVRTC attention triggers it (its config's pdl 3 or 4) and the
    attention is launched under PDL; o, gate/up and down keep their configs; the logits are the reference's."""
    args = ModelArgs(dim=128, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=192, vocab_size=101, max_seq_len=64)
    ref_model = random_model(args, "cpu", torch.float32, seed=0).to(torch.bfloat16)
    model = copy.deepcopy(ref_model)
    gemv_pdl, att_pdl = [], []
    gemv, attend = cuda_gemv.cuda_gemv, cuda_attention.cuda_attention
    monkeypatch.setattr(cuda_gemv, "cuda_gemv", lambda *a, **k: gemv_pdl.append(a[5].pdl) or gemv(*a, **k))
    monkeypatch.setattr(cuda_attention, "cuda_attention", lambda *a, **k: att_pdl.append(k["pdl"]) or attend(*a, **k))
    for trigger in (3, 4):
        model.set_plan(dataclasses.replace(decode_plan(torch.device("cpu"), kernels=True), nvrtc_arch=90,
                                           nvrtc_attention=True, attention_pdl=trigger))
        gemv_pdl.clear(), att_pdl.clear()
        prompt, steps = torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 2))
        for ref, out in decode_both(ref_model, model, prompt, steps, 64, sparse_from=None):
            assert rel_err(out, ref) < 1e-2
        assert gemv_pdl == [trigger, 0, 0, 0] * len(model.layers) * steps.shape[1]  # q/k/v, o, gate/up, down
        assert att_pdl == [True] * len(model.layers) * steps.shape[1]
        assert all(layer.attention.attention_trigger(model.plan) == trigger for layer in model.layers)
    attention = model.layers[0].attention
    # a q/k/v launch with a counter tail frees its partials when it returns: the pair is then launched plainly
    attention.wqkv.cuda_config = attention.wqkv.cuda_config._replace(cluster=0, split=4)
    assert attention.attention_trigger(model.plan) == 0
    attention.wqkv.cuda_config = attention.wqkv.cuda_config._replace(split=1)  # (no partials)
    assert attention.attention_trigger(model.plan) == 4
    model.set_plan(dataclasses.replace(model.plan, attention_pdl=0))  # (bench.py's records name the trigger)
    assert attention.attention_trigger(model.plan) == 0


@pytest.mark.parametrize("n_head, n_kv_head, cache, trigger", [(2, 2, 4096, 3), (4, 1, 512, 3), (4, 1, 576, 0),
                                                               (2, 1, 4096, 3)])
def test_attention_pdl_where_it_pays(n_head, n_kv_head, cache, trigger):
    """The attention goes under PDL with clusters (caches up to 512 positions) and with 4-warp CTAs through the counter
    (fewer than 4 queries per KV head); 8-warp CTAs through the counter are launched plainly (cuda_attention.pdl_pays)."""
    args = ModelArgs(dim=256, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, intermediate_size=192, vocab_size=101,
                     max_seq_len=4096)
    model = random_model(args, "cpu", torch.float32, seed=0).to(torch.bfloat16)
    model.set_plan(dataclasses.replace(decode_plan(torch.device("cpu"), kernels=True), nvrtc_arch=90,
                                       nvrtc_attention=True, attention_pdl=3))
    model.setup_caches(1, cache)
    attention = model.layers[0].attention
    attention.wqkv.cuda_config = attention.wqkv.cuda_config._replace(cluster=4)
    assert attention.attention_trigger(model.plan) == trigger


@pytest.mark.parametrize("dim, n_head, n_kv_head, window, nvrtc", [(128, 2, 1, None, True), (128, 2, 1, 1024, True),
                                                                   (128, 2, 2, None, True), (64, 2, 1, None, False)])
def test_nvrtc_attention_where_supported(dim, n_head, n_kv_head, window, nvrtc, monkeypatch):
    """With plan.nvrtc_attention, a model takes kernels/cuda_attention.py for every head shape it supports, GQA over
    a cache of more than 2,048 positions included; heads of 32 dimensions keep the Triton kernel's op."""
    args = ModelArgs(dim=dim, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, intermediate_size=192, vocab_size=101,
                     max_seq_len=4096, sliding_window=window)
    model = random_model(args, "cpu", torch.float32, seed=0).to(torch.bfloat16)
    model.set_plan(dataclasses.replace(decode_plan(torch.device("cpu"), kernels=True), nvrtc_arch=90,
                                       nvrtc_attention=True))
    calls = []
    attend = cuda_attention.cuda_attention
    monkeypatch.setattr(cuda_attention, "cuda_attention", lambda *a, **k: calls.append(1) or attend(*a, **k))
    model.setup_caches(1, 2056)
    with torch.no_grad():
        model(torch.randint(0, 101, (1, 8)), torch.arange(8), sparse_from=None)
        model(torch.tensor([[7]]), torch.tensor([8]), sparse_from=None)
    assert len(calls) == (1 if nvrtc else 0)
    assert model.layers[0].attention.takes_nvrtc_attention(model.plan) == nvrtc  # (what bench.py's records name)


@pytest.mark.slow
def test_compiled_nvrtc_step_calls_its_ops_on_the_weights_and_caches_themselves():
    """torch.compile of a dense decode step on the NVRTC route (plan.nvrtc_arch, with plan.nvrtc_attention; the ops'
    CPU kernels are the references) gives the eager step's logits, and the generated code calls teal::cuda_gemv four
    times a layer on the weights and counters themselves and teal::cuda_attention once a layer on the caches
    themselves (declared mutated): no clone or copy before a call."""
    from torch._inductor.utils import run_and_get_code
    args = ModelArgs(dim=128, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=192, vocab_size=101, max_seq_len=64)
    model = random_model(args, "cpu", torch.float32, seed=0).to(torch.bfloat16)
    model.set_plan(dataclasses.replace(decode_plan(torch.device("cpu"), kernels=True), nvrtc_arch=90,
                                       nvrtc_attention=True))
    model.setup_caches(1, 64)
    eager_model = copy.deepcopy(model)
    step = torch.compile(lambda t, p: model(t, p, sparse_from=None), fullgraph=True)
    prompt = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        for m in (model, eager_model):
            m(prompt, torch.arange(8), sparse_from=None)
        out, code = run_and_get_code(step, torch.tensor([[7]]), torch.tensor([8]))
        assert rel_err(out, eager_model(torch.tensor([[7]]), torch.tensor([8]), sparse_from=None)) < 1e-2
    code = "\n".join(code)
    assert len(re.findall(r"torch\.ops\.teal\.cuda_gemv\.default\(", code)) == 4 * len(model.layers)
    assert len(re.findall(r"torch\.ops\.teal\.cuda_attention\.default\(", code)) == len(model.layers)
    assert "clone" not in code and not re.search(r"\.copy_\(|aten\.copy", code)  # (kernel names hold "_to_copy_")
