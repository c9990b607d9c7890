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
from itertools import accumulate
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_ROWS = 8


def sparsify(x: Tensor, t: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """x [..., S, K] with entries |x_i| <= t_i set to zero; rows where `active` [S] is False stay dense."""
    keep = x.abs() > t
    if active is not None:
        keep = keep | ~active[:, None]
    return x * keep


def sparse_gemv_ref(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, glu: bool = False,
                    residual: Optional[Tensor] = None, active: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch reference. x [..., K], w [K, N], t [len(sizes), K] or None (dense)."""
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
    x_ptr, w_ptr, t_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, K, N_OUT, stride_xm, stride_wk, stride_rm, stride_ym,
    TILE_END0, TILE_END1, COL_END0, COL_END1, K_SPLIT,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GLU: tl.constexpr, HAS_RES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # which segment this tile of columns belongs to (tiles never straddle two segments)
    seg = (pid_n >= TILE_END0).to(tl.int32) + (pid_n >= TILE_END1).to(tl.int32)
    tile0 = tl.where(seg == 0, 0, tl.where(seg == 1, TILE_END0, TILE_END1))
    col0 = tl.where(seg == 0, 0, tl.where(seg == 1, COL_END0, COL_END1))
    col_end = tl.where(seg == 0, COL_END0, tl.where(seg == 1, COL_END1, N_OUT))
    cols = col0 + (pid_n - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < col_end
    rows = tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M

    acc = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in range(0, K_SPLIT, BLOCK_K):
        ks = k_begin + k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BM, BK]
        t = tl.load(t_ptr + seg * K + ks, mask=k_ok, other=float("inf"))  # [BK]
        keep = tl.abs(x) > t[None, :]
        need = tl.max(keep.to(tl.int32), axis=0) > 0  # [BK]: any batch row keeps input k
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :],
                    mask=need[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        xs = tl.where(keep, x, 0.0)
        acc += xs[:, :, None] * w.to(tl.float32)[None, :, :]
        if GLU:  # the up half: columns N_OUT + cols, threshold row 1
            t_up = tl.load(t_ptr + K + ks, mask=k_ok, other=float("inf"))
            keep_up = tl.abs(x) > t_up[None, :]
            need_up = tl.max(keep_up.to(tl.int32), axis=0) > 0
            w_up = tl.load(w_ptr + ks[:, None] * stride_wk + (cols + N_OUT)[None, :],
                           mask=need_up[:, None] & col_ok[None, :], other=0.0)
            acc_up += tl.where(keep_up, x, 0.0)[:, :, None] * w_up.to(tl.float32)[None, :, :]
    part = tl.sum(acc, axis=1)  # [BM, BN]
    part_up = tl.sum(acc_up, axis=1)

    out_mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
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
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws + s * split_stride, mask=out_mask, other=0.0, cache_modifier=".cg")
                if GLU:
                    total_up += tl.load(ws + s * split_stride + BLOCK_M * N_OUT, mask=out_mask, other=0.0,
                                        cache_modifier=".cg")
            _epilogue(total, total_up, res_ptr, y_ptr, rows, cols, out_mask, stride_rm, stride_ym, GLU, HAS_RES)
            tl.store(cnt_ptr + pid_n, 0)


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


def default_config(M: int, K: int, sizes, glu: bool, n_sm: int = 132) -> tuple:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps) for a launch; enough programs to cover the GPU a few times."""
    block_m = triton.next_power_of_2(M)
    block_n, block_k, warps = (128, 64, 4) if block_m == 1 else (64, 64 // block_m, 4)
    out = sizes[:1] if glu else sizes
    n_tiles = sum(triton.cdiv(s, block_n) for s in out)
    split = 1
    while n_tiles * split * 2 <= 4 * n_sm and K // (split * 2) >= block_k and split < 64:
        split *= 2
    return block_n, block_k, split, warps


def counters_size(sizes, glu: bool, block_n: int) -> int:
    out = sizes[:1] if glu else sizes
    return sum(triton.cdiv(s, block_n) for s in out)


def launch(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, sizes, glu: bool, config,
           residual: Optional[Tensor], out: Tensor, kernel=_sparse_gemv_kernel):
    """Run the kernel into `out` [M, N_OUT]. counters [>= n_tiles] int32 must be zero (it is left zero)."""
    M, K = x.shape
    block_n, block_k, split, warps = config
    assert 1 <= M <= MAX_ROWS and w.shape[0] == K and w.stride(1) == 1 and x.stride(1) == 1
    assert len(sizes) in (1, 2, 3) and sum(sizes) == w.shape[1] and t.shape == (len(sizes), K)
    assert split & (split - 1) == 0, "SPLIT_K must be a power of two"
    out_sizes = list(sizes[:1]) if glu else list(sizes)
    n_out = sum(out_sizes)
    tiles = [triton.cdiv(s, block_n) for s in out_sizes]
    n_tiles = sum(tiles)
    assert counters.numel() >= n_tiles
    # segment ends in tiles and in columns; the last segment's end repeats for absent segments
    tile_ends = (list(accumulate(tiles)) + [n_tiles] * 2)[:2]
    col_ends = (list(accumulate(out_sizes)) + [n_out] * 2)[:2]
    block_m = triton.next_power_of_2(M)
    k_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    ws = x.new_empty((split, 2 if glu else 1, block_m, n_out), dtype=torch.float32) if split > 1 else out
    res = residual if residual is not None else out
    kernel[(n_tiles, split)](
        x, w, t, res, out, ws, counters,
        M, K, n_out, x.stride(0), w.stride(0), res.stride(0), out.stride(0),
        tile_ends[0], tile_ends[1], col_ends[0], col_ends[1], k_split,
        SPLIT_K=split, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        GLU=glu, HAS_RES=residual is not None, num_warps=warps,
    )
    return out


@triton_op("teal::sparse_gemv", mutates_args=("counters",))
def _sparse_gemv_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Optional[Tensor],
                    sizes: list[int], glu: bool, config: list[int]) -> Tensor:
    n_out = sizes[0] if glu else sum(sizes)
    out = x.new_empty((x.shape[0], n_out))
    return launch(x, w, t, counters, sizes, glu, config, residual, out, kernel=wrap_triton(_sparse_gemv_kernel))


def sparse_gemv(x: Tensor, w: Tensor, t: Tensor, sizes, counters: Tensor, config,
                glu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """x [M, K] (M <= 8), w [K, N] input-major, t [len(sizes), K] float32 -> [M, N] (or [M, N/2] with glu)."""
    return _sparse_gemv_op(x, w, t, counters, residual, list(sizes), glu, list(config))
