"""Input-sparse GEMV on input-channel-major weights, for decode (M <= 8 rows).

y[m, n] = sum_k sparsify(x)[m, k] * W[k, n] with W stored [K, N]. The columns form up to three
segments (q, k, v) that share the input but each have their own threshold row, so one launch serves
a fused projection. Row k of a weight tile is loaded only if x[m, k] passes its segment's threshold
in some batch row m (the union over the batch); each batch row still uses only its own kept inputs.
With glu=True the two segments are gate and up and the kernel returns silu(gate) * up.

Batch 1 (the target): each program first lists the kept inputs of its K range (a scratch list in L2), then
streams only their weight rows, BK kept rows at a time, with the next group's rows already in flight while
the current group is multiplied: the bytes in flight per step do not shrink as sparsity grows, the number of
steps does. With all thresholds of the range at zero it streams the rows in order instead (exactly dense).

RMSNorm fusion: a launch with a residual can also write each row's sum of squares per column tile
(`ss_out` [M, n_tiles]); a later launch given those partials (`ss_in`) and the norm weight normalises its
input itself, so the norm costs no launch of its own.

Split-K without a memset: each program writes its partial sums to a workspace, bumps a per-tile
counter, and the last program of a tile sums the partials in a fixed order (deterministic), applies
the epilogue (GLU, residual add, sums of squares) and resets the counter to zero for the next launch.
Deferred reduction: with partial_out a launch stores its partials and stops there, and the kernel that reads the
result sums them while loading its input (decode attention for q/k/v; this kernel for down, given gate/up's
partials as x [P, 2, M, K], applying silu(gate) * up as it loads): no tail where nothing needs the reduced value.

Quantized weights: int8 rows are widened exactly by a magic number and the per-column scales applied to the sums;
int4 rows (eight weights per int32 word, a scale and offset per group of inputs) are widened nibble by nibble to
1 + q/16 and each step of BK rows holds one group's rows only (the kept list starts every group on a new step), so
its scales apply once per step (_fma4).

The whole MLP in one launch (batch 1, launch_mlp / sparse_mlp): gate/up as above, then the down projection in the
same programs, handed out as work units once gate/up's column tiles finish (see _mlp_down).
"""
import os
from itertools import accumulate
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_ROWS = 8
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def sparsify(x: Tensor, t: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """x [..., S, K] with entries |x_i| <= t_i set to zero; rows where `active` [S] is False stay dense."""
    keep = x.abs() > t
    if active is not None:
        keep = keep | ~active[:, None]
    return x * keep


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in fp32, rounded to x's dtype, then scaled (the model's RMSNorm)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def dequantize_int4(w: Tensor, scale: Tensor) -> Tensor:
    """int4 weights w int32 [K, N/8] (bits 4i..4i+3 of word c: column 8c + i, unsigned) with scale [2, K/g, N]
    -> float32 [K, N]: q * scale[0] + scale[1] of each weight's group of g inputs."""
    K = w.shape[0]
    q = (w[:, :, None] >> torch.arange(0, 32, 4, device=w.device, dtype=torch.int32)) & 0xF  # [K, N/8, 8]
    s, m = scale.float().repeat_interleave(K // scale.shape[1], dim=1)
    return q.reshape(K, -1).float() * s + m


def matmul_ref(x: Tensor, w: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """x @ w; int8 weights: (x @ w) * scale, int4 weights: x @ dequantize_int4(w, scale), summed in float32 and
    rounded once, as the kernel does."""
    if scale is None:
        return x @ w
    if w.dtype == torch.int32:
        return (x.float() @ dequantize_int4(w, scale)).to(x.dtype)
    return ((x.float() @ w.float()) * scale).to(x.dtype)


def sparse_gemv_ref(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, glu: bool = False,
                    residual: Optional[Tensor] = None, active: Optional[Tensor] = None,
                    norm_weight: Optional[Tensor] = None, eps: float = 1e-5,
                    scale: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch reference. x [..., K], w [K, N], t [len(sizes), K] or None (dense); with norm_weight
    the input is RMS-normalised first. int8 weights come with scale [N] float32, int4 ones with scale [2, K/g, N]
    (see dequantize_int4)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    if t is None:
        y = matmul_ref(x, w, scale)
    else:
        per_word = 8 if w.dtype == torch.int32 else 1  # int4: eight columns per word
        parts = w.split([s // per_word for s in sizes], dim=1)
        scales = scale.split(list(sizes), dim=-1) if scale is not None else [None] * len(parts)
        y = torch.cat([matmul_ref(sparsify(x, t[j], active), p, scales[j]) for j, p in enumerate(parts)], dim=-1)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = residual + y
    return y


def sparse_mlp_ref(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor,
                   norm_weight: Optional[Tensor] = None, eps: float = 1e-5, scale: Optional[Tensor] = None,
                   scale_down: Optional[Tensor] = None) -> Tensor:
    """x + down(silu(gate) * up) of the (RMS-normalised) input, all three projections input-sparse: what
    sparse_mlp computes. x [.., D], w [D, 2I], t [2, D], w_down [I, D], t_down [1, I]."""
    I = w_down.shape[0]
    xn = rms_norm_ref(x, norm_weight, eps) if norm_weight is not None else x
    h = sparse_gemv_ref(xn, w, t, (I, I), glu=True, scale=scale)
    return sparse_gemv_ref(h, w_down, t_down, (w_down.shape[1],), residual=x, scale=scale_down)


def sum_squares_ref(y: Tensor, block_n: int) -> Tensor:
    """y [M, N] -> [M, cdiv(N, block_n)] fp32 sums of squares over column tiles (what `ss_out` holds)."""
    return torch.stack([c.float().pow(2).sum(-1) for c in y.split(block_n, dim=1)], dim=1)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, nw_ptr, ss_in_ptr, ss_out_ptr, idx_ptr,
    M, K, N_OUT, stride_xm, stride_wk, stride_rm, stride_ym, N_SS_IN,
    TILE_END0, TILE_END1, COL_END0, COL_END1, K_SPLIT, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    DOT: tl.constexpr, DOT_F32: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr, IS_SPLIT: tl.constexpr,
    NORM: tl.constexpr, SS_BLOCK: tl.constexpr, EMIT_SS: tl.constexpr, RED_BLOCK: tl.constexpr,
    ACC_ROWS: tl.constexpr, COMPACT: tl.constexpr, EPS: tl.constexpr, X_PARTS: tl.constexpr,
    PARTIAL_OUT: tl.constexpr,
    wd_ptr, td_ptr, dp_ptr, D_OUT, FUSE_DOWN: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_D: tl.constexpr,
    N_RED: tl.constexpr, RED_D: tl.constexpr, ACC_D: tl.constexpr, EVEN_D: tl.constexpr,
    s_ptr, sd_ptr, QUANT: tl.constexpr, GS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if FUSE_DOWN:  # count this program in: see _mlp_down
        tl.atomic_add(cnt_ptr + 2 * tl.num_programs(0), 1, sem="relaxed", scope="gpu")
    # which segment this tile of columns belongs to (tiles never straddle two segments)
    seg = (pid_n >= TILE_END0).to(tl.int32) + (pid_n >= TILE_END1).to(tl.int32)
    tile0 = tl.where(seg == 0, 0, tl.where(seg == 1, TILE_END0, TILE_END1))
    col0 = tl.where(seg == 0, 0, tl.where(seg == 1, COL_END0, COL_END1))
    col_end = tl.where(seg == 0, COL_END0, tl.where(seg == 1, COL_END1, N_OUT))
    cols = col0 + (pid_n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    if EVEN_N:  # every segment is a multiple of BLOCK_N: no column mask, so loads stay vectorised
        cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
        col_ok = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        col_ok = cols < col_end
    rows = tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    t_seg = t_ptr + seg * K
    out_mask = row_ok[:, None] & col_ok[None, :]
    res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_RES:  # loaded now so that the epilogue does not wait for it
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    if QUANT == 2:  # int4 weights: 8 columns per int32 word, scales per group of GS inputs (see _unpack4)
        wcols = (col0 + (pid_n - tile0) * BLOCK_N) // 8 + tl.arange(0, BLOCK_N // 8)  # [BN/8]
        if EVEN_N:
            wcols = tl.max_contiguous(tl.multiple_of(wcols, BLOCK_N // 8), BLOCK_N // 8)
        wcol_ok = wcols * 8 < col_end
        n_tot = N_OUT * (2 if GLU else 1)  # columns of the scales [2, K / GS, n_tot]
        cols3 = wcols[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BN/8, 8]: word, nibble
        s_cols3 = s_ptr + cols3
        col_ok3 = cols3 < col_end
    if QUANT == 1:  # int8 weights: per output column scales, applied to the sums (loaded now, like the residual)
        scale = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        scale_up = scale
        if GLU:
            scale_up = tl.load(s_ptr + N_OUT + cols, mask=col_ok, other=0.0)
    ss = tl.zeros((BLOCK_M, SS_BLOCK), dtype=tl.float32)
    if NORM:  # the producer's per-tile sums of squares: one small load, summed only once the first inputs' loads
        # are issued too (summing here would make them wait for it: two L2 round trips in a row)
        sj = tl.arange(0, SS_BLOCK)
        ss = tl.load(ss_in_ptr + rows[:, None] * N_SS_IN + sj[None, :],
                     mask=row_ok[:, None] & (sj < N_SS_IN)[None, :], other=0.0)

    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    # the input's dtype: gate/up partial sums (X_PARTS > 0, float32) become the output's once summed and gated
    xdt = y_ptr.dtype.element_ty if X_PARTS > 0 else x_ptr.dtype.element_ty
    if DOT:  # tensor cores on a [BM >= 16, BK] x [BK, BN] product, for batches
        inv_rms = _inv_rms(ss, K, EPS)  # [BM]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
            k_ok = ks < k_end
            x = _load_x(x_ptr, rows[:, None] * stride_xm + ks[None, :], row_ok[:, None] & k_ok[None, :], M * K,
                        X_PARTS, xdt)  # [BM, BK]
            if NORM:
                g = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                x = _rms_scale(x, g[None, :], inv_rms[:, None])
            t = tl.load(t_seg + ks, mask=k_ok, other=float("inf"))  # [BK]
            keep = tl.abs(x.to(tl.float32)) > t[None, :]
            need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BK]: some batch row keeps input k
            if QUANT == 2:  # BK divides GS: the step's rows share one group's scales
                s4, m4, s4_up, m4_up = _scales4(s_cols3, k0 // GS, n_tot, K // GS, N_OUT, col_ok3, GLU)
                w = _dequant4(_load_rows(w_ptr + ks[:, None] * stride_wk + wcols[None, :], need, wcol_ok, EVEN_N),
                              s4, m4, xdt)
            else:
                w = _as(_load_rows(w_ptr + ks[:, None] * stride_wk + cols[None, :], need, col_ok, EVEN_N), xdt)
            acc = _dot(tl.where(keep, x, 0.0).to(xdt), w, acc, DOT_F32)
            if GLU:  # the up half: columns N_OUT + cols, threshold row 1
                t_up = tl.load(t_ptr + K + ks, mask=k_ok, other=float("inf"))
                keep_up = tl.abs(x.to(tl.float32)) > t_up[None, :]
                need_up = tl.max(keep_up.to(tl.int32), axis=0) > 0
                if QUANT == 2:
                    w_up = _dequant4(_load_rows(w_ptr + ks[:, None] * stride_wk + (wcols + N_OUT // 8)[None, :],
                                                need_up, wcol_ok, EVEN_N), s4_up, m4_up, xdt)
                else:
                    w_up = _as(_load_rows(w_ptr + ks[:, None] * stride_wk + (cols + N_OUT)[None, :], need_up, col_ok,
                                          EVEN_N), xdt)
                acc_up = _dot(tl.where(keep_up, x, 0.0).to(xdt), w_up, acc_up, DOT_F32)
        part, part_up = acc, acc_up
    else:  # M == 1: compact the kept inputs of this program's K range, then stream only their weight rows
        # 1. one entry per kept input k in a per-program scratch list (int32): the input's 16 bits (fp32 inputs
        #    go to a second list), a flag per half (gate, up) and k - k_begin; the same CTA reads it back after
        #    a barrier
        X32: tl.constexpr = xdt.primitive_bitwidth == 32
        scratch = idx_ptr + (pid_n * SPLIT_K + pid_k) * K_SPLIT * (2 if X32 else 1)
        n_kept = 0
        t_max = 0.0
        inv = 0.0  # 1 / RMS of the input row with NORM, kept for the dense branch
        for c0 in range(k_begin, k_end, COMPACT):
            ks = c0 + tl.arange(0, COMPACT)
            k_ok = ks < k_end
            # every load of the chunk first, so that they are all in flight before anything waits on one
            # loaded here, not through _load_x: torch.compile's mutation analysis takes every pointer handed to a
            # call whose result feeds a store's address (the list position depends on x) as written
            if X_PARTS == 0:
                x = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
            else:
                gate = tl.load(x_ptr + ks, mask=k_ok, other=0.0)
                up = tl.load(x_ptr + K + ks, mask=k_ok, other=0.0)
                for s in tl.static_range(1, X_PARTS):
                    gate += tl.load(x_ptr + 2 * s * K + ks, mask=k_ok, other=0.0)
                    up += tl.load(x_ptr + (2 * s + 1) * K + ks, mask=k_ok, other=0.0)
            t = tl.load(t_seg + ks, mask=k_ok, other=0.0)
            t_up = t
            if GLU:
                t_up = tl.load(t_ptr + K + ks, mask=k_ok, other=0.0)
            if NORM:  # loaded here, not in the helper: torch.compile's mutation analysis takes a pointer handed
                # to a call whose result is stored as written
                g = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                # the sums of squares made chunk-dependent (c0 >= 0 always): the compiler would otherwise hoist their
                # sum above the loop, in front of this chunk's loads, and wait for ss before issuing them
                inv = tl.sum(_inv_rms(tl.where(c0 >= 0, ss, 0.0), K, EPS), axis=0)
            if X_PARTS > 0:
                x = _glu(gate, up, xdt).to(xdt)
            if NORM:
                x = _rms_scale(x, g, inv)
            xf = x.to(tl.float32)
            keep = (tl.abs(xf) > t) & k_ok
            t_max = tl.maximum(t_max, tl.max(t, axis=0))
            entry = (keep.to(tl.int32) << 14) | (ks - k_begin)
            if GLU:
                keep_up = (tl.abs(xf) > t_up) & k_ok
                t_max = tl.maximum(t_max, tl.max(t_up, axis=0))
                entry = entry | (keep_up.to(tl.int32) << 15)
                keep = keep | keep_up
            if QUANT == 2:  # int4: each group of GS inputs starts a new step of BK entries, so that one group's
                # scales serve a whole step; a group's last step is filled up with flagless entries into the group
                NG: tl.constexpr = COMPACT // GS
                kg = tl.reshape(keep.to(tl.int32), (NG, GS))
                cnt = tl.sum(kg, axis=1)  # [NG]
                padded = (cnt + BLOCK_K - 1) // BLOCK_K * BLOCK_K
                base = n_kept + tl.cumsum(padded, axis=0) - padded
                pos = tl.reshape(base[:, None] + tl.cumsum(kg, axis=1) - 1, (COMPACT,))
                jf = tl.arange(0, BLOCK_K)
                fill = base[:, None] + cnt[:, None] + jf[None, :]  # [NG, BK]
                fill_ok = jf[None, :] < (padded - cnt)[:, None]
                first = c0 - k_begin + tl.arange(0, NG) * GS
                tl.store(scratch + fill, first[:, None] + 0 * jf[None, :], mask=fill_ok)
                if X32:
                    tl.store(scratch + K_SPLIT + fill, 0 * fill, mask=fill_ok)
                n_kept += tl.sum(padded, axis=0)
            else:
                pos = n_kept + _inclusive_count(keep.to(tl.int32), COMPACT, 8) - 1
                n_kept += tl.sum(keep.to(tl.int32), axis=0)
            if X32:
                tl.store(scratch + K_SPLIT + pos, x.to(tl.int32, bitcast=True), mask=keep)
            else:
                entry = entry | (x.to(tl.uint16, bitcast=True).to(tl.int32) << 16)
            tl.store(scratch + pos, entry, mask=keep)
        # 2. software pipeline over groups of BK rows: group a is multiplied while group b's weight rows (and
        #    group c's list entries) are loading; rows k and k + ACC_ROWS sit in one thread, so folding the
        #    [BK, BN] products into an [ACC_ROWS, BN] accumulator stays in registers
        acc = tl.zeros((ACC_ROWS, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((ACC_ROWS, BLOCK_N), dtype=tl.float32)
        w_cols = w_ptr + k_begin * stride_wk + cols[None, :]
        if QUANT == 2:
            part4, part4_up = _stream4(x_ptr, nw_ptr, inv, w_ptr + k_begin * stride_wk + wcols[None, :], wcol_ok,
                                       s_cols3, col_ok3, scratch, n_kept, t_max, k_begin, k_end, K, K_SPLIT,
                                       stride_wk, N_OUT, n_tot, BLOCK_K, EVEN_N, GLU, NORM, X_PARTS, xdt,
                                       ACC_ROWS, GS)
        elif t_max == 0:  # zero thresholds (dense): every row counts (a zero input adds zero), so stream the rows
            # in order, with no list and no dependent load before the weight loads
            xa, wa, wua = _dense_group(x_ptr, nw_ptr, inv, w_cols, k_begin, 0, k_end, K, stride_wk, N_OUT,
                                       col_ok, BLOCK_K, EVEN_N, GLU, NORM, X_PARTS, xdt)
            for j in range(BLOCK_K, k_end - k_begin, BLOCK_K):
                xb, wb, wub = _dense_group(x_ptr, nw_ptr, inv, w_cols, k_begin, j, k_end, K, stride_wk, N_OUT,
                                           col_ok, BLOCK_K, EVEN_N, GLU, NORM, X_PARTS, xdt)
                acc = _fma(acc, xa, wa, ACC_ROWS)
                if GLU:
                    acc_up = _fma(acc_up, xa, wua, ACC_ROWS)
                xa, wa, wua = xb, wb, wub
            acc = _fma(acc, xa, wa, ACC_ROWS)
            if GLU:
                acc_up = _fma(acc_up, xa, wua, ACC_ROWS)
        else:
            tl.debug_barrier()  # the list is complete and visible to every thread of the program
            ea, xa = _entries(scratch, 0, n_kept, K_SPLIT, xdt, BLOCK_K)
            eb, xb = _entries(scratch, BLOCK_K, n_kept, K_SPLIT, xdt, BLOCK_K)
            wa, wua = _group_rows(w_cols, ea, stride_wk, N_OUT, col_ok, EVEN_N, GLU)
            for j in range(BLOCK_K, n_kept, BLOCK_K):
                ec, xc = _entries(scratch, j + BLOCK_K, n_kept, K_SPLIT, xdt, BLOCK_K)
                wb, wub = _group_rows(w_cols, eb, stride_wk, N_OUT, col_ok, EVEN_N, GLU)
                acc, acc_up = _group_fma(acc, acc_up, ea, xa, wa, wua, ACC_ROWS, GLU)
                ea, xa, wa, wua = eb, xb, wb, wub
                eb, xb = ec, xc
            acc, acc_up = _group_fma(acc, acc_up, ea, xa, wa, wua, ACC_ROWS, GLU)
        part = tl.sum(acc, axis=0)[None, :]  # [1, BN]
        part_up = tl.sum(acc_up, axis=0)[None, :]
        if QUANT == 2:
            part, part_up = part4[None, :], part4_up[None, :]
    if QUANT == 1:  # (a split's partial sums too: the scale is linear)
        part = part * scale[None, :]
        part_up = part_up * scale_up[None, :]

    if FUSE_DOWN:  # gate/up, then down in the same launch (see _mlp_down)
        tile_lists = idx_ptr + tl.num_programs(0) * SPLIT_K * K_SPLIT * (2 if X32 else 1)  # after the K-range lists
        _mlp_down(part, part_up, pid_n, pid_k, cols, ws_ptr, cnt_ptr, tile_lists, wd_ptr, td_ptr, dp_ptr, res_ptr,
                  y_ptr, ss_out_ptr, sd_ptr, N_OUT, D_OUT,
                  tl.num_programs(0), tl.num_programs(0) * SPLIT_K, IS_SPLIT, SPLIT_K, BLOCK_N, BLOCK_D, ROWS_D,
                  ACC_D, EVEN_D, N_RED, RED_D, RED_BLOCK, QUANT)
    elif PARTIAL_OUT:  # y [SPLIT_K, 2 if GLU, M, N_OUT] float32: the consumer sums the partials as it loads them
        n_halves_out: tl.constexpr = 2 if GLU else 1
        yp = y_ptr + (pid_k * n_halves_out * M + rows[:, None]) * N_OUT + cols[None, :]
        tl.store(yp, part, mask=out_mask)
        if GLU:
            tl.store(yp + M * N_OUT, part_up, mask=out_mask)
    elif not IS_SPLIT:
        _epilogue(part, part_up, res, y_ptr, ss_out_ptr, rows, row_ok, cols, out_mask, stride_rm, stride_ym,
                  GLU, HAS_RES, EMIT_SS)
    else:
        # workspace [SPLIT_K, 2 if GLU, BLOCK_M, N_OUT] fp32
        n_halves: tl.constexpr = 2 if GLU else 1
        ws = ws_ptr + rows[:, None] * N_OUT + cols[None, :]
        split_stride = n_halves * BLOCK_M * N_OUT
        tl.store(ws + pid_k * split_stride, part, mask=out_mask)
        if GLU:
            tl.store(ws + pid_k * split_stride + BLOCK_M * N_OUT, part_up, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are stored before the counter moves
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            total_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if DOT:
                for s in range(SPLIT_K):  # a fixed order: the sum does not depend on arrival order
                    total += tl.load(ws + s * split_stride, mask=out_mask, other=0.0, cache_modifier=".cg")
                    if GLU:
                        total_up += tl.load(ws + s * split_stride + BLOCK_M * N_OUT, mask=out_mask, other=0.0,
                                            cache_modifier=".cg")
            else:  # RED_BLOCK partials per load: one L2 round trip for up to RED_BLOCK splits
                for s0 in range(0, SPLIT_K, RED_BLOCK):
                    sp = s0 + tl.arange(0, RED_BLOCK)
                    pm = (sp < SPLIT_K)[:, None] & col_ok[None, :]
                    p = ws_ptr + sp[:, None] * split_stride + cols[None, :]
                    total += tl.sum(tl.load(p, mask=pm, other=0.0, cache_modifier=".cg"), axis=0)[None, :]
                    if GLU:
                        total_up += tl.sum(tl.load(p + N_OUT, mask=pm, other=0.0, cache_modifier=".cg"),
                                           axis=0)[None, :]
            _epilogue(total, total_up, res, y_ptr, ss_out_ptr, rows, row_ok, cols, out_mask, stride_rm, stride_ym,
                      GLU, HAS_RES, EMIT_SS)
            tl.store(cnt_ptr + pid_n, 0)


@triton.jit
def _mlp_down(part, part_up, pid_n, pid_k, cols, ws_ptr, cnt_ptr, lst_ptr, wd_ptr, td_ptr, dp_ptr, res_ptr, y_ptr,
              ss_ptr, sd_ptr, I, D, P, GRID, IS_SPLIT: tl.constexpr, SPLIT_K, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, ROWS_D: tl.constexpr, ACC: tl.constexpr, EVEN_D: tl.constexpr,
              N_RED: tl.constexpr, RED_D: tl.constexpr, RED_P: tl.constexpr, QUANT: tl.constexpr):
    """The fused MLP's second half, batch 1 (see launch_mlp). Column tile p of gate/up is the row range
    [p BN, +BN) of the down projection's input h = silu(gate) * up.
    1. The program that completes tile p (the last of its programs along K) lists h's kept rows of the tile (row
       and value, in the format of the kept-input lists) and appends p to a queue of finished tiles.
    2. Every program, once its gate/up share is done, takes work units from a shared counter: unit u is column
       block u % C of the u // C-th finished tile (it waits for that tile if it is not finished yet), and stores
       the unit's [BLOCK_D] partial sums at [p, block]. So the down rows are streamed by all programs as tiles
       finish, and no program is left with a whole tile's rows at the end.
    3. The N_RED units after the last work unit each sum one slice of the output over the P partials, in tile
       order (deterministic), once every work unit is done, and write residual + down and the slice's sum of
       squares.
    Waiting is safe: a program takes units only after every program of the grid has started (a counter), so
    whatever it waits for is being computed by a running program; the CPU interpreter, which runs programs one
    after another, leaves every unit to the last one. The last program to leave resets the counters.
    cnt_ptr: [P] tile counters, [P] queue, then started, taken, finished tiles, units done, left."""
    dt = y_ptr.dtype.element_ty
    xdt: tl.constexpr = dt
    X32: tl.constexpr = xdt.primitive_bitwidth == 32
    queue = cnt_ptr + P
    ctr = cnt_ptr + 2 * P
    # 1. this tile's share of gate/up into the workspace [SPLIT_K, 2, I], read back below (also with one program
    #    along K: the list's store address must depend on loaded values only, or torch.compile's mutation analysis
    #    takes the weights for written)
    r_ok = cols < I
    ws = ws_ptr + pid_k * 2 * I + cols
    tl.store(ws, tl.sum(part, axis=0), mask=r_ok)
    tl.store(ws + I, tl.sum(part_up, axis=0), mask=r_ok)
    tl.debug_barrier()
    last = True
    if IS_SPLIT:
        last = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
    if last:
        gate = tl.load(ws_ptr + cols, mask=r_ok, other=0.0, cache_modifier=".cg")
        up = tl.load(ws_ptr + I + cols, mask=r_ok, other=0.0, cache_modifier=".cg")
        for s in range(1, SPLIT_K):
            gate += tl.load(ws_ptr + s * 2 * I + cols, mask=r_ok, other=0.0, cache_modifier=".cg")
            up += tl.load(ws_ptr + s * 2 * I + I + cols, mask=r_ok, other=0.0, cache_modifier=".cg")
        if IS_SPLIT:
            tl.store(cnt_ptr + pid_n, 0)  # zero again for the next launch
        h = _glu(gate, up, dt).to(dt)  # [BN], rounded as down's input is
        keep = (tl.abs(h.to(tl.float32)) > tl.load(td_ptr + cols, mask=r_ok, other=float("inf"))) & r_ok
        n_kept = tl.sum(keep.to(tl.int32), axis=0)
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        lst = lst_ptr + pid_n * BLOCK_N * (2 if X32 else 1)
        entry = (1 << 14) | (cols - pid_n * BLOCK_N)
        if X32:
            tl.store(lst + BLOCK_N + pos, h.to(tl.int32, bitcast=True), mask=keep)
        else:
            entry = entry | (h.to(tl.uint16, bitcast=True).to(tl.int32) << 16)
        tl.store(lst + pos, entry, mask=keep)
        tl.debug_barrier()  # the list is stored before the tile is announced
        slot = tl.atomic_add(ctr + 2, 1, sem="relaxed", scope="gpu")
        tl.atomic_xchg(queue + slot, pid_n * 256 + n_kept + 1, sem="release", scope="gpu")
    # 2. and 3. work units, then reduction units
    C = tl.cdiv(D, BLOCK_D)
    NU = P * C
    dcols = tl.arange(0, BLOCK_D)
    u = NU + N_RED
    if tl.atomic_add(ctr, 0, sem="relaxed", scope="gpu") == GRID:
        u = tl.atomic_add(ctr + 1, 1, sem="relaxed", scope="gpu")
    while u < NU + N_RED:
        if u < NU:
            v = tl.atomic_add(queue + u // C, 0, sem="acquire", scope="gpu")
            while v == 0:
                v = tl.atomic_add(queue + u // C, 0, sem="acquire", scope="gpu")
            p = (v - 1) >> 8
            nk = (v - 1) & 255
            dc = (u % C) * BLOCK_D + dcols
            d_ok = dc < D
            lst = lst_ptr + p * BLOCK_N * (2 if X32 else 1)
            w_cols = wd_ptr + p * BLOCK_N * D + dc[None, :]
            # the kept rows in groups of ROWS_D, the next group's rows (and the one after's entries) in flight
            acc = tl.zeros((ACC, BLOCK_D), dtype=tl.float32)
            ea, xa = _entries(lst, 0, nk, BLOCK_N, xdt, ROWS_D)
            eb, xb = _entries(lst, ROWS_D, nk, BLOCK_N, xdt, ROWS_D)
            wa, wu = _group_rows(w_cols, ea, D, 0, d_ok, EVEN_D, False)  # (wu, au: the unused up halves)
            for j in range(ROWS_D, nk, ROWS_D):
                ec, xc = _entries(lst, j + ROWS_D, nk, BLOCK_N, xdt, ROWS_D)
                wb, wu = _group_rows(w_cols, eb, D, 0, d_ok, EVEN_D, False)
                acc, au = _group_fma(acc, acc, ea, xa, wa, wa, ACC, False)
                ea, xa, wa = eb, xb, wb
                eb, xb = ec, xc
            acc, au = _group_fma(acc, acc, ea, xa, wa, wa, ACC, False)
            unit = tl.sum(acc, axis=0)
            if QUANT:  # int8 down weights: its per column scales
                unit *= tl.load(sd_ptr + dc, mask=d_ok, other=0.0)
            tl.store(dp_ptr + p * D + dc, unit, mask=d_ok)
            tl.debug_barrier()
            tl.atomic_add(ctr + 3, 1, sem="release", scope="gpu")
        else:
            done = tl.atomic_add(ctr + 3, 0, sem="acquire", scope="gpu")
            while done < NU:
                done = tl.atomic_add(ctr + 3, 0, sem="acquire", scope="gpu")
            _reduce_slice(u - NU, dp_ptr, res_ptr, y_ptr, ss_ptr, D, P, RED_D, RED_P)
        u = tl.atomic_add(ctr + 1, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    if tl.atomic_add(ctr + 4, 1, sem="acq_rel", scope="gpu") == GRID - 1:  # the last to leave: all is done
        for q0 in range(0, P, BLOCK_N):
            q = q0 + tl.arange(0, BLOCK_N)
            tl.store(queue + q, 0, mask=q < P)
        c5 = tl.arange(0, 8)
        tl.store(ctr + c5, 0, mask=c5 < 5)


@triton.jit
def _reduce_slice(r, dp_ptr, res_ptr, y_ptr, ss_ptr, D, P, RED_D: tl.constexpr, RED_P: tl.constexpr):
    """Slice r of the down projection's output: its P partials summed in tile order, the residual added, stored,
    and the slice's sum of squares (for the next RMSNorm). One load: RED_P >= P."""
    dt = y_ptr.dtype.element_ty
    cols = r * RED_D + tl.arange(0, RED_D)
    ok = cols < D
    sp = tl.arange(0, RED_P)
    p = tl.load(dp_ptr + sp[:, None] * D + cols[None, :], mask=(sp < P)[:, None] & ok[None, :], other=0.0,
                cache_modifier=".cg")
    total = tl.sum(p, axis=0)
    res = tl.load(res_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = (res + total.to(dt).to(tl.float32)).to(dt)
    tl.store(y_ptr + cols, y, mask=ok)
    yf = tl.where(ok, y.to(tl.float32), 0.0)
    tl.store(ss_ptr + r, tl.sum(yf * yf, axis=0))


@triton.jit
def _inclusive_count(keep, C: tl.constexpr, PER: tl.constexpr):
    """Inclusive prefix sum of a 0/1 [C] tensor. A plain tl.cumsum runs in the list store's layout, one element per
    thread (a scatter store is never vectorised): a round of warp shuffles per 32 * warps inputs. Here each thread sums
    its runs of PER inputs (one 16-byte load's worth) in registers and only the run sums are scanned across threads
    (gate/up: 115 -> 31 shuffles in the PTX)."""
    k2 = tl.reshape(keep, (C // PER, PER))
    run = tl.sum(k2, axis=1)  # [C/PER]
    before = tl.cumsum(run, axis=0) - run
    return tl.reshape(before[:, None] + tl.cumsum(k2, axis=1), (C,))


@triton.jit
def _entries(scratch, j, n_kept, K_SPLIT, xdt: tl.constexpr, BLOCK_K: tl.constexpr):
    """Entries j .. j+BK of the kept list and their inputs (float32); 0 past its end (no flag set: nothing
    is loaded for them)."""
    jj = j + tl.arange(0, BLOCK_K)
    ok = jj < n_kept
    e = tl.load(scratch + jj, mask=ok, other=0, cache_modifier=".cg")
    if xdt.primitive_bitwidth == 32:
        x = tl.load(scratch + K_SPLIT + jj, mask=ok, other=0, cache_modifier=".cg").to(tl.float32, bitcast=True)
    else:
        x = (e >> 16).to(tl.uint16).to(xdt, bitcast=True).to(tl.float32)
    return e, x


@triton.jit
def _load_x(x_ptr, offs, mask, part_stride, X_PARTS: tl.constexpr, xdt: tl.constexpr):
    """The input at offs ([M, K] offsets): plain, or with X_PARTS > 0 silu(gate) * up from a gate/up launch's
    split-K partials [X_PARTS, 2, M, K] (part_stride = M K), summed in split order and rounded where the GLU
    epilogue rounds."""
    if X_PARTS == 0:
        return tl.load(x_ptr + offs, mask=mask, other=0.0)
    gate = tl.load(x_ptr + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + part_stride + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, X_PARTS):
        gate += tl.load(x_ptr + 2 * s * part_stride + offs, mask=mask, other=0.0)
        up += tl.load(x_ptr + (2 * s + 1) * part_stride + offs, mask=mask, other=0.0)
    return _glu(gate, up, xdt).to(xdt)


@triton.jit
def _glu(gate, up, dt: tl.constexpr):
    """silu(gate) * up in float32 from float32 sums, rounded where the reference rounds: each projection to dt,
    then silu, then the product (the caller rounds the product)."""
    g = gate.to(dt).to(tl.float32)
    return (g * tl.sigmoid(g)).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)


@triton.jit
def _dense_group(x_ptr, nw_ptr, inv_rms, w_cols, k_begin, j, k_end, K, stride_wk, N_OUT, col_ok,
                 BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr,
                 X_PARTS: tl.constexpr, xdt: tl.constexpr):
    """Inputs k_begin+j .. +BK (float32, normalised like the list path) and their weight rows, all loaded."""
    jj = j + tl.arange(0, BLOCK_K)
    ks = k_begin + jj
    ok = ks < k_end
    x = _load_x(x_ptr, ks, ok, K, X_PARTS, xdt)
    if NORM:
        x = _rms_scale(x, tl.load(nw_ptr + ks, mask=ok, other=0.0).to(tl.float32), inv_rms)
    rows = w_cols + jj[:, None] * stride_wk
    w = _load_rows(rows, ok, col_ok, EVEN_N)
    w_up = w
    if GLU:
        w_up = _load_rows(rows + N_OUT, ok, col_ok, EVEN_N)
    return x.to(tl.float32), w, w_up


@triton.jit
def _group_rows(w_cols, e, stride_wk, N_OUT, col_ok, EVEN_N: tl.constexpr, GLU: tl.constexpr):
    """The weight rows [BK, BN] of a group of entries (gate/first segment, and up with GLU)."""
    rows = w_cols + (e & 0x3FFF)[:, None] * stride_wk
    w = _load_rows(rows, (e & 0x4000) != 0, col_ok, EVEN_N)
    w_up = w
    if GLU:
        w_up = _load_rows(rows + N_OUT, (e & 0x8000) != 0, col_ok, EVEN_N)
    return w, w_up


@triton.jit
def _group_fma(acc, acc_up, e, x, w, w_up, ACC_ROWS: tl.constexpr, GLU: tl.constexpr):
    acc = _fma(acc, tl.where((e & 0x4000) != 0, x, 0.0), w, ACC_ROWS)
    if GLU:
        acc_up = _fma(acc_up, tl.where((e & 0x8000) != 0, x, 0.0), w_up, ACC_ROWS)
    return acc, acc_up


@triton.jit
def _fma(acc, x, w, ROWS: tl.constexpr):
    """acc [ROWS, BN] + x [BK] * w [BK, BN], rows k, k + ROWS, k + 2 ROWS, ... folded into acc (ROWS divides
    BK; those rows sit in one thread, so the fold stays in registers). int8 w is widened by a magic number (the
    float 2^23 + 128 + w, less 2^23 + 128, exact): an integer and a float add where the int8 -> float conversion
    (I2F) issues at a quarter of their rate (docs/perf-notes.md, sessions 7 and 8)."""
    if w.dtype == tl.int8:
        wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        wf = w.to(tl.float32)
    p = x[:, None] * wf
    BK: tl.constexpr = p.shape[0]
    BN: tl.constexpr = p.shape[1]
    if BK == ROWS:
        return acc + p
    return acc + tl.sum(tl.reshape(p, (BK // ROWS, ROWS, BN)), axis=0)


@triton.jit
def _stream4(x_ptr, nw_ptr, inv, w_cols, wcol_ok, s_cols, col_ok, scratch, n_kept, t_max, k_begin, k_end, K,
             K_SPLIT, stride_wk, N_OUT, n_tot, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr,
             NORM: tl.constexpr, X_PARTS: tl.constexpr, xdt: tl.constexpr, ACC_ROWS: tl.constexpr,
             GS: tl.constexpr):
    """The batch-1 stream over int4 rows (w_cols: int32 words [1, BN/8]) -> the sums [BN] (and up's), pipelined
    like the 16-bit and int8 stream: steps of BK rows in order when every threshold is zero, else steps of BK list
    entries (one group's each, see the compaction). Each step loads its group's scales (s_cols [BN/8, 8]) with its
    rows. Tiles stay [rows, BN/8, 8] (word, nibble) until the end: joining nibbles into columns per step would
    go through shared memory."""
    G = K // GS
    W: tl.constexpr = w_cols.shape[1]
    acc = tl.zeros((ACC_ROWS, W, 8), dtype=tl.float32)
    acc_up = tl.zeros((ACC_ROWS, W, 8), dtype=tl.float32)
    if t_max == 0:
        xa, wa, wua = _dense_group(x_ptr, nw_ptr, inv, w_cols, k_begin, 0, k_end, K, stride_wk, N_OUT // 8,
                                   wcol_ok, BLOCK_K, EVEN_N, GLU, NORM, X_PARTS, xdt)
        sa, ma, sua, mua = _scales4(s_cols, k_begin // GS, n_tot, G, N_OUT, col_ok, GLU)
        for j in range(BLOCK_K, k_end - k_begin, BLOCK_K):
            xb, wb, wub = _dense_group(x_ptr, nw_ptr, inv, w_cols, k_begin, j, k_end, K, stride_wk, N_OUT // 8,
                                       wcol_ok, BLOCK_K, EVEN_N, GLU, NORM, X_PARTS, xdt)
            sb, mb, sub, mub = _scales4(s_cols, (k_begin + j) // GS, n_tot, G, N_OUT, col_ok, GLU)
            acc = _fma4(acc, xa, wa, sa, ma, ACC_ROWS)
            if GLU:
                acc_up = _fma4(acc_up, xa, wua, sua, mua, ACC_ROWS)
            xa, wa, wua, sa, ma, sua, mua = xb, wb, wub, sb, mb, sub, mub
        acc = _fma4(acc, xa, wa, sa, ma, ACC_ROWS)
        if GLU:
            acc_up = _fma4(acc_up, xa, wua, sua, mua, ACC_ROWS)
    else:
        tl.debug_barrier()  # the list is complete and visible to every thread of the program
        ea, xa = _entries(scratch, 0, n_kept, K_SPLIT, xdt, BLOCK_K)
        eb, xb = _entries(scratch, BLOCK_K, n_kept, K_SPLIT, xdt, BLOCK_K)
        ga = _step_group(scratch, 0, n_kept, k_begin, GS)
        gb = _step_group(scratch, BLOCK_K, n_kept, k_begin, GS)
        wa, wua = _group_rows(w_cols, ea, stride_wk, N_OUT // 8, wcol_ok, EVEN_N, GLU)
        sa, ma, sua, mua = _scales4(s_cols, ga, n_tot, G, N_OUT, col_ok, GLU)
        for j in range(BLOCK_K, n_kept, BLOCK_K):
            ec, xc = _entries(scratch, j + BLOCK_K, n_kept, K_SPLIT, xdt, BLOCK_K)
            gc = _step_group(scratch, j + BLOCK_K, n_kept, k_begin, GS)
            wb, wub = _group_rows(w_cols, eb, stride_wk, N_OUT // 8, wcol_ok, EVEN_N, GLU)
            sb, mb, sub, mub = _scales4(s_cols, gb, n_tot, G, N_OUT, col_ok, GLU)
            acc = _fma4(acc, tl.where((ea & 0x4000) != 0, xa, 0.0), wa, sa, ma, ACC_ROWS)
            if GLU:
                acc_up = _fma4(acc_up, tl.where((ea & 0x8000) != 0, xa, 0.0), wua, sua, mua, ACC_ROWS)
            ea, xa, wa, wua, sa, ma, sua, mua = eb, xb, wb, wub, sb, mb, sub, mub
            eb, xb, gb = ec, xc, gc
        acc = _fma4(acc, tl.where((ea & 0x4000) != 0, xa, 0.0), wa, sa, ma, ACC_ROWS)
        if GLU:
            acc_up = _fma4(acc_up, tl.where((ea & 0x8000) != 0, xa, 0.0), wua, sua, mua, ACC_ROWS)
    return tl.reshape(tl.sum(acc, axis=0), (W * 8,)), tl.reshape(tl.sum(acc_up, axis=0), (W * 8,))


@triton.jit
def _step_group(scratch, j, n_kept, k_begin, GS: tl.constexpr):
    """The group of list entries j .. j+BK (one group per step): that of its first entry."""
    e0 = tl.load(scratch + j, mask=j < n_kept, other=0, cache_modifier=".cg")
    return (k_begin + (e0 & 0x3FFF)) // GS


@triton.jit
def _scales4(s_cols, grp, n_tot, G, N_OUT, col_ok, GLU: tl.constexpr):
    """Group grp's scales s and offsets m (w = q s + m) of the tile's columns s_cols [BN/8, 8], float32; with GLU
    also up's."""
    s = tl.load(s_cols + grp * n_tot, mask=col_ok, other=0.0).to(tl.float32)
    m = tl.load(s_cols + (G + grp) * n_tot, mask=col_ok, other=0.0).to(tl.float32)
    s_up, m_up = s, m
    if GLU:
        s_up = tl.load(s_cols + grp * n_tot + N_OUT, mask=col_ok, other=0.0).to(tl.float32)
        m_up = tl.load(s_cols + (G + grp) * n_tot + N_OUT, mask=col_ok, other=0.0).to(tl.float32)
    return s, m, s_up, m_up


@triton.jit
def _nibble(w, i: tl.constexpr):
    """Nibble i of int32 words w as the float32 1 + q/16: shifted to the top of the mantissa, the exponent of 1
    or-ed in (a shift and a LOP3), so there is no int -> float conversion."""
    if 4 * i <= 19:
        v = w << (19 - 4 * i)
    else:
        v = w >> (4 * i - 19)
    return ((v & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _unpack4(words):
    """int32 words [R, W], 8 unsigned 4-bit weights each (bits 4i..4i+3 of word c: column 8c + i) -> [R, W, 8]
    float32 1 + q/16 (_nibble). Built by joins, which keep a word's nibbles in the thread that loaded it."""
    a = tl.join(tl.join(_nibble(words, 0), _nibble(words, 4)), tl.join(_nibble(words, 2), _nibble(words, 6)))
    b = tl.join(tl.join(_nibble(words, 1), _nibble(words, 5)), tl.join(_nibble(words, 3), _nibble(words, 7)))
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    return tl.reshape(tl.join(a, b), (R, W, 8))  # [.., i & 1, (i >> 1) & 1, i >> 2] flattened in that order


@triton.jit
def _fma4(acc, x, words, s, m, ROWS: tl.constexpr):
    """acc [ROWS, W, 8] + x [BK] @ (q s + m) over one group's rows (words [BK, W], s, m [W, 8]). With f = 1 + q/16
    (_unpack4): sum_k x_k (q_k s + m) = 16 s sum_k x_k f_k + (m - 16 s) sum_k x_k, so the scales apply once per
    step, to the step's sums folded to ROWS rows as in _fma."""
    f = _unpack4(words)
    BK: tl.constexpr = f.shape[0]
    W: tl.constexpr = f.shape[1]
    p = x[:, None, None] * f
    xs = x
    if BK != ROWS:
        p = tl.sum(tl.reshape(p, (BK // ROWS, ROWS, W, 8)), axis=0)
        xs = tl.sum(tl.reshape(x, (BK // ROWS, ROWS)), axis=0)
    s16 = 16.0 * s
    return acc + p * s16[None, :, :] + xs[:, None, None] * (m - s16)[None, :, :]


@triton.jit
def _dequant4(words, s, m, xdt: tl.constexpr):
    """int4 rows [BK, BN/8] of one group with its scales s, m [BN/8, 8] (_scales4), dequantized to xdt [BK, BN]
    for tl.dot: q s + m."""
    f = _unpack4(words)
    R: tl.constexpr = f.shape[0]
    W: tl.constexpr = f.shape[1]
    return tl.reshape((f - 1.0) * (16.0 * s)[None, :, :] + m[None, :, :], (R, W * 8)).to(xdt)


@triton.jit
def _inv_rms(ss, K, EPS: tl.constexpr):
    """1 / RMS of each row [BM] from its per-tile sums of squares [BM, tiles] over K inputs."""
    return tl.rsqrt(tl.sum(ss, axis=1) / K + EPS)


@triton.jit
def _rms_scale(x, g, inv_rms):
    # rounded where the reference RMSNorm rounds: x * inv_rms to the dtype, then times the weight g (float32)
    xdt = x.dtype
    return ((x.to(tl.float32) * inv_rms).to(xdt).to(tl.float32) * g).to(xdt)


@triton.jit
def _as(w, xdt: tl.constexpr):
    """Weights in the inputs' dtype for tl.dot: int8 values are exact in 16-bit floats (widened through float32:
    Triton's CPU interpreter converts int8 to bf16 wrongly)."""
    if w.dtype == tl.int8:
        return w.to(tl.float32).to(xdt)
    return w.to(xdt)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:  # Triton's CPU interpreter multiplies bf16 operands wrongly; fp32 gives the same products
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _load_rows(ptrs, keep_k, col_ok, EVEN_N: tl.constexpr):
    # rows whose input is dropped are never read; a [BK, 1] mask keeps 16-byte loads along a weight row,
    # a [BK, BN] one is used only when a segment ends inside a tile
    if EVEN_N:
        w = tl.load(ptrs, mask=keep_k[:, None], other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(ptrs, mask=keep_k[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _epilogue(acc, acc_up, res, y_ptr, ss_ptr, rows, row_ok, cols, mask, stride_rm, stride_ym,
              GLU: tl.constexpr, HAS_RES: tl.constexpr, EMIT_SS: tl.constexpr):
    # round where the reference rounds: each projection to the output dtype, then silu, product, sum
    dt = y_ptr.dtype.element_ty
    y = acc.to(dt).to(tl.float32)
    if GLU:
        y = _glu(acc, acc_up, dt)
    if HAS_RES:
        y = res + y.to(dt).to(tl.float32)
    y = y.to(dt)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y, mask=mask)
    if EMIT_SS:  # this tile's share of each row's sum of squares, for the next RMSNorm
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        n_tiles = tl.num_programs(0)
        tl.store(ss_ptr + rows * n_tiles + tl.program_id(0), tl.sum(yf * yf, axis=1), mask=row_ok)


class Config(NamedTuple):
    block_n: int
    block_k: int
    split_k: int  # programs along K; the last one of a column tile reduces the partials
    num_warps: int
    num_stages: int
    dot: int  # 1: tensor-core tl.dot over batch rows padded to 16; 0: FMA path (needs M == 1)


def default_config(M: int, K: int, sizes, glu: bool, n_sm: int = 132, int8: bool = False,
                   head: bool = False, group: int = 0) -> Config:
    """A launch config from the H100 sweeps (scripts/tune_gemv.py, docs/perf-notes.md). int8: for int8 weights;
    head: the LM head (a vocabulary of columns, never thresholded); group: for int4 weights with scale groups of
    that many inputs (group_size)."""
    out = sizes[:1] if glu else sizes
    fits = [b for b in (128, 64, 32) if all(s % b == 0 for s in out)] or [64]
    block_n = fits[0]
    if head and M == 1:  # 256-column tiles, a second K range while both fit three programs per SM (head sweep,
        # 2026-11-25 session 9: int8 Llama-2 / Llama-3 heads 53 / 188 µs, against 78 / 295 with o's config)
        block_n = 256 if sizes[0] % 256 == 0 else block_n
        tiles = counters_size(sizes, glu, block_n)
        return Config(block_n, 128, 2 if 2 * tiles <= 3 * n_sm and K >= 1024 else 1, 4, 1, 0)
    if M > 1:  # tensor cores over the batch padded to 16 rows (~110 registers: 4 programs per SM)
        block_k, warps, stages, dot, per_sm = min(64, group or 64), 4, 3, 1, 4
        split = max(1, min(per_sm * n_sm // counters_size(sizes, glu, block_n), triton.cdiv(K, block_k), 32))
        return Config(block_n, block_k, split, warps, stages, dot)
    # batch 1 (sweeps of 2026-11-24, docs/perf-notes.md v5): each program streams the kept rows of a K range
    if group:  # int4 (sweep of 2026-11-25 session 10, .exp-style driver in docs/perf-notes.md): steps of BK rows
        # within one scale group; 256-column tiles, but gate/up (twice the registers) 128 columns, 32-row steps and
        # three programs per SM: 32.5 against 37.2 µs at 50% for Llama-2, 40.9 against 44.0 for Llama-3
        if glu:
            block_n = next((b for b in fits if b <= 128), block_n)
            split = max(1, min(3 * n_sm // counters_size(sizes, glu, block_n), K // 512))
            return Config(block_n, min(32, group), split, 4, 1, 0)
        block_n = 256 if all(s % 256 == 0 for s in out) else block_n
        split = max(1, min(round(3 * n_sm / counters_size(sizes, glu, block_n)), K // 512))
        return Config(block_n, min(64, group), split, 4, 1, 0)
    if int8 and glu:  # half the bytes per row: 128 columns, four K ranges where they stay within three programs
        # per SM (int8 sweep, 2026-11-25 session 8: Llama-2's gate/up; Llama-3's, with four, went 5% slower end to end)
        split = 4 if 4 * counters_size(sizes, glu, block_n) <= 3 * n_sm else 2
        return Config(block_n, 64, max(1, min(split, K // 1024)), 4, 1, 0)
    if int8 and len(sizes) == 1 and K <= sizes[0]:  # o: 64 columns, 128-row groups, K ranges of >= 1024 inputs
        block_n = next((b for b in reversed(fits) if b >= 64), block_n)
        return Config(block_n, 128, max(1, min(round(3 * n_sm / counters_size(sizes, glu, block_n)), K // 1024)),
                      4, 1, 0)
    if glu:  # two programs along K; the narrower tile while two per tile still fit three programs per SM
        block_n = next((b for b in reversed(fits) if b >= 64 and 2 * counters_size(sizes, glu, b) <= 3 * n_sm),
                       block_n)
        return Config(block_n, 64, max(1, min(2, K // 512)), 4, 1, 0)
    # 3 resident programs per SM, K ranges of at least 512 inputs
    return Config(block_n, 64, max(1, min(round(3 * n_sm / counters_size(sizes, glu, block_n)), K // 512)), 4, 1, 0)


def acc_rows(block_n: int, num_warps: int, bits: int = 16) -> int:
    """Rows of a [BK, BN] weight tile that one pass of all threads covers with 16-byte loads along a row, for
    weights of `bits` (weight_bits; the 16-bit count also serves float32 weights: their summation order stays as
    it was measured)."""
    return max(1, num_warps * 32 * (128 // bits) // block_n)


def weight_bits(w: Tensor) -> int:
    """Bits per weight: int8, int4 (packed eight to an int32 word, quantize.rtn_int4) or 16 (also for float32)."""
    return {torch.int8: 8, torch.int32: 4}.get(w.dtype, 16)


def group_size(w: Tensor, scale: Optional[Tensor]) -> int:
    """Inputs per scale group of int4 weights (scale [2, K / group, N]); 0 for other weights."""
    return w.shape[0] // scale.shape[1] if w.dtype == torch.int32 else 0


def counters_size(sizes, glu: bool, block_n: int) -> int:
    out = sizes[:1] if glu else sizes
    return sum(triton.cdiv(s, block_n) for s in out)


def k_layout(K: int, config, group: int = 0) -> tuple:
    """(inputs per program along K, programs along K) for a config: no program is left empty. int4 weights
    (group = group_size > 0): K ranges of whole scale groups."""
    align = max(config[1], group)
    k_split = triton.cdiv(triton.cdiv(K, config[2]), align) * align
    return k_split, triton.cdiv(K, k_split)


def launch(x: Tensor, w: Tensor, t: Tensor, counters: Optional[Tensor], sizes, glu: bool, config,
           residual: Optional[Tensor], out: Tensor, kernel=_sparse_gemv_kernel,
           norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None, eps: float = 1e-5,
           ss_out: Optional[Tensor] = None, partial_out: bool = False, scale: Optional[Tensor] = None):
    """Run the kernel into `out` [M, N_OUT]. counters [>= n_tiles] int32 must be zero (it is left zero); None with
    partial_out, which reduces nothing.
    norm_weight with ss_in [M, n] (a producer's sums of squares): RMSNorm x first. ss_out [M, n_tiles]:
    write this launch's per-tile sums of squares of `out` (needs a residual: the new residual stream).
    x may also be a gate/up launch's partials [P, 2, M, K] float32: the input is then silu(sum gate) * sum up.
    partial_out: `out` [split, 2 if glu else 1, M, N_OUT] float32 receives each split's partial sums, unreduced
    (no epilogue: no GLU, residual or sums of squares), for a consumer that sums them as it loads them.
    int8 weights (w int8) come with scale [N] float32, one per output column: y = (x @ w) * scale. int4 weights
    (w int32 [K, N/8], quantize.rtn_int4) come with scale [2, K / group, N] float16: w = q * scale[0] + scale[1]
    per group of inputs; BK must divide the group."""
    x_parts = x.shape[0] if x.dim() == 4 else 0
    if x_parts:
        assert x.shape[1] == 2 and x.dtype == torch.float32 and x.is_contiguous(), "gate/up partials"
        assert norm_weight is None, "partials feed the down projection, which has no norm"
    M, K = x.shape[-2:]
    block_n, block_k, split, warps, stages, dot = config
    assert dot or M == 1, "the FMA path serves one row; batches use dot=1"
    assert 1 <= M <= MAX_ROWS and w.shape[0] == K and w.stride(1) == 1 and x.stride(-1) == 1
    bits = weight_bits(w)
    assert len(sizes) in (1, 2, 3) and sum(sizes) == w.shape[1] * (8 if bits == 4 else 1) and t.shape == (len(sizes), K)
    assert (norm_weight is None) == (ss_in is None), "the fused norm needs its weight and the producer's sums"
    _check_scale(w, scale)
    out_sizes = list(sizes[:1]) if glu else list(sizes)
    n_out = sum(out_sizes)
    tiles = [triton.cdiv(s, block_n) for s in out_sizes]
    n_tiles = sum(tiles)
    assert (counters is None) == partial_out and (partial_out or counters.numel() >= n_tiles)
    if partial_out:  # nothing to count: the kernel is handed a pointer it never touches
        counters = t
    assert ss_out is None or (residual is not None and ss_out.shape == (M, n_tiles) and not partial_out)
    # segment ends in tiles and in columns; the last segment's end repeats for absent segments
    tile_ends = (list(accumulate(tiles)) + [n_tiles] * 2)[:2]
    col_ends = (list(accumulate(out_sizes)) + [n_out] * 2)[:2]
    block_m = 16 if dot else 1
    group = group_size(w, scale)
    assert not group or (group % block_k == 0 and block_n % 8 == 0 and all(s % 8 == 0 for s in sizes)), \
        "int4: BK divides the scale group, segments and column tiles are whole int32 words"
    k_split, split = k_layout(K, config, group)
    if partial_out:
        assert residual is None and out.shape == (split, 2 if glu else 1, M, n_out) and out.dtype == torch.float32
    ws = x.new_empty((split, 2 if glu else 1, block_m, n_out), dtype=torch.float32) \
        if split > 1 and not partial_out else out
    assert k_split < 1 << 14, "list entries hold k - k_begin in 14 bits"
    x_bytes = out.element_size() if x_parts else x.element_size()
    lists = x.new_empty((n_tiles * split * k_split * (2 if x_bytes == 4 else 1),), dtype=torch.int32) \
        if not dot else counters
    res = residual if residual is not None else out
    n_ss = ss_in.shape[1] if ss_in is not None else 1
    kernel[(n_tiles, split)](
        x, w, t, res, out, ws, counters, norm_weight if norm_weight is not None else t,
        ss_in if ss_in is not None else t, ss_out if ss_out is not None else t, lists,
        M, K, n_out, K if x_parts else x.stride(0), w.stride(0), res.stride(-2), out.stride(-2), n_ss,
        tile_ends[0], tile_ends[1], col_ends[0], col_ends[1], k_split, split,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, EVEN_N=all(s % block_n == 0 for s in out_sizes),
        DOT=bool(dot), DOT_F32=INTERPRETED and torch.bfloat16 in (w.dtype, out.dtype, x.dtype), GLU=glu,
        HAS_RES=residual is not None,
        IS_SPLIT=split > 1, NORM=norm_weight is not None, SS_BLOCK=triton.next_power_of_2(n_ss),
        EMIT_SS=ss_out is not None, RED_BLOCK=min(32, triton.next_power_of_2(split)),
        ACC_ROWS=min(block_k, acc_rows(block_n, warps, bits)),
        COMPACT=min(2048, triton.next_power_of_2(k_split)),
        EPS=eps,  # a constant: a float argument would arrive as fp64 from torch.compile's launcher
        X_PARTS=x_parts, PARTIAL_OUT=partial_out,
        # the fused MLP's down phase (launch_mlp) is off: its pointers are never touched
        wd_ptr=t, td_ptr=t, dp_ptr=t, D_OUT=0, FUSE_DOWN=False, BLOCK_D=1, ROWS_D=1, N_RED=1, RED_D=1, ACC_D=1,
        EVEN_D=False, s_ptr=scale if scale is not None else t, sd_ptr=t, QUANT={16: 0, 8: 1, 4: 2}[bits],
        GS=max(group, 1),
        num_warps=warps, num_stages=stages,
    )
    return out


def _check_scale(w: Tensor, scale: Optional[Tensor]):
    assert (w.dtype in (torch.int8, torch.int32)) == (scale is not None), "quantized weights (only) have scales"
    if w.dtype == torch.int8:
        assert scale.shape == (w.shape[1],) and scale.dtype == torch.float32 and scale.is_contiguous()
    elif w.dtype == torch.int32:
        assert scale.dim() == 3 and scale.shape[0] == 2 and scale.shape[2] == w.shape[1] * 8
        assert w.shape[0] % scale.shape[1] == 0 and scale.dtype == torch.float16 and scale.is_contiguous()


class DownConfig(NamedTuple):
    block_d: int  # columns of W_down per work unit
    rows: int  # kept rows per step of a unit
    n_red: int  # reduction units at the end, one slice of the output each


def default_down_config(D: int, I: int, config) -> DownConfig:
    """For gate/up's Config `config` (its column tiles are the P partials): a reduction unit loads all P partials
    of its slice at once, 4096 floats."""
    red_d = max(1, 4096 // triton.next_power_of_2(counters_size((I, I), True, config[0])))
    return DownConfig(min(1024, triton.next_power_of_2(D)), 8, triton.cdiv(D, red_d))


def mlp_counters_size(I: int, config) -> int:
    """Per gate/up column tile a split-K counter and a queue slot, then five shared counters (see _mlp_down)."""
    return 2 * counters_size((I, I), True, config[0]) + 5


def launch_mlp(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor, counters: Tensor, config,
               down_config, out: Tensor, ss_out: Tensor, norm_weight: Optional[Tensor] = None,
               ss_in: Optional[Tensor] = None, eps: float = 1e-5, kernel=_sparse_gemv_kernel,
               scale: Optional[Tensor] = None, scale_down: Optional[Tensor] = None):
    """The whole MLP of one token in one launch: out [1, D] = x + down(silu(gate) * up) of the (normalised) input
    x [1, D], all three projections input-sparse (see _mlp_down); ss_out [1, n_red] receives out's sums of
    squares by slice of cdiv(D, n_red) rounded up to a power of two. w [D, 2I] (gate | up), t [2, D], w_down
    [I, D], t_down [1, I]; counters [>= mlp_counters_size] int32, zero (left zero). `config` is gate/up's Config
    (dot 0), `down_config` a DownConfig. int8 weights come with their per column scales (scale [2I],
    scale_down [D] float32)."""
    M, D = x.shape
    I = w_down.shape[0]
    block_n, block_k, split, warps, stages, dot = config
    block_d, rows_d, n_red = down_config
    assert M == 1 and not dot, "the fused MLP serves batch 1"
    assert w.shape == (D, 2 * I) and w_down.shape == (I, D) and t.shape == (2, D) and t_down.shape == (1, I)
    assert w.stride(1) == 1 and w_down.is_contiguous() and x.is_contiguous() and block_n < 256
    assert (norm_weight is None) == (ss_in is None), "the fused norm needs its weight and the producer's sums"
    _check_scale(w, scale)
    _check_scale(w_down, scale_down)
    assert w.dtype != torch.int32 and w_down.dtype != torch.int32, "int4 weights take the two-launch MLP"
    assert (scale is None) == (scale_down is None), "gate/up and down are both int8 or neither"
    n_tiles = counters_size((I, I), True, block_n)
    k_split, split = k_layout(D, config)
    red_d = triton.next_power_of_2(triton.cdiv(D, n_red))
    assert counters.numel() >= mlp_counters_size(I, config) and triton.cdiv(D, red_d) == n_red
    assert out.shape == (1, D) and ss_out.shape == (1, n_red) and k_split < 1 << 14
    ws = x.new_empty((split, 2, I), dtype=torch.float32)
    parts = x.new_empty((n_tiles, D), dtype=torch.float32)
    per = 2 if x.element_size() == 4 else 1
    lists = x.new_empty(((n_tiles * split * k_split + n_tiles * block_n) * per,), dtype=torch.int32)
    n_ss = ss_in.shape[1] if ss_in is not None else 1
    kernel[(n_tiles, split)](
        x, w, t, x, out, ws, counters, norm_weight if norm_weight is not None else t,
        ss_in if ss_in is not None else t, ss_out, lists,
        1, D, I, x.stride(0), w.stride(0), D, D, n_ss,
        n_tiles, n_tiles, I, I, k_split, split,
        BLOCK_M=1, BLOCK_K=block_k, BLOCK_N=block_n, EVEN_N=I % block_n == 0,
        DOT=False, DOT_F32=False, GLU=True, HAS_RES=False,
        IS_SPLIT=split > 1, NORM=norm_weight is not None, SS_BLOCK=triton.next_power_of_2(n_ss),
        EMIT_SS=False, RED_BLOCK=triton.next_power_of_2(n_tiles),
        ACC_ROWS=min(block_k, acc_rows(block_n, warps, weight_bits(w))),
        COMPACT=min(2048, triton.next_power_of_2(k_split)), EPS=eps, X_PARTS=0, PARTIAL_OUT=False,
        wd_ptr=w_down, td_ptr=t_down, dp_ptr=parts, D_OUT=D, FUSE_DOWN=True, BLOCK_D=block_d, ROWS_D=rows_d,
        N_RED=n_red, RED_D=red_d, ACC_D=min(rows_d, acc_rows(block_d, warps, weight_bits(w_down))),
        EVEN_D=D % block_d == 0, s_ptr=scale if scale is not None else t,
        sd_ptr=scale_down if scale_down is not None else t, QUANT=int(scale is not None), GS=1,
        num_warps=warps, num_stages=stages,
    )
    return out, ss_out


def _allocate_and_launch(x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, glu, config, emit_ss, scale):
    M = x.shape[-2]
    # from gate/up partials (4-D x) the output takes the residual stream's dtype
    dtype = x.dtype if x.dim() == 2 else residual.dtype if residual is not None else w.dtype
    out = x.new_empty((M, sizes[0] if glu else sum(sizes)), dtype=dtype)
    ss_out = x.new_empty((M, counters_size(sizes, glu, config[0])), dtype=torch.float32) if emit_ss else None
    launch(x, w, t, counters, sizes, glu, config, residual, out, kernel=wrap_triton(_sparse_gemv_kernel),
           norm_weight=norm_weight, ss_in=ss_in, eps=eps, ss_out=ss_out, scale=scale)
    return out, ss_out


@triton_op("teal::sparse_gemv", mutates_args=("counters",))
def _sparse_gemv_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Optional[Tensor],
                    norm_weight: Optional[Tensor], ss_in: Optional[Tensor], eps: float, sizes: list[int],
                    glu: bool, config: list[int], scale: Optional[Tensor]) -> Tensor:
    return _allocate_and_launch(x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, glu, config, False,
                                scale)[0]


@triton_op("teal::sparse_gemv_ss", mutates_args=("counters",))
def _sparse_gemv_ss_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Tensor,
                       norm_weight: Optional[Tensor], ss_in: Optional[Tensor], eps: float, sizes: list[int],
                       config: list[int], scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _allocate_and_launch(x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, False, config, True,
                                scale)


@triton_op("teal::sparse_gemv_parts", mutates_args=())
def _sparse_gemv_parts_op(x: Tensor, w: Tensor, t: Tensor, norm_weight: Optional[Tensor], ss_in: Optional[Tensor],
                          eps: float, sizes: list[int], glu: bool, config: list[int],
                          scale: Optional[Tensor]) -> Tensor:
    M, K = x.shape
    P = k_layout(K, config, group_size(w, scale))[1]
    out = x.new_empty((P, 2 if glu else 1, M, sizes[0] if glu else sum(sizes)), dtype=torch.float32)
    launch(x, w, t, None, sizes, glu, config, None, out, kernel=wrap_triton(_sparse_gemv_kernel),
           norm_weight=norm_weight, ss_in=ss_in, eps=eps, partial_out=True, scale=scale)
    return out


@triton_op("teal::sparse_mlp", mutates_args=("counters",))
def _sparse_mlp_op(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor, counters: Tensor,
                   norm_weight: Optional[Tensor], ss_in: Optional[Tensor], eps: float, config: list[int],
                   down_config: list[int], scale: Optional[Tensor],
                   scale_down: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out = x.new_empty(x.shape)
    ss_out = x.new_empty((1, down_config[2]), dtype=torch.float32)
    return launch_mlp(x, w, t, w_down, t_down, counters, config, down_config, out, ss_out, norm_weight, ss_in, eps,
                      kernel=wrap_triton(_sparse_gemv_kernel), scale=scale, scale_down=scale_down)


def sparse_mlp(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor, counters: Tensor, config,
               down_config, norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
               eps: float = 1e-5, scale: Optional[Tensor] = None, scale_down: Optional[Tensor] = None) -> tuple:
    """One token's whole MLP in one launch (see launch_mlp): x [1, D] the residual stream (RMS-normalised inside
    with norm_weight and ss_in) -> (x + down(silu(gate) * up) [1, D], its sums of squares [1, n_red] for the next
    fused norm). int8 weights come with scale and scale_down."""
    return _sparse_mlp_op(x, w, t, w_down, t_down, counters, norm_weight, ss_in, eps, list(config),
                          list(down_config), scale, scale_down)


def sparse_gemv(x: Tensor, w: Tensor, t: Tensor, sizes, counters: Tensor, config, glu: bool = False,
                residual: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                ss_in: Optional[Tensor] = None, eps: float = 1e-5, scale: Optional[Tensor] = None) -> Tensor:
    """x [M, K] (M <= 8), w [K, N] input-major, t [len(sizes), K] float32 -> [M, N] (or [M, N/2] with glu).
    With norm_weight and ss_in (sums of squares from sparse_gemv_ss), x is the un-normalised residual stream
    and RMSNorm is applied inside the kernel. x may also be gate/up partials [P, 2, M, K] (sparse_gemv_parts
    with glu): the input is then silu(gate) * up, summed and gated as it is loaded. int8 weights come with
    scale [N] float32 (per output column)."""
    return _sparse_gemv_op(x, w, t, counters, residual, norm_weight, ss_in, eps, list(sizes), glu, list(config),
                           scale)


def sparse_gemv_ss(x: Tensor, w: Tensor, t: Tensor, sizes, counters: Tensor, config, residual: Tensor,
                   norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
                   eps: float = 1e-5, scale: Optional[Tensor] = None) -> tuple:
    """sparse_gemv with a residual that also returns the new residual stream's per-tile sums of squares
    [M, n_tiles] float32, which a following sparse_gemv takes as ss_in to fuse its RMSNorm."""
    return _sparse_gemv_ss_op(x, w, t, counters, residual, norm_weight, ss_in, eps, list(sizes), list(config),
                              scale)


def sparse_gemv_parts(x: Tensor, w: Tensor, t: Tensor, sizes, config, glu: bool = False,
                      norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
                      eps: float = 1e-5, scale: Optional[Tensor] = None) -> Tensor:
    """sparse_gemv without its split-K reduction: the partial sums [P, 2 if glu else 1, M, N] float32 of the
    P programs along K, for a consuming kernel that adds them up as it loads its input (decode attention takes
    q/k/v this way, the down projection gate/up). That saves the reduction tail (store, counter, reload,
    epilogue) of this launch; the consumer's input loads grow from one 16-bit value to P (or 2P) floats."""
    return _sparse_gemv_parts_op(x, w, t, norm_weight, ss_in, eps, list(sizes), glu, list(config), scale)


def parts_ref(parts: Tensor, glu: bool, dtype: torch.dtype) -> Tensor:
    """What a consumer makes of partials [P, H, M, N]: the sums rounded to dtype (silu(gate) * up with glu)."""
    total = parts.sum(0)
    if not glu:
        return total[0].to(dtype)
    gate, up = total[0].to(dtype).float(), total[1].to(dtype).float()
    return (F.silu(gate).to(dtype).float() * up).to(dtype)
