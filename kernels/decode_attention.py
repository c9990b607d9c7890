"""Decode attention: one new token per sequence, with RoPE and the KV-cache write fused in (one launch).

For each (batch row, KV head) the G = n_head / n_kv_head query heads of its group are rotated, the new
key is rotated and written with the new value into the cache at `pos`, and the group attends over the
cache positions [lo, pos] (lo > 0 only with a sliding window). The positions are split over programs
(flash-decoding); each split keeps an online softmax and the last one to finish (atomic counter, left at
zero) combines the partial results in a fixed order. The split follows the context actually used, not the
cache's length: the launch has up to 16 programs per KV head (fixed, as a CUDA graph needs), and at each step
[lo, pos] is cut into that many whole blocks of positions or fewer, so a short context in a long cache (a chat,
the server) still spreads over programs, and only positions up to `pos` are read.
"""
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from kernels.common import INTERPRETED, SLOTS, _dot, _stamp, _stamp_after, direct, skip


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Half-split rotation (the Hugging Face layout). x [B, S, H, D], rope [S, D/2, 2] (cos, sin)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, S, H, D/2]
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def decode_attention_ref(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                         n_head: int, window: Optional[int] = None) -> Tensor:
    """Plain-PyTorch reference. qkv [B, (H + 2 Hkv) D], rope [1, D/2, 2], caches [B', Hkv, T, D] (written at
    pos) -> y [B, H D]."""
    B = qkv.shape[0]
    Hkv, T, D = k_cache.shape[1:]
    q, k, v = qkv.view(B, 1, -1, D).split([n_head, Hkv, Hkv], dim=2)
    k_cache[:B, :, pos] = apply_rope(k, rope)[:, 0]
    v_cache[:B, :, pos] = v[:, 0]
    kv_pos = torch.arange(T, device=qkv.device)
    mask = kv_pos <= pos
    if window is not None:
        mask &= pos - kv_pos < window
    y = F.scaled_dot_product_attention(apply_rope(q, rope).transpose(1, 2), k_cache[:B], v_cache[:B],
                                       attn_mask=mask[None, :], enable_gqa=n_head != Hkv)
    return y.transpose(1, 2).reshape(B, n_head * D)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, rope_ptr, k_ptr, v_ptr, pos_ptr, y_ptr, ws_ml_ptr, ws_acc_ptr, cnt_ptr,
    stride_qb, stride_qp, stride_cb, stride_ch, stride_ct, stride_yb, WINDOW, N_SPLITS, N_PARTS: tl.constexpr,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_P2: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, COMBINE: tl.constexpr, DOT_F32: tl.constexpr,
    prof_ptr, PROFILE: tl.constexpr,
):
    scale: tl.constexpr = 1.0 / (D ** 0.5)
    pid = tl.program_id(0)  # b * HKV + kv head
    split = tl.program_id(1)
    prof = prof_ptr + (pid * N_SPLITS + split) * SLOTS  # PROFILE: phase stamps (scripts/profile_phases.py)
    _stamp(prof, 0, pid, PROFILE)
    b = pid // HKV
    hk = pid % HKV
    pos = tl.load(pos_ptr).to(tl.int32)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(pos - WINDOW + 1, 0)
    per = tl.cdiv((pos - lo) // BLOCK_T + 1, N_SPLITS) * BLOCK_T  # positions per split: whole blocks
    start = lo + split * per
    last = (pos - lo) // per  # the split holding `pos`; splits 0 .. last have positions
    if split <= last:
        dt = k_ptr.dtype.element_ty
        ydt = y_ptr.dtype.element_ty
        HALF: tl.constexpr = D // 2
        g = tl.arange(0, G_PAD)
        g_ok = g < G
        dh = tl.arange(0, HALF)
        cos = tl.load(rope_ptr + dh * 2)
        sin = tl.load(rope_ptr + dh * 2 + 1)
        # the group's queries [G_PAD, D/2] x 2 halves, rotated and rounded as the reference rounds
        q_ptrs = qkv_ptr + b * stride_qb + (hk * G + g)[:, None] * D + dh[None, :]
        q1 = _load_qkv(q_ptrs, g_ok[:, None], stride_qp, N_PARTS, dt).to(tl.float32)
        q2 = _load_qkv(q_ptrs + HALF, g_ok[:, None], stride_qp, N_PARTS, dt).to(tl.float32)
        qr1 = (q1 * cos[None, :] - q2 * sin[None, :]).to(dt)
        qr2 = (q2 * cos[None, :] + q1 * sin[None, :]).to(dt)
        # the new key (rotated) and value
        kn_ptr = qkv_ptr + b * stride_qb + (H + hk) * D + dh
        k1 = _load_qkv(kn_ptr, dh < HALF, stride_qp, N_PARTS, dt).to(tl.float32)
        k2 = _load_qkv(kn_ptr + HALF, dh < HALF, stride_qp, N_PARTS, dt).to(tl.float32)
        kn1 = (k1 * cos - k2 * sin).to(dt)
        kn2 = (k2 * cos + k1 * sin).to(dt)
        dd = tl.arange(0, D)
        _stamp_after(prof, 2, qr1, PROFILE)
        vn = _load_qkv(qkv_ptr + b * stride_qb + (H + HKV + hk) * D + dd, dd < D, stride_qp, N_PARTS, dt)
        cache = b * stride_cb + hk * stride_ch
        if split == last:  # the split holding `pos` writes the new entry
            tl.store(k_ptr + cache + pos * stride_ct + dh, kn1)
            tl.store(k_ptr + cache + pos * stride_ct + HALF + dh, kn2)
            tl.store(v_ptr + cache + pos * stride_ct + dd, vn)

        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        t_end = tl.minimum(start + per, pos)  # cached positions; `pos` itself comes from registers
        for t0 in range(start, t_end, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            t_ok = ts < t_end
            kp = k_ptr + cache + ts[:, None] * stride_ct + dh[None, :]
            kc1 = tl.load(kp, mask=t_ok[:, None], other=0.0)  # [BT, D/2]
            kc2 = tl.load(kp + HALF, mask=t_ok[:, None], other=0.0)
            vc = tl.load(v_ptr + cache + ts[:, None] * stride_ct + dd[None, :], mask=t_ok[:, None], other=0.0)
            s = _dot(qr1, tl.trans(kc1), _dot(qr2, tl.trans(kc2), tl.zeros((G_PAD, BLOCK_T), tl.float32), DOT_F32),
                     DOT_F32) * scale  # [G_PAD, BT]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = _dot(p.to(dt), vc, acc * alpha[:, None], DOT_F32)
            m = m_new
        if split == last:
            s_new = (tl.sum(qr1.to(tl.float32) * kn1.to(tl.float32)[None, :], axis=1)
                     + tl.sum(qr2.to(tl.float32) * kn2.to(tl.float32)[None, :], axis=1)) * scale  # [G_PAD]
            m_new = tl.maximum(m, s_new)
            alpha = tl.exp(m - m_new)
            p = tl.exp(s_new - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vn.to(tl.float32)[None, :]
            m = m_new

        _stamp(prof, 4, (tl.max(l, axis=0) > 1e30).to(tl.int32), PROFILE)
        y_ptrs = y_ptr + b * stride_yb + (hk * G + g)[:, None] * D + dd[None, :]
        if last == 0:
            tl.store(y_ptrs, (acc / l[:, None]).to(dt).to(ydt), mask=g_ok[:, None])
        else:
            # partials: ws_ml [B*HKV, N_SPLITS, 2, G_P2], ws_acc [B*HKV, N_SPLITS, G_P2, D]
            ml = ws_ml_ptr + (pid * N_SPLITS + split) * 2 * G_P2 + g
            tl.store(ml, m, mask=g_ok)
            tl.store(ml + G_P2, l, mask=g_ok)
            tl.store(ws_acc_ptr + (pid * N_SPLITS + split) * G_P2 * D + g[:, None] * D + dd[None, :], acc,
                     mask=g_ok[:, None])
            tl.debug_barrier()  # every thread's partials are stored before the counter moves
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            _stamp(prof, 6, arrived, PROFILE)
            if arrived == last:
                gg = tl.arange(0, G_P2)
                gg_ok = gg < G
                m_all = tl.full((G_P2,), float("-inf"), tl.float32)
                for j0 in range(0, last + 1, COMBINE):  # global max first
                    js = j0 + tl.arange(0, COMBINE)
                    j_ok = js <= last
                    mj = tl.load(ws_ml_ptr + (pid * N_SPLITS + js)[:, None] * 2 * G_P2 + gg[None, :],
                                 mask=j_ok[:, None] & gg_ok[None, :], other=float("-inf"), cache_modifier=".cg")
                    m_all = tl.maximum(m_all, tl.max(mj, axis=0))
                m_all = tl.where(gg_ok, m_all, 0.0)
                l_all = tl.zeros((G_P2,), tl.float32)
                o = tl.zeros((G_P2, D), tl.float32)
                for j0 in range(0, last + 1, COMBINE):  # a fixed order: no dependence on arrival
                    js = j0 + tl.arange(0, COMBINE)
                    j_ok = js <= last
                    msk = j_ok[:, None] & gg_ok[None, :]
                    base = (pid * N_SPLITS + js)[:, None] * 2 * G_P2 + gg[None, :]
                    mj = tl.load(ws_ml_ptr + base, mask=msk, other=float("-inf"), cache_modifier=".cg")
                    lj = tl.load(ws_ml_ptr + base + G_P2, mask=msk, other=0.0, cache_modifier=".cg")
                    wj = tl.exp(mj - m_all[None, :])  # [C, G_P2]
                    l_all += tl.sum(wj * lj, axis=0)
                    aj = tl.load(ws_acc_ptr + (pid * N_SPLITS + js)[:, None, None] * G_P2 * D
                                 + gg[None, :, None] * D + dd[None, None, :], mask=msk[:, :, None], other=0.0,
                                 cache_modifier=".cg")  # [C, G_P2, D]
                    o += tl.sum(wj[:, :, None] * aj, axis=0)
                out = o / tl.where(gg_ok, l_all, 1.0)[:, None]
                tl.store(y_ptr + b * stride_yb + (hk * G + gg)[:, None] * D + dd[None, :], out.to(dt).to(ydt),
                         mask=gg_ok[:, None])
                tl.store(cnt_ptr + pid, 0)
                _stamp_after(prof, 8, out, PROFILE)


@triton.jit
def _load_qkv(ptrs, mask, stride_p, N_PARTS: tl.constexpr, dt: tl.constexpr):
    """q/k/v values in dt: loaded, or with N_PARTS > 0 summed over the projection's split-K partials (float32,
    stride_p apart) in split order and rounded as the projection's own epilogue rounds."""
    v = tl.load(ptrs, mask=mask, other=0.0)
    for p in tl.static_range(1, N_PARTS):
        v += tl.load(ptrs + p * stride_p, mask=mask, other=0.0)
    return v.to(dt)


def supported(n_head: int, n_kv_head: int, head_dim: int) -> bool:
    """Shapes the kernel takes: a power-of-two head dim of at least 32 (tl.dot needs 16 on each side)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0 and n_head % n_kv_head == 0


def n_splits(max_seq_len: int, window: Optional[int], block_t: int = 64, max_splits: int = 16) -> int:
    """Programs per KV head: one per block of the longest context the cache (or window) holds, at most max_splits."""
    return max(1, min(max_splits, triton.cdiv(min(max_seq_len, window or max_seq_len), block_t)))


def split_of(pos: int, lo: int, splits: int, block_t: int = 64) -> int:
    """Positions per program at a step attending over [lo, pos] (the kernel's own arithmetic)."""
    return triton.cdiv((pos - lo) // block_t + 1, splits) * block_t


def launch(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, counters: Tensor,
           n_head: int, window: Optional[int], out: Tensor, block_t: int = 64, num_warps: int = 4,
           wrap=direct, prof: Optional[Tensor] = None) -> Tensor:
    """qkv [B, (H + 2 Hkv) D], or the q/k/v projection's split-K partials [P, B, (H + 2 Hkv) D] float32
    (summed here), rope [1, D/2, 2] float32 (row of `pos`), caches [B', Hkv, T, D] (contiguous), pos [1] int,
    counters [>= B Hkv] int32 zeros (left zero) -> out [B, H D]. prof [>= programs, SLOTS] int64: each
    program stamps its phases there."""
    n_parts = qkv.shape[0] if qkv.dim() == 3 else 0
    assert not n_parts or (qkv.is_contiguous() and qkv.dtype == torch.float32)
    B = qkv.shape[-2]
    _, Hkv, T, D = k_cache.shape
    G = n_head // Hkv
    assert supported(n_head, Hkv, D) and qkv.shape[-1] == (n_head + 2 * Hkv) * D and qkv.stride(-1) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and B <= k_cache.shape[0]
    assert counters.numel() >= B * Hkv and rope.shape[-2:] == (D // 2, 2)
    splits = n_splits(T, window, block_t)
    g_p2 = triton.next_power_of_2(G)
    ws_ml = qkv.new_empty((B * Hkv, splits, 2, g_p2), dtype=torch.float32)
    ws_acc = qkv.new_empty((B * Hkv, splits, g_p2, D), dtype=torch.float32)
    combine = min(triton.next_power_of_2(splits), max(1, 4096 // (g_p2 * D)))
    wrap(_decode_attention_kernel)[(B * Hkv, splits)](
        qkv, rope, k_cache, v_cache, pos, out, ws_ml, ws_acc, counters,
        qkv.stride(-2), qkv.stride(0) if n_parts else 0, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), window or 0, splits, n_parts,
        H=n_head, HKV=Hkv, G=G, G_PAD=max(16, g_p2), G_P2=g_p2, D=D, BLOCK_T=block_t,
        COMBINE=combine, DOT_F32=INTERPRETED and k_cache.dtype == torch.bfloat16,
        prof_ptr=prof if prof is not None else rope, PROFILE=prof is not None, num_warps=num_warps,
    )
    return out


def _attention(wrap, qkv, rope, k_cache, v_cache, pos, counters, n_head, window):
    out = qkv.new_empty((qkv.shape[-2], n_head * k_cache.shape[3]), dtype=k_cache.dtype)
    return launch(qkv, rope, k_cache, v_cache, pos, counters, n_head, window or None, out, wrap=wrap)


# opaque to torch.compile: see sparse_gemv.py
@custom_op("teal::decode_attention", mutates_args=("k_cache", "v_cache", "counters"))
def _decode_attention_op(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                         counters: Tensor, n_head: int, window: int) -> Tensor:
    return _attention(direct, qkv, rope, k_cache, v_cache, pos, counters, n_head, window)


_decode_attention_op.register_fake(partial(_attention, skip))


def decode_attention(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                     counters: Tensor, n_head: int, window: Optional[int]) -> Tensor:
    """One decode step of attention for qkv [B, (H + 2 Hkv) D] (or its partials [P, B, (H + 2 Hkv) D] float32,
    from sparse_gemv_parts) at position pos [1]; writes the new key and value into the caches and returns
    [B, H D] in the caches' dtype."""
    return _decode_attention_op(qkv, rope, k_cache, v_cache, pos, counters, n_head, window or 0)
