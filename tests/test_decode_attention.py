"""kernels/decode_attention.py: RoPE, cache write and attention of one-token steps (flash-decoding splits) against
the reference, from the reduced q/k/v or from the projection's unreduced partials; the registered op. Interpreted
on CPU."""
import pytest
import torch

from kernels import decode_attention, reference
from tests.kernel_cases import DEVICE, grid, pairwise, poisoned, rel_err

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

ATTENTION = {  # name: (n_head, n_kv_head, head_dim, cache length, window)
    "mha": (4, 4, 32, 40, None),
    "gqa": (6, 2, 32, 100, None),
    "gqa-d64": (4, 1, 64, 300, None),
    "window": (8, 2, 32, 64, 5),
    "window-long": (8, 2, 32, 100, 40),  # a window over several splits, their start not block-aligned
}


@pytest.mark.parametrize("case,B,dtype", pairwise(["mha", "gqa", "gqa-d64", "window", "window-long"], [1, 3],
                                               [F32, F16, BF16], quick=[("gqa", 1, BF16), ("gqa-d64", 1, F32)]))
def test_decode_attention_matches_reference(case, B, dtype):
    """Fresh caches, positions at the first entry (one program), on both sides of the first block's end (two),
    on both sides of a split boundary at the cache end (splits of several blocks where the cache holds more blocks
    than programs: gqa-d64) and at the cache end."""
    H, Hkv, D, T, window = ATTENTION[case]
    block_t = 16
    splits = decode_attention.n_splits(T, window, block_t)
    split = decode_attention.split_of(T - 1, max(T - window, 0) if window else 0, splits, block_t)
    angles = torch.rand(D // 2, device=DEVICE) * 6
    rope = torch.stack([angles.cos(), angles.sin()], -1)[None].float()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for pos in sorted({0, block_t - 1, block_t, split - 1, split, T - 1}):
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


@pytest.mark.parametrize("B,dtype", grid([1, 3], [F32, BF16], quick=[(1, BF16)]))
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


def test_splits_follow_the_context():
    """A short context in a long cache spreads over the programs as it would in a cache of its own size; a long one
    takes whole blocks per program, never more programs than the launch has."""
    assert decode_attention.n_splits(4096, None) == 16 and decode_attention.n_splits(384, None) == 6
    assert decode_attention.n_splits(32768, 4096) == 16 and decode_attention.n_splits(4096, 100) == 2
    assert decode_attention.split_of(383, 0, 16) == decode_attention.split_of(383, 0, 6) == 64  # 6 programs
    for pos in range(0, 4096, 7):
        per = decode_attention.split_of(pos, 0, 16)
        assert per % 64 == 0 and pos // per < 16 and (pos // per + 1) * per > pos


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
