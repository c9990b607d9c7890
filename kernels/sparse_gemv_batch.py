"""Input-sparse GEMV for batches of 2-8 decode rows, on tensor cores: the projection of kernels/sparse_gemv.py (same
maths, same launch builder `sparse_gemv.launch`, same outputs) for M > 1.

Each program multiplies [BM = 16 padded rows, BK] x [BK, BN] tiles with tl.dot over its K range. Row k of a weight
tile is loaded only if x[m, k] passes its segment's threshold in some batch row m (the union over the batch); each
batch row still uses only its own kept inputs. int4 tiles are dequantized in registers (one scale group per step).
"""
import triton
import triton.language as tl

from kernels.common import (_as, _column_scales, _dot, _finish, _inv_rms, _load_rows, _load_x, _rms_scale,
                            _tile_columns, _word_columns)
from kernels.stream import _dequant4, _scales4


@triton.jit
def _sparse_gemv_batch_kernel(
    x_ptr, w_ptr, t_ptr, s_ptr, res_ptr, y_ptr, ws_ptr, cnt_ptr, nw_ptr, ss_in_ptr, ss_out_ptr,
    M, K, N_OUT, stride_xm, stride_wk, stride_rm, stride_ym, N_SS_IN,
    TILE_END0, TILE_END1, COL_END0, COL_END1, K_SPLIT, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    DOT_F32: tl.constexpr, GLU: tl.constexpr, HAS_RES: tl.constexpr, IS_SPLIT: tl.constexpr, NORM: tl.constexpr,
    SS_BLOCK: tl.constexpr, EMIT_SS: tl.constexpr, EPS: tl.constexpr, X_PARTS: tl.constexpr,
    PARTIAL_OUT: tl.constexpr, QUANT: tl.constexpr, GS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    seg, first, col_end, cols, col_ok = _tile_columns(pid_n, TILE_END0, TILE_END1, COL_END0, COL_END1, N_OUT,
                                                      BLOCK_N, EVEN_N)
    rows = tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < M
    t_seg = t_ptr + seg * K
    out_mask = row_ok[:, None] & col_ok[None, :]
    res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_RES:  # loaded now so that the epilogue does not wait for it
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    if QUANT == 2:  # int4 weights: 8 columns per int32 word, scales per group of GS inputs
        wcols, wcol_ok, s_cols3, col_ok3 = _word_columns(first, col_end, s_ptr, BLOCK_N, EVEN_N)
        n_tot = N_OUT * (2 if GLU else 1)  # columns of the scales [2, K / GS, n_tot]
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
    if QUANT == 1:  # (a split's partial sums too: the scale is linear)
        part = part * scale[None, :]
        part_up = part_up * scale_up[None, :]
    _finish(part, part_up, res, y_ptr, ws_ptr, cnt_ptr, ss_out_ptr, rows, row_ok, cols, col_ok, out_mask, M, N_OUT,
            stride_rm, stride_ym, pid_n, pid_k, SPLIT_K, BLOCK_M, GLU, HAS_RES, IS_SPLIT, EMIT_SS, PARTIAL_OUT, 1,
            y_ptr, False)
