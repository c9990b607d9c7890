"""kernels/gluon_mma.py on the CPU: the tile column order against the A-fragment rows the kernel decodes, the kernel's
arithmetic (kept-input list, one B column per scale group, 128 + q with the offset removed at the end) emulated in
PyTorch against the reference, launch configs, what a launch checks and allocates, and the model holding the second
copy of its weights. Gluon has no CPU interpreter: the kernel is built for sm_90 by test_sm90.py and run against
the reference and the Triton kernel by scripts/gpu_check.py."""
import copy

import pytest
import torch

from engine import opaque_ops
from kernels import gluon_gemv, gluon_mma
from kernels.common import skip
from kernels.formats import INT4, pack_int4, unpack_int4
from loading import random_model
from model import ModelArgs
from plan import decode_plan
from quantization import quantize_model
from tests.kernel_cases import rel_err


def quantized(K: int, N: int, group: int) -> tuple:
    return INT4.quantize(torch.randn(K, N) / K ** 0.5, group)


@pytest.mark.parametrize("wb", [1, 2])
def test_tile_order_is_what_a_thread_decodes(wb):
    """Nibble h of byte i of word v of lane group g in warp w holds A row g + 8h + 16w + 64(i + 4v) of the tile: the
    words as the kernel reads them (word wb(8w + g) + v of each 256·wb-column tile) decode to the original columns;
    from_mma_layout inverts to_mma_layout."""
    K, N = 3, 2 * gluon_mma.tile_n(wb)
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    words = gluon_mma.to_mma_layout(pack_int4(q), wb).view(K, N // gluon_mma.tile_n(wb), 32 * wb)
    for tile in range(N // gluon_mma.tile_n(wb)):
        for w in range(4):
            for g in range(8):
                for v in range(wb):
                    word = words[:, tile, wb * (8 * w + g) + v]
                    for i in range(4):
                        for h in range(2):
                            col = tile * gluon_mma.tile_n(wb) + g + 8 * h + 16 * w + 64 * (i + 4 * v)
                            assert torch.equal((word >> (8 * i + 4 * h)) & 0xF, q[:, col])
    assert torch.equal(gluon_mma.from_mma_layout(gluon_mma.to_mma_layout(pack_int4(q), wb), wb), pack_int4(q))


def emulate(x, wm, t, sizes, scale, group, wb, k_split, dtype):
    """The kernel's sums in PyTorch: per tile and K range, the kept inputs in order; acc[m, c] = sum over kept k of
    group c of x_k (O + q_km); y = sum_c s acc + (m - O s) X_c (float32)."""
    K, N = x.shape[1], wm.shape[1] * 8
    off = 128.0 if dtype == torch.bfloat16 else 1024.0
    tn = gluon_mma.tile_n(wb)
    q = unpack_int4(wm)[:, torch.argsort(gluon_mma.mma_order(N, wb))].float()  # canonical columns again
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    s, m = scale.float()
    y = torch.zeros(N)
    for k0 in range(0, K, k_split):
        for n0 in range(0, N, tn):
            tt = t[seg[n0], k0:k0 + k_split]
            xs = x[0, k0:k0 + k_split]
            keep = xs.float().abs() > tt
            rows = keep.nonzero()[:, 0]
            xv = xs[rows].float()  # the entries hold the input in its dtype
            acc = torch.zeros(tn, 8)
            for c in range(8):
                sel = (rows // group) == c
                acc[:, c] = (xv[sel, None] * (off + q[k0 + rows[sel], n0:n0 + tn])).sum(0)
            grp = k0 // group + torch.arange(8)
            ok = grp < (min(k0 + k_split, K) + group - 1) // group
            gs = torch.where(ok[:, None], s[grp.clamp_max(s.shape[0] - 1), n0:n0 + tn], 0).T
            gm = torch.where(ok[:, None], m[grp.clamp_max(s.shape[0] - 1), n0:n0 + tn], 0).T
            X = torch.stack([xv[(rows // group) == c].sum() for c in range(8)])
            y[n0:n0 + tn] += (acc * gs + (gm - off * gs) * X).sum(1)
    return y[None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("group", [64, 32])
def test_emulated_kernel_matches_the_reference(dtype, s, group):
    """Three segments under their own thresholds, groups of 64 (or 32, AWQ's smallest), K ranges of 3 groups (the
    last one short)."""
    K, sizes, wb = 7 * group, (512, 256, 256), 1
    q, scale = quantized(K, sum(sizes), group)
    x = torch.randn(1, K).to(dtype)
    t = torch.quantile(x.abs().float(), s) * (torch.rand(len(sizes), K) * 0.4 + 0.8) if s else \
        torch.zeros(len(sizes), K)
    y = emulate(x, gluon_mma.to_mma_layout(q, wb), t, sizes, scale, group, wb, 3 * group, dtype)
    ref = gluon_gemv.int4_parts_ref(x, q, t, sizes, scale)
    # (float32 sums of x (O + q) lose log2(O / 16) bits to the offset removed at the end: 3 for bf16, 6 for fp16)
    assert ((y - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.bfloat16 else 1e-4)


def test_default_config():
    """512-column tiles where every segment allows (Llama-2's q/k/v), else 256 (its gate/up, 11008); K ranges of at
    most 8 scale groups, about three programs per SM; shapes it does not take go to kernels/gluon_gemv.py."""
    assert gluon_mma.default_config(4096, (4096,) * 3, 128, 132) == gluon_mma.Config(2, 16)
    assert gluon_mma.default_config(4096, (11008,) * 2, 128, 132) == gluon_mma.Config(1, 5)
    assert gluon_mma.default_config(4096, (4096,), 128, 4) == gluon_mma.Config(2, 4)  # 32 groups: at least 4 ranges
    assert gluon_mma.default_config(1152, (384, 128, 128), 64, 132) is None
    assert gluon_mma.default_config(4096, (4096,), 32, 132) == gluon_mma.Config(2, 50)  # AWQ g32: 3 groups a range
    assert gluon_mma.default_config(4096, (4096,), 32, 4) == gluon_mma.Config(2, 16)  # at most 8 groups a range
    assert gluon_mma.default_config(4096, (4096,), 16, 132) is None


def test_launch_allocates_partials_and_checks_inputs():
    K, sizes = 1152, (512, 256, 256)
    q, scale = quantized(K, sum(sizes), 64)
    cfg = gluon_mma.default_config(K, sizes, 64, 4)
    x, t = torch.randn(1, K, dtype=torch.bfloat16), torch.zeros(3, K)
    wm = gluon_mma.to_mma_layout(q, cfg.wb)
    out = gluon_mma.launch(x, wm, t, sizes, cfg, scale, wrap=skip)
    assert out.shape[1] == 1024 and out.dtype == torch.float32 and out.shape[0] * 8 * 64 >= K
    assert gluon_mma.OPS.fake_parts(x, wm, t, None, None, 1e-5, sizes, False, list(cfg), scale).shape[1:] == (1, 1, 1024)
    with pytest.raises(AssertionError):
        gluon_mma.launch(x.float(), wm, t, sizes, cfg, scale, wrap=skip)  # 16-bit inputs only
    with pytest.raises(AssertionError):
        gluon_mma.launch(x, wm, t, (512, 512), cfg, scale, wrap=skip)  # thresholds per segment
    with pytest.raises(AssertionError):
        gluon_mma.launch(x, wm, t, sizes, gluon_mma.Config(1, 1), scale, wrap=skip)  # more than 8 groups a range
    assert torch.ops.teal.int4_mma_parts_sm90.default in opaque_ops()
    res, cnt = torch.randn(1, 1024, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.int32)
    one = gluon_mma.default_config(K, (1024,), 64, 4)
    y, ss = gluon_mma.OPS.fake_residual(x, gluon_mma.to_mma_layout(q, one.wb), torch.zeros(1, K), cnt, res, (1024,),
                                list(one), scale)
    assert y.shape == (1, 1024) and y.dtype == torch.bfloat16 and ss.shape == (1, 1024 // gluon_mma.tile_n(one.wb))
    parts = torch.randn(3, 2, 1, K)
    assert gluon_mma.OPS.fake_residual(parts, gluon_mma.to_mma_layout(q, one.wb), torch.zeros(1, K), cnt, res,
                               (1024,), list(one), scale)[0].shape == (1, 1024)
    with pytest.raises(AssertionError):  # partials in need a residual
        gluon_mma.launch(parts, gluon_mma.to_mma_layout(q, one.wb), torch.zeros(1, K), (1024,), one, scale, wrap=skip)
    assert torch.ops.teal.int4_mma_residual_sm90.default in opaque_ops()


def test_model_holds_mma_order_only_where_the_kernel_runs():
    """On an sm_90 plan (int4): projections whose segments are whole tiles are held in the kernel's column order
    (once: a later plan keeps it), other shapes and plans not; the state dict still holds column order, and loaded
    or newly quantized weights are taken in column order."""
    args = ModelArgs(dim=512, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=1024, vocab_size=64,
                     max_seq_len=64)
    model = random_model(args, "cpu", torch.bfloat16)
    quantize_model(model, INT4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    attn, mlp = model.layers[0].attention, model.layers[0].feed_forward
    model.set_plan(decode_plan(torch.device("cpu"), INT4, 0.5, kernels=True, n_sm=132, hopper_int4=True))
    assert attn.wqkv.mma_config == gluon_mma.Config(1, 4) and mlp.w13.mma_config.wb == 2
    assert attn.wo.mma_config.wb == 2 and mlp.w2.mma_config.wb == 2 and attn.wo.order_inv is not None
    held = attn.wqkv.weight.data.clone()
    assert torch.equal(gluon_mma.from_mma_layout(held, 1), saved["layers.0.attention.wqkv.weight"])
    model.set_plan(decode_plan(torch.device("cpu"), INT4, 0.25, kernels=True, n_sm=1, hopper_int4=True))
    assert torch.equal(attn.wqkv.weight, held) and attn.wqkv.mma_config.split == 1
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    model.load_state_dict(saved, strict=True)
    assert attn.wqkv.mma_config is None and torch.equal(attn.wqkv.weight, saved["layers.0.attention.wqkv.weight"])
    fresh = random_model(args, "cpu", torch.bfloat16)
    quantize_model(fresh, INT4)
    fresh.set_plan(decode_plan(torch.device("cpu"), INT4, 0.5, kernels=True, n_sm=132, hopper_int4=True,
                               hopper_mma=False))
    assert fresh.layers[0].attention.wqkv.mma_config is None
    small = random_model(ModelArgs(dim=128, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=256, vocab_size=64,
                                   max_seq_len=64), "cpu", torch.bfloat16)
    quantize_model(small, INT4)
    small.set_plan(decode_plan(torch.device("cpu"), INT4, 0.5, kernels=True, n_sm=132, hopper_int4=True))
    lins = [m for m in small.modules() if getattr(m, "fmt", None) is INT4 and not m.head]
    assert [m.mma_config is not None for m in lins] == [False, False, True, False]  # gate/up: 2 x 256 columns


@pytest.mark.slow
def test_weights_in_mma_order_decode_as_in_column_order():
    """The paths that read q/k/v and gate/up held in the kernel's order (the dense prefill on the reference path,
    decode on the Triton kernels: float32 activations are not the tensor-core kernel's) give the logits of the
    same model in column order (the Triton interpreter on CPU)."""
    args = ModelArgs(dim=256, n_layer=1, n_head=2, n_kv_head=2, intermediate_size=512, vocab_size=101,
                     max_seq_len=64)
    ref = random_model(args, "cpu", torch.float32, seed=0)
    quantize_model(ref, INT4)
    for lin in (ref.layers[0].attention.wqkv, ref.layers[0].feed_forward.w13):
        lin.threshold.copy_(torch.rand_like(lin.threshold) * 0.3)
    model = copy.deepcopy(ref)
    ref.set_plan(decode_plan(torch.device("cpu"), INT4, 0.5, kernels=True, hopper_int4=False))
    model.set_plan(decode_plan(torch.device("cpu"), INT4, 0.5, kernels=True, hopper_int4=True))
    assert model.layers[0].attention.wqkv.mma_config is not None
    assert model.layers[0].feed_forward.w13.mma_config is not None
    prompt, steps = torch.randint(0, 101, (1, 9)), torch.randint(0, 101, (1, 2))
    with torch.no_grad():
        for m in (ref, model):
            m.setup_caches(1, 32)
        assert rel_err(model(prompt, torch.arange(9), sparse_from=None), ref(prompt, torch.arange(9), sparse_from=None)) < 1e-6
        for i in range(steps.shape[1]):
            pos = torch.tensor([9 + i])
            assert rel_err(model(steps[:, i:i + 1], pos), ref(steps[:, i:i + 1], pos)) < 1e-6, i
