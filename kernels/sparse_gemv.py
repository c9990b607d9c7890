"""Input-sparse GEMV on input-channel-major weights, for decode (M <= 8 rows).

y[m, n] = sum_k sparsify(x)[m, k] * W[k, n] with W stored [K, N]. The columns form up to three
segments (q, k, v) that share the input but each have their own threshold row, so one launch serves
a fused projection. Row k of a weight tile is loaded only if x[m, k] passes its segment's threshold
in some batch row m (the union over the batch); each batch row still uses only its own kept inputs.
With glu=True the two segments are gate and up and the kernel returns silu(gate) * up.

Split-K without a memset: each program writes its partial sums to a workspace, bumps a per-tile
counter, and the last program of a tile sums the partials in a fixed order (deterministic), applies
the epilogue (GLU, residual add) and resets the counter to zero for the next launch.
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


def sparse_gemv_ref(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, glu: bool = False,
                    residual: Optional[Tensor] = None, active: Optional[Tensor] = None,
                    norm_weight: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Plain-PyTorch reference. x [..., K], w [K, N], t [len(sizes), K] or None (dense); with norm_weight
    the input is RMS-normalised first."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    if t is None:
        y = x @ w
    else:
        parts = w.split(list(sizes), dim=1)
        y = torch.cat([sparsify(x, t[j], active) @ p for j, p in enumerate(parts)], dim=-1)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = residual + y
    return y


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, nw_ptr, eps,
    M, K, N_OUT, stride_xm, stride_wk, stride_rm, stride_ym,
    TILE_END0, TILE_END1, COL_END0, COL_END1, K_SPLIT, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    DOT: tl.constexpr, DOT_F32: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr, IS_SPLIT: tl.constexpr,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
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
    xdt = x_ptr.dtype.element_ty
    if NORM:  # RMSNorm fused: every program computes the rows' inverse RMS over the whole input (from L2)
        if DOT:
            ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for n0 in range(0, K, BLOCK_K):
                kk = n0 + tl.arange(0, BLOCK_K)
                xn = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                             mask=row_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xn * xn, axis=1)
            inv_rms = tl.rsqrt(ss / K + eps)  # [BM]
        else:  # one load of the whole row: a loop would wait on L2 once per step
            kk = tl.arange(0, NORM_BLOCK)
            xn = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(xn * xn, axis=0) / K + eps)

    if DOT:  # tensor cores on a [BM >= 16, BK] x [BK, BN] product, for batches
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # M == 1: one FMA per weight element, reduced over k once at the end
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < k_end
        t = tl.load(t_seg + ks, mask=k_ok, other=float("inf"))  # [BK]
        if DOT:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            if NORM:  # rounded where the reference RMSNorm rounds
                g = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                x = ((x.to(tl.float32) * inv_rms[:, None]).to(xdt).to(tl.float32) * g[None, :]).to(xdt)
            keep = tl.abs(x.to(tl.float32)) > t[None, :]
            need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BK]: some batch row keeps input k
            w = _load_rows(w_ptr + ks[:, None] * stride_wk + cols[None, :], need, col_ok, EVEN_N)
            acc = _dot(tl.where(keep, x, 0.0).to(w.dtype), w, acc, DOT_F32)
        else:
            x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
            if NORM:
                g = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                x = ((x * inv_rms).to(xdt).to(tl.float32) * g).to(xdt).to(tl.float32)
            keep = tl.abs(x) > t
            w = _load_rows(w_ptr + ks[:, None] * stride_wk + cols[None, :], keep, col_ok, EVEN_N)
            acc += tl.where(keep, x, 0.0)[:, None] * w.to(tl.float32)
        if GLU:  # the up half: columns N_OUT + cols, threshold row 1
            t_up = tl.load(t_ptr + K + ks, mask=k_ok, other=float("inf"))
            if DOT:
                keep_up = tl.abs(x.to(tl.float32)) > t_up[None, :]
                need_up = tl.max(keep_up.to(tl.int32), axis=0) > 0
                w_up = _load_rows(w_ptr + ks[:, None] * stride_wk + (cols + N_OUT)[None, :], need_up, col_ok, EVEN_N)
                acc_up = _dot(tl.where(keep_up, x, 0.0).to(w_up.dtype), w_up, acc_up, DOT_F32)
            else:
                keep_up = tl.abs(x) > t_up
                w_up = _load_rows(w_ptr + ks[:, None] * stride_wk + (cols + N_OUT)[None, :], keep_up, col_ok, EVEN_N)
                acc_up += tl.where(keep_up, x, 0.0)[:, None] * w_up.to(tl.float32)
    if DOT:
        part, part_up = acc, acc_up
    else:
        part = tl.sum(acc, axis=0)[None, :]  # [1, BN]
        part_up = tl.sum(acc_up, axis=0)[None, :]

    out_mask = row_ok[:, None] & col_ok[None, :]
    if not IS_SPLIT:
        _epilogue(part, part_up, res_ptr, y_ptr, rows, cols, out_mask, stride_rm, stride_ym, GLU, HAS_RES)
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
            for s in range(SPLIT_K):  # a fixed order: the sum does not depend on arrival order
                total += tl.load(ws + s * split_stride, mask=out_mask, other=0.0, cache_modifier=".cg")
                if GLU:
                    total_up += tl.load(ws + s * split_stride + BLOCK_M * N_OUT, mask=out_mask, other=0.0,
                                        cache_modifier=".cg")
            _epilogue(total, total_up, res_ptr, y_ptr, rows, cols, out_mask, stride_rm, stride_ym, GLU, HAS_RES)
            tl.store(cnt_ptr + pid_n, 0)


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
def _epilogue(acc, acc_up, res_ptr, y_ptr, rows, cols, mask, stride_rm, stride_ym,
              GLU: tl.constexpr, HAS_RES: tl.constexpr):
    # round where the reference rounds: each projection to the output dtype, then silu, product, sum
    dt = y_ptr.dtype.element_ty
    y = acc.to(dt).to(tl.float32)
    if GLU:
        up = acc_up.to(dt).to(tl.float32)
        y = (y * tl.sigmoid(y)).to(dt).to(tl.float32) * up
    if HAS_RES:
        r = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        y = r.to(tl.float32) + y.to(dt).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(dt), mask=mask)


class Config(NamedTuple):
    block_n: int
    block_k: int
    split_k: int  # programs along K; the last one of a column tile reduces the partials
    num_warps: int
    num_stages: int
    dot: int  # 1: tensor-core tl.dot over batch rows padded to 16; 0: FMA path (needs M == 1)


def default_config(M: int, K: int, sizes, glu: bool, n_sm: int = 132) -> Config:
    """A launch config from the H100 sweep (scripts/tune_gemv.py, docs/perf-notes.md): column tiles of 128
    where the segments allow it (unmasked 16-byte loads), and split-K up to one wave of resident programs;
    a second wave costs more than the longer K loop saves."""
    out = sizes[:1] if glu else sizes
    block_n = next((b for b in (128, 64, 32) if all(s % b == 0 for s in out)), 64)
    if M > 1:  # tensor cores over the batch padded to 16 rows (~110 registers: 4 programs per SM)
        block_k, warps, stages, dot, per_sm = 64, 4, 3, 1, 4
    elif glu:  # two accumulators (~230 registers): 2 programs per SM
        block_k, warps, stages, dot, per_sm = 64, 4, 1, 0, 2
    elif sum(out) >= 8192:
        block_k, warps, stages, dot, per_sm = 64, 4, 1, 0, 4
    else:  # narrow outputs: few column tiles, so longer K steps with 8 warps
        block_k, warps, stages, dot, per_sm = 128, 8, 1, 0, 2
    n_tiles = sum(triton.cdiv(s, block_n) for s in out)
    split = max(1, min(per_sm * n_sm // n_tiles, triton.cdiv(K, block_k), 32))
    return Config(block_n, block_k, split, warps, stages, dot)


def counters_size(sizes, glu: bool, block_n: int) -> int:
    out = sizes[:1] if glu else sizes
    return sum(triton.cdiv(s, block_n) for s in out)


def launch(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, sizes, glu: bool, config,
           residual: Optional[Tensor], out: Tensor, kernel=_sparse_gemv_kernel,
           norm_weight: Optional[Tensor] = None, eps: float = 1e-5):
    """Run the kernel into `out` [M, N_OUT]. counters [>= n_tiles] int32 must be zero (it is left zero)."""
    M, K = x.shape
    block_n, block_k, split, warps, stages, dot = config
    assert dot or M == 1, "the FMA path serves one row; batches use dot=1"
    assert norm_weight is None or dot or K <= 32768, "fused RMSNorm loads the whole row at once"
    assert 1 <= M <= MAX_ROWS and w.shape[0] == K and w.stride(1) == 1 and x.stride(1) == 1
    assert len(sizes) in (1, 2, 3) and sum(sizes) == w.shape[1] and t.shape == (len(sizes), K)
    out_sizes = list(sizes[:1]) if glu else list(sizes)
    n_out = sum(out_sizes)
    tiles = [triton.cdiv(s, block_n) for s in out_sizes]
    n_tiles = sum(tiles)
    assert counters.numel() >= n_tiles
    # segment ends in tiles and in columns; the last segment's end repeats for absent segments
    tile_ends = (list(accumulate(tiles)) + [n_tiles] * 2)[:2]
    col_ends = (list(accumulate(out_sizes)) + [n_out] * 2)[:2]
    block_m = 16 if dot else 1
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    ws = x.new_empty((split, 2 if glu else 1, block_m, n_out), dtype=torch.float32) if split > 1 else out
    res = residual if residual is not None else out
    kernel[(n_tiles, split)](
        x, w, t, res, out, ws, counters, norm_weight if norm_weight is not None else t, eps,
        M, K, n_out, x.stride(0), w.stride(0), res.stride(0), out.stride(0),
        tile_ends[0], tile_ends[1], col_ends[0], col_ends[1], k_split, split,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, EVEN_N=all(s % block_n == 0 for s in out_sizes),
        DOT=bool(dot), DOT_F32=INTERPRETED and w.dtype == torch.bfloat16, GLU=glu, HAS_RES=residual is not None, IS_SPLIT=split > 1,
        NORM=norm_weight is not None, NORM_BLOCK=triton.next_power_of_2(K), num_warps=warps, num_stages=stages,
    )
    return out


@triton_op("teal::sparse_gemv", mutates_args=("counters",))
def _sparse_gemv_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Optional[Tensor],
                    norm_weight: Optional[Tensor], eps: float, sizes: list[int], glu: bool,
                    config: list[int]) -> Tensor:
    n_out = sizes[0] if glu else sum(sizes)
    out = x.new_empty((x.shape[0], n_out))
    return launch(x, w, t, counters, sizes, glu, config, residual, out, kernel=wrap_triton(_sparse_gemv_kernel),
                  norm_weight=norm_weight, eps=eps)


def sparse_gemv(x: Tensor, w: Tensor, t: Tensor, sizes, counters: Tensor, config, glu: bool = False,
                residual: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """x [M, K] (M <= 8), w [K, N] input-major, t [len(sizes), K] float32 -> [M, N] (or [M, N/2] with glu).
    With norm_weight, x is the un-normalised residual stream and RMSNorm is applied inside the kernel."""
    return _sparse_gemv_op(x, w, t, counters, residual, norm_weight, eps, list(sizes), glu, list(config))
