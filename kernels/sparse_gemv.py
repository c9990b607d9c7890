"""Input-sparse GEMV on input-channel-major weights, for decode: the projection kernel of batch 1, and the one launch
builder and ops of the projection family (batches of 2-8 run kernels/sparse_gemv_batch.py through the same builder).

y[m, n] = sum_k sparsify(x)[m, k] * W[k, n] with W stored [K, N] (kernels/formats.py for quantized rows). The
columns form up to three segments (q, k, v) that share the input but each have their own threshold row, so one
launch serves a fused projection. With glu=True the two segments are gate and up and the result is silu(gate) * up.

Batch 1: each program lists the kept inputs of its K range and streams only their weight rows (kernels/stream.py);
with every threshold of the range at zero it streams the rows in order instead (exactly dense).

RMSNorm fusion: a launch with a residual can also write each row's sum of squares per column tile (`ss_out`
[M, n_tiles]); a later launch given those (`ss_in`) and the norm weight normalises its input itself, so the norm
costs no launch of its own.

Split-K: programs along K reduce their partials without a memset (kernels/common.py, _finish), or hand them on
unreduced (`sparse_gemv_parts`): the kernel that reads the result sums them while loading its input (decode
attention for q/k/v; this kernel for down, given gate/up's partials as x [P, 2, M, K], applying silu(gate) * up as
it loads), so no reduction tail runs where nothing needs the reduced value.
"""
from functools import partial
from itertools import accumulate
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from kernels.common import (INTERPRETED, MAX_ROWS, SLOTS, _column_scales, _finish, _inv_rms, _note,
                            _stamp, _stamp_after, _tile_columns, _word_columns, direct, skip)
from kernels.configs import acc_rows, counters_size, k_layout
from kernels.formats import FORMATS, QuantFormat
from kernels.sparse_gemv_batch import _sparse_gemv_batch_kernel
from kernels.stream import ROW_BITS, _build_list, _dense_stream, _fold, _list_stream, _masked_stream


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, t_ptr, s_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, nw_ptr, ss_in_ptr, ss_out_ptr, idx_ptr,
    M, K, N_OUT, stride_wk, stride_rm, stride_ym, N_SS_IN,
    TILE_END0, TILE_END1, COL_END0, COL_END1, K_SPLIT, SPLIT_K,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr,
    IS_SPLIT: tl.constexpr, NORM: tl.constexpr, SS_BLOCK: tl.constexpr, EMIT_SS: tl.constexpr,
    RED_BLOCK: tl.constexpr, EPS: tl.constexpr, X_PARTS: tl.constexpr, PARTIAL_OUT: tl.constexpr,
    QUANT: tl.constexpr, GS: tl.constexpr, ACC_ROWS: tl.constexpr, COMPACT: tl.constexpr,
    prof_ptr, PROFILE: tl.constexpr, MASKED: tl.constexpr = False,
):
    """One row: program (pid_n, pid_k) computes column tile pid_n over K range pid_k (see kernels/stream.py).
    PROFILE: the program stamps its phases into prof_ptr [programs, SLOTS] (scripts/profile_phases.py)."""
    BLOCK_M: tl.constexpr = 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    prof = prof_ptr + (pid_n * SPLIT_K + pid_k) * SLOTS
    _stamp(prof, 0, pid_n, PROFILE)
    seg, first, col_end, cols, col_ok = _tile_columns(pid_n, TILE_END0, TILE_END1, COL_END0, COL_END1, N_OUT,
                                                      BLOCK_N, EVEN_N)
    rows = tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    out_mask = row_ok[:, None] & col_ok[None, :]
    res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_RES:  # loaded now so that the epilogue does not wait for it
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    w_cols = cols
    s_cols = s_ptr
    s_ok = col_ok
    n_tot = N_OUT * (2 if GLU else 1)  # columns of the scales
    N_W = N_OUT  # up's offset from gate's in a weight row
    if QUANT == 2:
        w_cols, col_ok_w, s_cols, s_ok = _word_columns(first, col_end, s_ptr, BLOCK_N, EVEN_N)
        N_W = N_OUT // 8
    else:
        col_ok_w = col_ok
    scale, scale_up = _column_scales(s_ptr, cols, col_ok, N_OUT, GLU, QUANT)
    ss = tl.zeros((BLOCK_M, SS_BLOCK), dtype=tl.float32)
    if NORM:  # the producer's per-tile sums of squares: one small load, summed only once the first inputs' loads
        # are issued too (summing here would make them wait for it: two L2 round trips in a row). Loaded here, not
        # in a helper: torch.compile's mutation analysis takes a pointer handed to a call whose result feeds a
        # store's address (the kept list's) as written
        sj = tl.arange(0, SS_BLOCK)
        ss = tl.load(ss_in_ptr + rows[:, None] * N_SS_IN + sj[None, :],
                     mask=row_ok[:, None] & (sj < N_SS_IN)[None, :], other=0.0)

    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    # the input's dtype: gate/up partial sums (X_PARTS > 0, float32) become the output's once summed and gated
    xdt = y_ptr.dtype.element_ty if X_PARTS > 0 else x_ptr.dtype.element_ty
    X32: tl.constexpr = xdt.primitive_bitwidth == 32
    scratch = idx_ptr + (pid_n * SPLIT_K + pid_k) * K_SPLIT * (2 if X32 else 1)
    w_rows = w_ptr + k_begin * stride_wk + w_cols[None, :]
    if MASKED:  # no list: rows in order, loaded where their input passes (kernels/stream.py, _masked_stream)
        inv = 0.0
        if NORM:
            inv = tl.sum(_inv_rms(ss, K, EPS), axis=0)
        _stamp(prof, 2, k_begin, PROFILE)  # (profile_phases then reads the whole stream as one phase)
        part, part_up = _masked_stream(x_ptr, nw_ptr, inv, t_ptr + seg * K, t_ptr + K, w_rows, col_ok_w, k_begin,
                                       k_end, K, stride_wk, N_W, BLOCK_K, BLOCK_N, EVEN_N, GLU, NORM, X_PARTS, xdt,
                                       ACC_ROWS, QUANT)
    else:
        n_kept, t_max, inv = _build_list(x_ptr, t_ptr + seg * K, t_ptr + K, nw_ptr, ss, scratch, k_begin, k_end, K,
                                         K_SPLIT, COMPACT, BLOCK_K, GLU, NORM, EPS, X_PARTS, QUANT, GS, xdt, prof,
                                         PROFILE)
        _stamp(prof, 2, n_kept, PROFILE)
        _note(prof, 12, n_kept, PROFILE)
        if t_max == 0:  # zero thresholds: every row counts, streamed in order
            part, part_up = _dense_stream(x_ptr, nw_ptr, inv, w_rows, col_ok_w, s_cols, s_ok, k_begin, k_end, K,
                                          stride_wk, N_W, N_OUT, n_tot, K // GS, BLOCK_K, BLOCK_N, EVEN_N, GLU, NORM,
                                          X_PARTS, xdt, ACC_ROWS, QUANT, GS)
        else:
            tl.debug_barrier()  # the list is complete and visible to every thread of the program
            part, part_up = _list_stream(scratch, n_kept, K_SPLIT, w_rows, col_ok_w, s_cols, s_ok, k_begin,
                                         stride_wk, N_W, N_OUT, n_tot, K // GS, BLOCK_K, BLOCK_N, EVEN_N, GLU, xdt,
                                         ACC_ROWS, QUANT, GS, prof, PROFILE)
    _stamp_after(prof, 22, part, PROFILE)
    part = _fold(part, QUANT)[None, :]  # [1, BN]
    part_up = _fold(part_up, QUANT)[None, :]
    _stamp_after(prof, 6, part, PROFILE)
    if QUANT == 1:  # (a split's partial sums too: the scale is linear)
        part = part * scale[None, :]
        part_up = part_up * scale_up[None, :]
    _finish(part, part_up, res, y_ptr, ws_ptr, cnt_ptr, ss_out_ptr, rows, row_ok, cols, col_ok, out_mask, M, N_OUT,
            stride_rm, stride_ym, pid_n, pid_k, SPLIT_K, BLOCK_M, GLU, HAS_RES, IS_SPLIT, EMIT_SS, PARTIAL_OUT,
            RED_BLOCK, prof, PROFILE)


def launch(x: Tensor, w: Tensor, t: Tensor, counters: Optional[Tensor], sizes, glu: bool, config,
           residual: Optional[Tensor], out: Tensor, fmt: QuantFormat = FORMATS["float"],
           scale: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
           eps: float = 1e-5, ss_out: Optional[Tensor] = None, partial_out: bool = False, wrap=direct,
           prof: Optional[Tensor] = None):
    """Run the projection into `out` [M, N_OUT]: batch 1 (config.dot 0) through _sparse_gemv_kernel, batches of
    2-8 (config.dot 1) through the tensor-core kernel. counters [>= n_tiles] int32 must be zero (it is left zero);
    None with partial_out, which reduces nothing.
    norm_weight with ss_in [M, n] (a producer's sums of squares): RMSNorm x first. ss_out [M, n_tiles]:
    write this launch's per-tile sums of squares of `out` (needs a residual: the new residual stream).
    x may also be a gate/up launch's partials [P, 2, M, K] float32: the input is then silu(sum gate) * sum up.
    partial_out: `out` [split, 2 if glu else 1, M, N_OUT] float32 receives each split's partial sums, unreduced
    (no epilogue: no GLU, residual or sums of squares), for a consumer that sums them as it loads them.
    Quantized weights (fmt, kernels/formats.py) come with their scales; int4's step BK must divide the scale group.
    wrap(kernel) -> what is launched (the kernel; nothing in the ops' fakes; a recorder in tests). prof
    [>= programs, SLOTS] int64: batch 1 stamps its phases there (scripts/profile_phases.py)."""
    x_parts = x.shape[0] if x.dim() == 4 else 0
    if x_parts:
        assert x.shape[1] == 2 and x.dtype == torch.float32 and x.is_contiguous(), "gate/up partials"
        assert norm_weight is None, "partials feed the down projection, which has no norm"
    M, K = x.shape[-2:]
    block_n, block_k, split, warps, stages, dot = config[:6]
    masked = len(config) > 6 and bool(config[6])
    assert not (masked and (dot or fmt.code == 2)), "the masked stream is batch 1's, for 16/8-bit weights"
    assert dot or M == 1, "the FMA path serves one row; batches use dot=1"
    assert 1 <= M <= MAX_ROWS and w.shape[0] == K and w.stride(1) == 1 and x.stride(-1) == 1
    assert len(sizes) in (1, 2, 3) and sum(sizes) == w.shape[1] * fmt.per_word and t.shape == (len(sizes), K)
    assert (norm_weight is None) == (ss_in is None), "the fused norm needs its weight and the producer's sums"
    fmt.check(w, scale)
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
    group = fmt.group_of(w, scale)
    assert not group or (group % block_k == 0 and block_n % 8 == 0 and all(s % 8 == 0 for s in sizes)), \
        "int4: BK divides the scale group, segments and column tiles are whole int32 words"
    k_split, split = k_layout(K, config, group)
    if partial_out:
        assert residual is None and out.shape == (split, 2 if glu else 1, M, n_out) and out.dtype == torch.float32
    ws = x.new_empty((split, 2 if glu else 1, block_m, n_out), dtype=torch.float32) \
        if split > 1 and not partial_out else out
    assert k_split < 1 << ROW_BITS.value, "list entries hold k - k_begin in ROW_BITS bits"
    res = residual if residual is not None else out
    n_ss = ss_in.shape[1] if ss_in is not None else 1
    args = dict(
        x_ptr=x, w_ptr=w, t_ptr=t, s_ptr=scale if scale is not None else t, res_ptr=res, y_ptr=out, ws_ptr=ws,
        cnt_ptr=counters, nw_ptr=norm_weight if norm_weight is not None else t,
        ss_in_ptr=ss_in if ss_in is not None else t, ss_out_ptr=ss_out if ss_out is not None else t,
        M=M, K=K, N_OUT=n_out, stride_wk=w.stride(0), stride_rm=res.stride(-2), stride_ym=out.stride(-2),
        N_SS_IN=n_ss, TILE_END0=tile_ends[0], TILE_END1=tile_ends[1], COL_END0=col_ends[0], COL_END1=col_ends[1],
        K_SPLIT=k_split, SPLIT_K=split,
        BLOCK_K=block_k, BLOCK_N=block_n, EVEN_N=all(s % block_n == 0 for s in out_sizes), GLU=glu,
        HAS_RES=residual is not None, IS_SPLIT=split > 1, NORM=norm_weight is not None,
        SS_BLOCK=triton.next_power_of_2(n_ss), EMIT_SS=ss_out is not None,
        EPS=eps,  # a constant: a float argument would arrive as fp64 from torch.compile's launcher
        X_PARTS=x_parts, PARTIAL_OUT=partial_out, QUANT=fmt.code, GS=max(group, 1),
        num_warps=warps, num_stages=stages,
    )
    if dot:
        wrap(_sparse_gemv_batch_kernel)[(n_tiles, split)](
            **args, stride_xm=K if x_parts else x.stride(0), BLOCK_M=block_m,
            DOT_F32=INTERPRETED and torch.bfloat16 in (w.dtype, out.dtype, x.dtype))
        return out
    x_bytes = out.element_size() if x_parts else x.element_size()
    lists = x.new_empty((1 if masked else n_tiles * split * k_split * (2 if x_bytes == 4 else 1),), dtype=torch.int32)
    wrap(_sparse_gemv_kernel)[(n_tiles, split)](
        **args, idx_ptr=lists, RED_BLOCK=min(32, triton.next_power_of_2(split)),
        ACC_ROWS=min(block_k, acc_rows(block_n, warps, fmt.bits)), COMPACT=min(2048, triton.next_power_of_2(k_split)),
        prof_ptr=prof if prof is not None else t, PROFILE=prof is not None, MASKED=masked)
    return out


def _allocate_and_launch(wrap, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, glu, config, emit_ss,
                         fmt, scale):
    M = x.shape[-2]
    # from gate/up partials (4-D x) the output takes the residual stream's dtype
    dtype = x.dtype if x.dim() == 2 else residual.dtype if residual is not None else w.dtype
    out = x.new_empty((M, sizes[0] if glu else sum(sizes)), dtype=dtype)
    ss_out = x.new_empty((M, counters_size(sizes, glu, config[0])), dtype=torch.float32) if emit_ss else None
    launch(x, w, t, counters, sizes, glu, config, residual, out, FORMATS[fmt], scale, norm_weight, ss_in, eps, ss_out,
           wrap=wrap)
    return out, ss_out


def _gemv(wrap, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, glu, config, fmt, scale):
    return _allocate_and_launch(wrap, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, glu, config, False,
                                fmt, scale)[0]


def _gemv_ss(wrap, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, config, fmt, scale):
    return _allocate_and_launch(wrap, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, False, config,
                                True, fmt, scale)


def _gemv_parts(wrap, x, w, t, norm_weight, ss_in, eps, sizes, glu, config, fmt, scale):
    M, K = x.shape
    f = FORMATS[fmt]
    P = k_layout(K, config, f.group_of(w, scale))[1]
    out = x.new_empty((P, 2 if glu else 1, M, sizes[0] if glu else sum(sizes)), dtype=torch.float32)
    launch(x, w, t, None, sizes, glu, config, None, out, f, scale, norm_weight, ss_in, eps, partial_out=True,
           wrap=wrap)
    return out


# Opaque ops (kernels/common.py, `skip`): torch.compile calls them as they are, taking the declared mutations as
# given (tests/compile_checks.py checks them against what each kernel stores through), instead of generating every
# launch's TTIR to find out: ~0.3 s a launch, 128 launches in a 7B model's decode step, at every compile, in every
# process.
@custom_op("teal::sparse_gemv", mutates_args=("counters",))
def _sparse_gemv_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Optional[Tensor],
                    norm_weight: Optional[Tensor], ss_in: Optional[Tensor], eps: float, sizes: list[int],
                    glu: bool, config: list[int], fmt: str, scale: Optional[Tensor]) -> Tensor:
    return _gemv(direct, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, glu, config, fmt, scale)


@custom_op("teal::sparse_gemv_ss", mutates_args=("counters",))
def _sparse_gemv_ss_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Tensor,
                       norm_weight: Optional[Tensor], ss_in: Optional[Tensor], eps: float, sizes: list[int],
                       config: list[int], fmt: str, scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _gemv_ss(direct, x, w, t, counters, residual, norm_weight, ss_in, eps, sizes, config, fmt, scale)


@custom_op("teal::sparse_gemv_parts", mutates_args=())
def _sparse_gemv_parts_op(x: Tensor, w: Tensor, t: Tensor, norm_weight: Optional[Tensor], ss_in: Optional[Tensor],
                          eps: float, sizes: list[int], glu: bool, config: list[int], fmt: str,
                          scale: Optional[Tensor]) -> Tensor:
    return _gemv_parts(direct, x, w, t, norm_weight, ss_in, eps, sizes, glu, config, fmt, scale)


_sparse_gemv_op.register_fake(partial(_gemv, skip))
_sparse_gemv_ss_op.register_fake(partial(_gemv_ss, skip))
_sparse_gemv_parts_op.register_fake(partial(_gemv_parts, skip))


def sparse_gemv(x: Tensor, w: Tensor, t: Tensor, sizes, counters: Tensor, config, glu: bool = False,
                residual: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                ss_in: Optional[Tensor] = None, eps: float = 1e-5, fmt: QuantFormat = FORMATS["float"],
                scale: Optional[Tensor] = None) -> Tensor:
    """x [M, K] (M <= 8), w [K, N] input-major, t [len(sizes), K] float32 -> [M, N] (or [M, N/2] with glu).
    With norm_weight and ss_in (sums of squares from sparse_gemv_ss), x is the un-normalised residual stream
    and RMSNorm is applied inside the kernel. x may also be gate/up partials [P, 2, M, K] (sparse_gemv_parts
    with glu): the input is then silu(gate) * up, summed and gated as it is loaded. Quantized weights: their
    format and scales."""
    return _sparse_gemv_op(x, w, t, counters, residual, norm_weight, ss_in, eps, list(sizes), glu, list(config),
                           fmt.name, scale)


def sparse_gemv_ss(x: Tensor, w: Tensor, t: Tensor, sizes, counters: Tensor, config, residual: Tensor,
                   norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
                   eps: float = 1e-5, fmt: QuantFormat = FORMATS["float"], scale: Optional[Tensor] = None) -> tuple:
    """sparse_gemv with a residual that also returns the new residual stream's per-tile sums of squares
    [M, n_tiles] float32, which a following sparse_gemv takes as ss_in to fuse its RMSNorm."""
    return _sparse_gemv_ss_op(x, w, t, counters, residual, norm_weight, ss_in, eps, list(sizes), list(config),
                              fmt.name, scale)


def sparse_gemv_parts(x: Tensor, w: Tensor, t: Tensor, sizes, config, glu: bool = False,
                      norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
                      eps: float = 1e-5, fmt: QuantFormat = FORMATS["float"], scale: Optional[Tensor] = None) -> Tensor:
    """sparse_gemv without its split-K reduction: the partial sums [P, 2 if glu else 1, M, N] float32 of the
    P programs along K, for a consuming kernel that adds them up as it loads its input (decode attention takes
    q/k/v this way, the down projection gate/up). That saves the reduction tail (store, counter, reload,
    epilogue) of this launch; the consumer's input loads grow from one 16-bit value to P (or 2P) floats."""
    return _sparse_gemv_parts_op(x, w, t, norm_weight, ss_in, eps, list(sizes), glu, list(config), fmt.name, scale)
