"""The whole MLP of one decode token in one launch (batch 1): out = x + down(silu(gate) * up) of the RMS-normalised
residual stream x, all three projections input-sparse.

Programs first compute gate/up column tiles exactly as the projection kernel does (kernels/stream.py: kept-input
list, weight stream), then take the down projection's work as gate/up's tiles finish:
1. The program that completes tile p (the last of its programs along K) lists h = silu(gate) * up's kept rows of the
   tile (row and value, in the kept-list entry format) and appends p to a queue of finished tiles.
2. Every program, once its gate/up share is done, takes work units from a shared counter: unit u is column block
   u % C of the u // C-th finished tile (it waits for that tile if it is not finished yet), streams the tile's kept
   rows of W_down for that block and stores the unit's [BLOCK_D] partial sums at [p, block]. So the down rows are
   streamed by all programs as tiles finish, and no program is left with a whole tile's rows at the end.
3. The N_RED units after the last work unit each sum one slice of the output over the P partials, in tile order
   (deterministic), once every work unit is done, and write residual + down and the slice's sum of squares.
Waiting is safe: a program takes units only after every program of the grid has started (a counter), so whatever it
waits for is being computed by a running program; the CPU interpreter, which runs programs one after another, leaves
every unit to the last one. The last program to leave resets the counters.
16-bit and int8 weights (int4 takes the two launches: sparse_gemv_parts, then down from the partials).
"""
from functools import partial
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import custom_op

from kernels.common import _column_scales, _glu, _inv_rms, direct, skip
from kernels.configs import acc_rows, counters_size, k_layout, mlp_counters_size
from kernels.formats import FLOAT, FORMATS, QuantFormat
from kernels.stream import (KEEP, ROW_BITS, VALUE_SHIFT, _build_list, _dense_stream, _fold, _list_stream,
                            _masked_stream)


@triton.jit
def _sparse_mlp_kernel(
    x_ptr, w_ptr, t_ptr, s_ptr, wd_ptr, td_ptr, sd_ptr, y_ptr, ws_ptr, dp_ptr, cnt_ptr, nw_ptr, ss_in_ptr,
    ss_out_ptr, idx_ptr, K, I, D, N_SS_IN, K_SPLIT, SPLIT_K,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, IS_SPLIT: tl.constexpr,
    NORM: tl.constexpr, SS_BLOCK: tl.constexpr, EPS: tl.constexpr, QUANT: tl.constexpr, ACC_ROWS: tl.constexpr,
    COMPACT: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_D: tl.constexpr, ACC_D: tl.constexpr, EVEN_D: tl.constexpr,
    N_RED: tl.constexpr, RED_D: tl.constexpr, RED_P: tl.constexpr, MASKED: tl.constexpr = False,
):
    """x [D] -> y [D]; w [D, 2I] gate | up with thresholds t [2, D]; wd [I, D] with td [I]; int8: scales s [2I],
    sd [D]. cnt_ptr: [P] tile counters, [P] queue, then started, taken, finished tiles, units done, left (see
    mlp_counters_size)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    P = tl.num_programs(0)
    tl.atomic_add(cnt_ptr + 2 * P, 1, sem="relaxed", scope="gpu")  # count this program in (see 2.)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
        col_ok = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        col_ok = cols < I
    rows = tl.arange(0, 1)
    scale, scale_up = _column_scales(s_ptr, cols, col_ok, I, True, QUANT)
    BLOCK_M: tl.constexpr = 1
    row_ok = rows < 1
    ss = tl.zeros((BLOCK_M, SS_BLOCK), dtype=tl.float32)
    if NORM:  # the producer's per-tile sums of squares: one small load, summed only once the first inputs' loads
        # are issued too (summing here would make them wait for it: two L2 round trips in a row). Loaded here, not
        # in a helper: torch.compile's mutation analysis takes a pointer handed to a call whose result feeds a
        # store's address (the kept list's) as written
        sj = tl.arange(0, SS_BLOCK)
        ss = tl.load(ss_in_ptr + rows[:, None] * N_SS_IN + sj[None, :],
                     mask=row_ok[:, None] & (sj < N_SS_IN)[None, :], other=0.0)

    # gate/up of this tile over this program's K range
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    xdt = x_ptr.dtype.element_ty
    X32: tl.constexpr = xdt.primitive_bitwidth == 32
    scratch = idx_ptr + (pid_n * SPLIT_K + pid_k) * K_SPLIT * (2 if X32 else 1)
    w_rows = w_ptr + k_begin * (2 * I) + cols[None, :]
    if MASKED:  # no list (kernels/stream.py, _masked_stream)
        inv = 0.0
        if NORM:
            inv = tl.sum(_inv_rms(ss, K, EPS), axis=0)
        part, part_up = _masked_stream(x_ptr, nw_ptr, inv, t_ptr, t_ptr + K, w_rows, col_ok, k_begin, k_end, K, 2 * I,
                                       I, BLOCK_K, BLOCK_N, EVEN_N, True, NORM, 0, xdt, ACC_ROWS, QUANT)
    else:
        n_kept, t_max, inv = _build_list(x_ptr, t_ptr, t_ptr + K, nw_ptr, ss, scratch, k_begin, k_end, K, K_SPLIT,
                                         COMPACT, BLOCK_K, True, NORM, EPS, 0, QUANT, 1, xdt, y_ptr, False)
        if t_max == 0:
            part, part_up = _dense_stream(x_ptr, nw_ptr, inv, w_rows, col_ok, s_ptr, col_ok, k_begin, k_end, K,
                                          2 * I, I, I, 2 * I, K, BLOCK_K, BLOCK_N, EVEN_N, True, NORM, 0, xdt,
                                          ACC_ROWS, QUANT, 1)
        else:
            tl.debug_barrier()  # the list is complete and visible to every thread of the program
            part, part_up = _list_stream(scratch, n_kept, K_SPLIT, w_rows, col_ok, s_ptr, col_ok, k_begin, 2 * I, I,
                                         I, 2 * I, K, BLOCK_K, BLOCK_N, EVEN_N, True, xdt, ACC_ROWS, QUANT, 1, y_ptr,
                                         False)
    part = _fold(part, QUANT)
    part_up = _fold(part_up, QUANT)
    if QUANT == 1:
        part = part * scale
        part_up = part_up * scale_up
    tile_lists = idx_ptr + P * SPLIT_K * K_SPLIT * (2 if X32 else 1)  # after the K-range lists
    _mlp_down(part, part_up, pid_n, pid_k, cols, ws_ptr, cnt_ptr, tile_lists, wd_ptr, td_ptr, dp_ptr, x_ptr, y_ptr,
              ss_out_ptr, sd_ptr, I, D, P, P * SPLIT_K, IS_SPLIT, SPLIT_K, BLOCK_N, BLOCK_D, ROWS_D, ACC_D, EVEN_D,
              N_RED, RED_D, RED_P, QUANT)


@triton.jit
def _mlp_down(part, part_up, pid_n, pid_k, cols, ws_ptr, cnt_ptr, lst_ptr, wd_ptr, td_ptr, dp_ptr, res_ptr, y_ptr,
              ss_ptr, sd_ptr, I, D, P, GRID, IS_SPLIT: tl.constexpr, SPLIT_K, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, ROWS_D: tl.constexpr, ACC: tl.constexpr, EVEN_D: tl.constexpr,
              N_RED: tl.constexpr, RED_D: tl.constexpr, RED_P: tl.constexpr, QUANT: tl.constexpr):
    """Steps 1-3 of the module docstring. Column tile p of gate/up is the row range [p BN, +BN) of the down
    projection's input h = silu(gate) * up."""
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
    tl.store(ws, part, mask=r_ok)
    tl.store(ws + I, part_up, mask=r_ok)
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
        entry = KEEP | (cols - pid_n * BLOCK_N)
        if X32:
            tl.store(lst + BLOCK_N + pos, h.to(tl.int32, bitcast=True), mask=keep)
        else:
            entry = entry | (h.to(tl.uint16, bitcast=True).to(tl.int32) << VALUE_SHIFT)
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
            # the tile's kept rows in steps of ROWS_D, as the projection streams them
            acc, _ = _list_stream(lst, nk, BLOCK_N, w_cols, d_ok, sd_ptr, d_ok, 0, D, 0, D, D, 1, ROWS_D, BLOCK_D,
                                  EVEN_D, False, xdt, ACC, QUANT, 1, y_ptr, False)
            unit = _fold(acc, QUANT)
            if QUANT == 1:  # int8 down weights: its per column scales
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


def launch_mlp(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor, counters: Tensor, config,
               down_config, out: Tensor, ss_out: Tensor, norm_weight: Optional[Tensor] = None,
               ss_in: Optional[Tensor] = None, eps: float = 1e-5, fmt: QuantFormat = FLOAT,
               scale: Optional[Tensor] = None, scale_down: Optional[Tensor] = None, wrap=direct):
    """out [1, D] = x + down(silu(gate) * up) of the (normalised) input x [1, D]; ss_out [1, n_red] receives out's
    sums of squares by slice of cdiv(D, n_red) rounded up to a power of two. w [D, 2I] (gate | up), t [2, D], w_down
    [I, D], t_down [1, I]; counters [>= mlp_counters_size] int32, zero (left zero). `config` is gate/up's Config
    (dot 0), `down_config` a DownConfig. int8 weights come with their per column scales (scale [2I],
    scale_down [D] float32). wrap: as in sparse_gemv.launch."""
    M, D = x.shape
    I = w_down.shape[0]
    block_n, block_k, split, warps, stages, dot = config[:6]
    block_d, rows_d, n_red = down_config
    assert M == 1 and not dot, "the fused MLP serves batch 1"
    assert w.shape == (D, 2 * I) and w_down.shape == (I, D) and t.shape == (2, D) and t_down.shape == (1, I)
    assert w.stride(1) == 1 and w_down.is_contiguous() and x.is_contiguous() and block_n < 256
    assert (norm_weight is None) == (ss_in is None), "the fused norm needs its weight and the producer's sums"
    assert fmt.code in (0, 1), "int4 weights take the two-launch MLP"
    fmt.check(w, scale)
    fmt.check(w_down, scale_down)
    n_tiles = counters_size((I, I), True, block_n)
    k_split, split = k_layout(D, config)
    red_d = triton.next_power_of_2(triton.cdiv(D, n_red))
    assert counters.numel() >= mlp_counters_size(I, config) and triton.cdiv(D, red_d) == n_red
    assert out.shape == (1, D) and ss_out.shape == (1, n_red) and k_split < 1 << ROW_BITS.value
    ws = x.new_empty((split, 2, I), dtype=torch.float32)
    parts = x.new_empty((n_tiles, D), dtype=torch.float32)
    per = 2 if x.element_size() == 4 else 1
    lists = x.new_empty(((n_tiles * split * k_split + n_tiles * block_n) * per,), dtype=torch.int32)
    n_ss = ss_in.shape[1] if ss_in is not None else 1
    wrap(_sparse_mlp_kernel)[(n_tiles, split)](
        x_ptr=x, w_ptr=w, t_ptr=t, s_ptr=scale if scale is not None else t, wd_ptr=w_down, td_ptr=t_down,
        sd_ptr=scale_down if scale_down is not None else t, y_ptr=out, ws_ptr=ws, dp_ptr=parts, cnt_ptr=counters,
        nw_ptr=norm_weight if norm_weight is not None else t, ss_in_ptr=ss_in if ss_in is not None else t,
        ss_out_ptr=ss_out, idx_ptr=lists, K=D, I=I, D=D, N_SS_IN=n_ss, K_SPLIT=k_split, SPLIT_K=split,
        BLOCK_K=block_k, BLOCK_N=block_n, EVEN_N=I % block_n == 0, IS_SPLIT=split > 1, NORM=norm_weight is not None,
        SS_BLOCK=triton.next_power_of_2(n_ss), EPS=eps, QUANT=fmt.code,
        ACC_ROWS=min(block_k, acc_rows(block_n, warps, fmt.bits)), COMPACT=min(2048, triton.next_power_of_2(k_split)),
        BLOCK_D=block_d, ROWS_D=rows_d, ACC_D=min(rows_d, acc_rows(block_d, warps, fmt.bits)),
        EVEN_D=D % block_d == 0, N_RED=n_red, RED_D=red_d, RED_P=triton.next_power_of_2(n_tiles),
        MASKED=len(config) > 6 and bool(config[6]), num_warps=warps, num_stages=stages,
    )
    return out, ss_out


def _mlp(wrap, x, w, t, w_down, t_down, counters, norm_weight, ss_in, eps, config, down_config, fmt, scale,
         scale_down):
    out = x.new_empty(x.shape)
    ss_out = x.new_empty((1, down_config[2]), dtype=torch.float32)
    return launch_mlp(x, w, t, w_down, t_down, counters, config, down_config, out, ss_out, norm_weight, ss_in, eps,
                      FORMATS[fmt], scale, scale_down, wrap=wrap)


@custom_op("teal::sparse_mlp", mutates_args=("counters",))  # opaque to torch.compile: see sparse_gemv.py
def _sparse_mlp_op(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor, counters: Tensor,
                   norm_weight: Optional[Tensor], ss_in: Optional[Tensor], eps: float, config: list[int],
                   down_config: list[int], fmt: str, scale: Optional[Tensor],
                   scale_down: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _mlp(direct, x, w, t, w_down, t_down, counters, norm_weight, ss_in, eps, config, down_config, fmt, scale,
                scale_down)


_sparse_mlp_op.register_fake(partial(_mlp, skip))


def sparse_mlp(x: Tensor, w: Tensor, t: Tensor, w_down: Tensor, t_down: Tensor, counters: Tensor, config,
               down_config, norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None,
               eps: float = 1e-5, fmt: QuantFormat = FLOAT, scale: Optional[Tensor] = None,
               scale_down: Optional[Tensor] = None) -> tuple:
    """One token's whole MLP in one launch (see launch_mlp): x [1, D] the residual stream (RMS-normalised inside
    with norm_weight and ss_in) -> (x + down(silu(gate) * up) [1, D], its sums of squares [1, n_red] for the next
    fused norm)."""
    return _sparse_mlp_op(x, w, t, w_down, t_down, counters, norm_weight, ss_in, eps, list(config),
                          list(down_config), fmt.name, scale, scale_down)
