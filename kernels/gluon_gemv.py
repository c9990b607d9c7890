"""The batch-1 int4 input-sparse projection written in Gluon: the Hopper (sm_90) path of all four projections.

Triton's int4 stream (kernels/stream.py) converts each step's group scales and input sums from the layout they are
loaded in to the accumulator's, through shared memory and barriers, every step (docs/perf-notes.md, session 16):
the stream is latency-bound at 5-7x its bandwidth time. Gluon states layouts, so here every tensor of a step is
made in a slice of one 4-D layout L4 over [RPT, ROWS, W, 8] (a thread's RPT rows, rows across threads and warps,
int32 words of eight nibbles, the nibbles):
- weight words [RPT, ROWS, W] are loaded in SliceLayout(3, L4), VEC words (16 bytes) per thread and row;
- nibbles are widened in place to 1 + q/16 (shift, and/or into a float's mantissa: no int -> float conversion);
- the RPT rows of a thread fold in registers into the accumulator [ROWS, W, 8] (SliceLayout(0, L4));
- group scales s and offsets m [W, 8] are loaded straight in the accumulator's slice, and applied once per step:
  sum_k x_k (q_k s + m) = 16 s sum_k x_k f_k + (m - 16 s) sum_k x_k.
Rows fold across threads once, at the end.

Work decomposition as the Triton kernel's: program (pid_n, pid_k) lists the kept inputs of its K range (each scale
group of GS inputs starts a new step of BK entries), then streams their rows, the next step's rows and scales in
flight while a step is multiplied; with every threshold of the range at zero it streams the rows in order. Input:
x (RMS-normalised in the launch with a norm), or gate/up's partials (silu(gate) * up made as they load). Output:
split-K partial sums out [SPLIT, N] (float32) for the consumer to sum, as sparse_gemv_parts hands them on (q/k/v,
gate/up), or with a residual (o, down) the reduced sum plus the residual and its per-tile sums of squares, as
sparse_gemv_ss returns them. Stores go only to what the ops allocate (partials, output, list scratch, workspace) and
the counters they declare mutated. Reference: int4_parts_ref below, kernels/reference.py's sparse_gemv_ref. No CPU
interpreter runs Gluon: tests build every launch for sm_90, scripts/gpu_check.py runs it against the reference.
"""
from functools import partial
from itertools import accumulate
from typing import Callable, NamedTuple, Optional

import torch
import triton
from torch import Tensor
from torch.library import custom_op
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kernels import reference
from kernels.common import direct, skip
from kernels.formats import INT4

# list entries: the input's row in the K range (14 bits), KEEP, its 16-bit value above bit 16
ROW_MASK = gl.constexpr(0x3FFF)
KEEP = gl.constexpr(0x4000)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _rms_scale(x, g, inv, NORM: gl.constexpr):
    """x normalised as the reference RMSNorm rounds: x * inv to x's dtype, then times the weight g (NORM only)."""
    if NORM:
        x = ((x.to(gl.float32) * inv).to(x.dtype).to(gl.float32) * g.to(gl.float32)).to(x.dtype)
    return x


@gluon.jit
def _load_in(x_ptr, nw_ptr, k, ok, inv, K, NORM: gl.constexpr, X_PARTS: gl.constexpr, xdt: gl.constexpr):
    """The projection's input at k (0 where not ok), in xdt: x itself, RMS-normalised with NORM, or with X_PARTS
    silu(gate) * up of gate/up's partials [X_PARTS, 2, 1, K] summed in split order and rounded where the
    reference rounds (each sum to xdt, then silu, then the product)."""
    if X_PARTS == 0:
        x = gl.load(x_ptr + k, mask=ok, other=0.0)
        if NORM:
            x = _rms_scale(x, gl.load(nw_ptr + k, mask=ok, other=0.0), inv, NORM)
    else:
        gate = gl.load(x_ptr + k, mask=ok, other=0.0)
        up = gl.load(x_ptr + K + k, mask=ok, other=0.0)
        for p in gl.static_range(1, X_PARTS):
            gate += gl.load(x_ptr + 2 * p * K + k, mask=ok, other=0.0)
            up += gl.load(x_ptr + (2 * p + 1) * K + k, mask=ok, other=0.0)
        g = gate.to(xdt).to(gl.float32)
        silu = (g / (1.0 + gl.exp(-g))).to(xdt).to(gl.float32)
        x = (silu * up.to(xdt).to(gl.float32)).to(xdt)
    return x


@gluon.jit
def _build_list(x_ptr, t_ptr, nw_ptr, inv, scratch, k_begin, k_end, K, GS: gl.constexpr, BK: gl.constexpr,
                CG: gl.constexpr, NW: gl.constexpr, NORM: gl.constexpr, X_PARTS: gl.constexpr, xdt: gl.constexpr,
                xs=None, XSUM: gl.constexpr = False):
    """Kept inputs of [k_begin, k_end) into scratch, CG groups of GS inputs at a time, each group's entries padded
    with flagless ones (the group's first row) to a multiple of BK -> (entries listed, the largest threshold). XSUM:
    each group's sum of kept inputs (float32 of the listed values) into xs[group in the range] too."""
    LC: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NW, 1], [1, 0])  # [CG, GS]
    LG: gl.constexpr = gl.SliceLayout(1, LC)
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    gi = gl.arange(0, CG, layout=LG)
    ii = gl.arange(0, GS, layout=gl.SliceLayout(0, LC))
    jf = gl.arange(0, BK, layout=gl.SliceLayout(0, LC))
    n_kept = 0
    t_max = 0.0
    for c0 in range(k_begin, k_end, CG * GS):
        first = c0 + gi * GS  # [CG]
        ks = gl.expand_dims(first, 1) + gl.expand_dims(ii, 0)  # [CG, GS]
        ok = ks < k_end
        x = _load_in(x_ptr, nw_ptr, ks, ok, inv, K, NORM, X_PARTS, xdt)
        t = gl.load(t_ptr + ks, mask=ok, other=0.0)
        keep = (gl.abs(x.to(gl.float32)) > t) & ok
        t_max = gl.maximum(t_max, gl.max(gl.max(t, axis=1), axis=0))
        kept = keep.to(gl.int32)
        cnt = gl.sum(kept, axis=1)  # [CG]
        if XSUM:
            gl.store(xs + (first - k_begin) // GS, gl.sum(gl.where(keep, x.to(gl.float32), 0.0), axis=1),
                     mask=first < k_end)
        padded = (cnt + BK - 1) // BK * BK
        # (a scan needs a blocked layout of its own: the groups' counts are a slice of LC)
        before = gl.convert_layout(gl.associative_scan(gl.convert_layout(padded, L1), 0, _add), LG) - padded
        base = n_kept + before  # [CG]
        pos = gl.expand_dims(base, 1) + gl.associative_scan(kept, 1, _add) - 1
        entry = (ks - k_begin) | KEEP | (x.to(gl.uint16, bitcast=True).to(gl.int32) << 16)
        gl.store(scratch + pos, entry, mask=keep)
        fill = gl.expand_dims(base + cnt, 1) + gl.expand_dims(jf, 0)  # [CG, BK]
        fill_ok = gl.expand_dims(jf, 0) < gl.expand_dims(padded - cnt, 1)
        gl.store(scratch + fill, gl.expand_dims(first - k_begin, 1) + 0 * gl.expand_dims(jf, 0), mask=fill_ok)
        n_kept += gl.sum(padded, axis=0)
    return n_kept, t_max


@gluon.jit
def _widen(words, nib_mask, L4: gl.constexpr):
    """int32 words [RPT, ROWS, W] (SliceLayout(3, L4)) -> float32 1 + q/16 of their nibbles [RPT, ROWS, W, 8]: nibble
    i shifted to the top of the mantissa, the exponent of 1 or-ed in. nib_mask is 0x780000 handed in at run time: as
    a constant, ptxas splits the and/or into two LOP3s (one immediate each); with the mask in a register it is one."""
    i = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L4))))
    i4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 0), 0)  # [1, 1, 1, 8]
    w4 = gl.expand_dims(words, 3)
    v = gl.where(i4 <= 4, w4 << gl.maximum(19 - 4 * i4, 0), w4 >> gl.maximum(4 * i4 - 19, 0))
    return ((v & nib_mask) | 0x3F800000).to(gl.float32, bitcast=True)


@gluon.jit
def _step(acc, x, words, s, m, nib_mask, L4: gl.constexpr):
    """acc [ROWS, W, 8] + one step of one group: x [RPT, ROWS] float32, words [RPT, ROWS, W], s, m [W, 8] float16."""
    f = _widen(words, nib_mask, L4)
    x4 = gl.expand_dims(gl.expand_dims(x, 2), 3)
    part = gl.sum(x4 * f, axis=0)  # [ROWS, W, 8], in registers
    xs = gl.sum(x4, axis=0)  # [ROWS, 1, 1]
    s16 = gl.expand_dims(16.0 * s.to(gl.float32), 0)
    return acc + part * s16 + xs * (gl.expand_dims(m.to(gl.float32), 0) - s16)


@gluon.jit
def _input(x_ptr, nw_ptr, k, inv, K, NORM: gl.constexpr, X_PARTS: gl.constexpr, xdt: gl.constexpr):
    """The input at k as the list holds it, float32 (the dense stream's)."""
    return _load_in(x_ptr, nw_ptr, k, k >= 0, inv, K, NORM, X_PARTS, xdt).to(gl.float32)


@gluon.jit
def _entry_x(e, xdt: gl.constexpr):
    """The (normalised) input of list entries e, float32; 0 for flagless ones."""
    return gl.where((e & KEEP) != 0, (e >> 16).to(gl.uint16).to(xdt, bitcast=True).to(gl.float32), 0.0)


@gluon.jit
def _epilogue(total, res_ptr, y_ptr, ss_out_ptr, cols, pid_n):
    """y = res + total for the tile's columns cols [W, 8], rounded where the reference rounds (the projection to y's
    dtype, then the sum), and the tile's sum of squares of y into ss_out_ptr[pid_n] (the next RMSNorm's)."""
    dt: gl.constexpr = y_ptr.dtype.element_ty
    y = (gl.load(res_ptr + cols).to(gl.float32) + total.to(dt).to(gl.float32)).to(dt)
    gl.store(y_ptr + cols, y)
    yf = y.to(gl.float32)
    gl.store(ss_out_ptr + pid_n, gl.sum(gl.sum(yf * yf, axis=1), axis=0))


@gluon.jit
def _int4_gemv_kernel(x_ptr, t_ptr, w_ptr, s_ptr, nw_ptr, ss_ptr, out_ptr, scratch_ptr, res_ptr, ws_ptr, cnt_ptr,
                      ss_out_ptr, K, N, G, K_SPLIT, TILE_END0, TILE_END1, N_SS, nib_mask,
                      BN: gl.constexpr, GS: gl.constexpr, RPT: gl.constexpr, VEC: gl.constexpr, CG: gl.constexpr,
                      NW: gl.constexpr, NORM: gl.constexpr, SS_BLOCK: gl.constexpr, EPS: gl.constexpr,
                      X_PARTS: gl.constexpr, RESIDUAL: gl.constexpr):
    """Program (pid_n, pid_k): column tile pid_n (of segment 0, 1 or 2: tiles [0, TILE_END0), [TILE_END0,
    TILE_END1), the rest; threshold row t[segment]) over K range pid_k. NORM: x is the residual stream,
    RMS-normalised by the weight at nw_ptr with the producer's sums of squares ss_ptr [N_SS]; X_PARTS: x is gate/up's
    partials (_load_in). Out: the partial sums out[pid_k, tile's columns] (float32), or with RESIDUAL the tile of
    out [1, N] = res + the sum over K ranges, reduced by the last program of the tile to arrive (counters at cnt_ptr,
    partials through ws_ptr [programs along K, N]; sums in a fixed order), with its sum of squares in
    ss_out_ptr[pid_n]."""
    W: gl.constexpr = BN // 8
    TW: gl.constexpr = W // VEC
    TR: gl.constexpr = 32 // TW
    ROWS: gl.constexpr = TR * NW
    BK: gl.constexpr = RPT * ROWS
    L4: gl.constexpr = gl.BlockedLayout([RPT, 1, VEC, 8], [1, TR, TW, 1], [1, NW, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(3, L4)  # words [RPT, ROWS, W]
    LE: gl.constexpr = gl.SliceLayout(2, LW)  # entries [RPT, ROWS]
    LS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(0, L4))  # scales [W, 8]
    if X_PARTS > 0:  # the input's dtype: gate/up partials are rounded to the output's
        xdt: gl.constexpr = out_ptr.dtype.element_ty
    else:
        xdt: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n_split = gl.num_programs(1)
    seg = (pid_n >= TILE_END0).to(gl.int32) + (pid_n >= TILE_END1).to(gl.int32)
    t_row = t_ptr + seg * K
    k_begin = pid_k * K_SPLIT
    k_end = gl.minimum(k_begin + K_SPLIT, K)
    inv = 1.0
    if NORM:
        sj = gl.arange(0, SS_BLOCK, layout=gl.BlockedLayout([1], [32], [NW], [0]))
        inv = gl.rsqrt(gl.sum(gl.load(ss_ptr + sj, mask=sj < N_SS, other=0.0), axis=0) / K + EPS)
    scratch = scratch_ptr + (pid_n * n_split + pid_k) * K_SPLIT
    n_kept, t_max = _build_list(x_ptr, t_row, nw_ptr, inv, scratch, k_begin, k_end, K, GS, BK, CG, NW, NORM,
                                 X_PARTS, xdt)

    NWORD = N // 8
    wc = pid_n * W + gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(0, LW)))
    w_cols = w_ptr + k_begin * NWORD + gl.expand_dims(gl.expand_dims(wc, 0), 0)  # [1, 1, W]
    sw = pid_n * BN + 8 * gl.arange(0, W, layout=gl.SliceLayout(1, LS))
    s_cols = gl.expand_dims(sw, 1) + gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, LS)), 0)  # [W, 8]
    ra = gl.arange(0, RPT, layout=gl.SliceLayout(1, LE))
    rr = gl.arange(0, ROWS, layout=gl.SliceLayout(0, LE))
    r = gl.expand_dims(ra, 1) * ROWS + gl.expand_dims(rr, 0)  # [RPT, ROWS]: a step's rows / entries
    acc = gl.zeros([ROWS, W, 8], gl.float32, layout=gl.SliceLayout(0, L4))
    if t_max == 0:  # dense: rows in order, no list
        k = k_begin + r
        xa = _input(x_ptr, nw_ptr, k, inv, K, NORM, X_PARTS, xdt)
        wa = gl.load(w_cols + gl.expand_dims(r, 2) * NWORD)
        g = k_begin // GS
        sa = gl.load(s_ptr + g * N + s_cols)
        ma = gl.load(s_ptr + (G + g) * N + s_cols)
        for j in range(BK, k_end - k_begin, BK):
            k = k_begin + j + r
            xb = _input(x_ptr, nw_ptr, k, inv, K, NORM, X_PARTS, xdt)
            wb = gl.load(w_cols + gl.expand_dims(j + r, 2) * NWORD)
            g = (k_begin + j) // GS
            sb = gl.load(s_ptr + g * N + s_cols)
            mb = gl.load(s_ptr + (G + g) * N + s_cols)
            acc = _step(acc, xa, wa, sa, ma, nib_mask, L4)
            xa, wa, sa, ma = xb, wb, sb, mb
        acc = _step(acc, xa, wa, sa, ma, nib_mask, L4)
    else:
        gl.thread_barrier()  # the list is complete and visible to every thread of the program
        ea = gl.load(scratch + r, mask=r < n_kept, other=0, cache_modifier=".cg")
        eb = gl.load(scratch + BK + r, mask=BK + r < n_kept, other=0, cache_modifier=".cg")
        wa = gl.load(w_cols + gl.expand_dims(ea & ROW_MASK, 2) * NWORD, mask=gl.expand_dims((ea & KEEP) != 0, 2),
                     other=0)
        # (a range may keep nothing: its scratch is then unwritten, and a group read from it could lie anywhere)
        g = (k_begin + (gl.load(scratch, mask=n_kept > 0, other=0, cache_modifier=".cg") & ROW_MASK)) // GS
        sa = gl.load(s_ptr + g * N + s_cols)
        ma = gl.load(s_ptr + (G + g) * N + s_cols)
        for j in range(BK, n_kept, BK):
            ec = gl.load(scratch + j + BK + r, mask=j + BK + r < n_kept, other=0, cache_modifier=".cg")
            wb = gl.load(w_cols + gl.expand_dims(eb & ROW_MASK, 2) * NWORD,
                         mask=gl.expand_dims((eb & KEEP) != 0, 2), other=0)
            g = (k_begin + (gl.load(scratch + j, cache_modifier=".cg") & ROW_MASK)) // GS
            sb = gl.load(s_ptr + g * N + s_cols)
            mb = gl.load(s_ptr + (G + g) * N + s_cols)
            acc = _step(acc, _entry_x(ea, xdt), wa, sa, ma, nib_mask, L4)
            ea, wa, sa, ma = eb, wb, sb, mb
            eb = ec
        acc = _step(acc, _entry_x(ea, xdt), wa, sa, ma, nib_mask, L4)
    y = gl.sum(acc, axis=0)  # [W, 8]: rows across threads folded once
    if RESIDUAL:
        if n_split == 1:
            _epilogue(y, res_ptr, out_ptr, ss_out_ptr, s_cols, pid_n)
        else:
            gl.store(ws_ptr + pid_k * N + s_cols, y)
            gl.thread_barrier()  # every thread's partials are stored before the counter moves
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == n_split - 1:
                # all K ranges' partials in one load, split s at (s // ROWS, s % ROWS) of a step's slots
                s4 = gl.expand_dims(gl.expand_dims(r, 2), 3)  # [RPT, ROWS, 1, 1]
                c4 = gl.expand_dims(gl.expand_dims(s_cols, 0), 0)  # [1, 1, W, 8]
                parts = gl.load(ws_ptr + s4 * N + c4, mask=s4 < n_split, other=0.0, cache_modifier=".cg")
                _epilogue(gl.sum(gl.sum(parts, axis=0), axis=0), res_ptr, out_ptr, ss_out_ptr, s_cols, pid_n)
                gl.store(cnt_ptr + pid_n, 0)
    else:
        gl.store(out_ptr + pid_k * N + s_cols, y)


class Config(NamedTuple):
    block_n: int  # columns per program (whole int32 words; tiles never straddle two segments)
    rpt: int  # rows per thread in a step (a step is 64 list entries)
    vec: int  # int32 words per thread and row
    warps: int
    split: int  # programs along K (K ranges are whole scale groups)


def default_config(K: int, sizes, group: int, n_sm: int) -> Optional[Config]:
    """The launch config of a batch-1 int4 projection with K inputs and output segments `sizes`, scale groups of
    `group` inputs, or None where this kernel does not take the shape (the Triton kernel does). Three programs per SM
    (the norm-fused builds take 128 registers), 256-column tiles where the segments allow, eight rows by two words
    per thread (scripts/bench_gluon.py's sweep, docs/perf-notes.md session 18)."""
    block_n = next((b for b in (256, 128) if all(s % b == 0 for s in sizes)), None)
    if block_n is None or group not in (64, 128) or K % group:
        return None
    vec, warps = 2, 4
    rows = 32 // (block_n // 8 // vec) * warps
    split = max(1, min(round(3 * n_sm / (sum(sizes) // block_n)), K // group))
    return Config(block_n, 64 // rows, vec, warps, split)


def k_layout(K: int, group: int, split: int) -> tuple:
    """(inputs per K range, programs along K): ranges of whole scale groups."""
    k_split = triton.cdiv(triton.cdiv(K, split), group) * group
    return k_split, triton.cdiv(K, k_split)


def check_inputs(x: Tensor, w: Tensor, t: Tensor, sizes, scale: Tensor, norm_weight, ss_in, residual) -> int:
    """The checks a batch-1 int4 launch of either Gluon kernel makes (shapes as `launch` says) -> the number of
    gate/up partials x holds (0: x is the 16-bit input itself)."""
    K, N = w.shape[0], w.shape[1] * 8
    x_parts = x.shape[0] if x.dim() == 4 else 0
    if x_parts:
        assert x.shape[1:] == (2, 1, K) and x.dtype == torch.float32 and x.is_contiguous() and residual is not None
    else:
        assert x.shape == (1, K) and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous()
    assert w.dtype == torch.int32 and w.is_contiguous() and scale.dtype == torch.float16 and scale.is_contiguous()
    assert t.shape == (len(sizes), K) and t.dtype == torch.float32 and sum(sizes) == N and len(sizes) <= 3
    assert (norm_weight is None) == (ss_in is None), "the fused norm needs its weight and the producer's sums"
    return x_parts


def outputs(x: Tensor, t: Tensor, N: int, split: int, n_tiles: int, residual: Optional[Tensor],
            counters: Optional[Tensor]) -> tuple:
    """(out, workspace, sums of squares, counters) of a launch: partials [split, N] float32 (the other three then
    stand-ins the kernel never touches), or with a residual out [1, N] in its dtype, the split-K workspace and the
    per-tile sums of squares [1, n_tiles]."""
    if residual is None:
        out = x.new_empty((split, N), dtype=torch.float32)
        return out, out, out, t
    assert residual.shape == (1, N) and residual.dtype in (torch.bfloat16, torch.float16)
    assert counters is not None and counters.dtype == torch.int32 and counters.numel() >= n_tiles
    return (residual.new_empty((1, N)), x.new_empty((split, N), dtype=torch.float32),
            x.new_empty((1, n_tiles), dtype=torch.float32), counters)


def launch(x: Tensor, w: Tensor, t: Tensor, sizes, config: Config, scale: Tensor, norm_weight: Optional[Tensor] = None,
           ss_in: Optional[Tensor] = None, eps: float = 1e-5, wrap=direct, residual: Optional[Tensor] = None,
           counters: Optional[Tensor] = None):
    """x [1, K] 16-bit (the residual stream with norm_weight and ss_in [1, n], the producer's sums of squares; or
    gate/up's partials [P, 2, 1, K] float32, the input then silu(gate) * up), int4 weights w [K, N/8] with scale
    [2, K/group, N], thresholds t [len(sizes), K] -> the split-K partial sums [P, N] float32 (their sum over P is
    sparsify(x) @ W, each segment under its own threshold row); with a residual [1, N] (and counters [>= tiles]
    int32, zero, left zero): (residual + sparsify(x) @ W in the residual's dtype, its per-tile sums of squares
    [1, tiles] float32)."""
    K, N = w.shape[0], w.shape[1] * 8
    block_n, rpt, vec, warps, split = config
    group = INT4.group_of(w, scale)
    x_parts = check_inputs(x, w, t, sizes, scale, norm_weight, ss_in, residual)
    step = rpt * 32 // (block_n // 8 // vec) * warps
    assert all(s % block_n == 0 for s in sizes) and group % step == 0
    k_split, split = k_layout(K, group, split)
    assert k_split <= 1 << 14, "list entries hold k - k_begin in 14 bits"
    tiles = [s // block_n for s in sizes]
    n_tiles = sum(tiles)
    ends = (list(accumulate(tiles)) + [n_tiles] * 2)[:2]
    assert residual is None or split <= step, "the last program sums the K ranges in one load"
    out, ws, ss_out, counters = outputs(x, t, N, split, n_tiles, residual, counters)
    scratch = x.new_empty((n_tiles * split * k_split,), dtype=torch.int32)
    n_ss = ss_in.shape[1] if ss_in is not None else 1
    wrap(_int4_gemv_kernel)[(n_tiles, split)](
        x, t, w, scale, norm_weight if norm_weight is not None else t, ss_in if ss_in is not None else t, out, scratch,
        residual if residual is not None else out, ws, counters, ss_out,
        K, N, K // group, k_split, ends[0], ends[1], n_ss, 0x780000,
        BN=block_n, GS=group, RPT=rpt, VEC=vec, CG=warps, NW=warps, NORM=norm_weight is not None,
        SS_BLOCK=triton.next_power_of_2(n_ss), EPS=eps, X_PARTS=x_parts, RESIDUAL=residual is not None,
        num_warps=warps)
    return out if residual is None else (out, ss_out)


def int4_parts_ref(x: Tensor, w: Tensor, t: Tensor, sizes, scale: Tensor, norm_weight: Optional[Tensor] = None,
                   eps: float = 1e-5) -> Tensor:
    """Plain-PyTorch reference of the sum of a launch's partials: [1, N] float32. With a residual the launch computes
    reference.sparse_gemv_ref(x, ..., residual=residual, fmt=INT4) and its sum_squares_ref (x from gate/up's
    partials: reference.parts_ref(x, True, residual.dtype))."""
    if norm_weight is not None:
        x = reference.rms_norm_ref(x, norm_weight, eps)
    wf = INT4.dequantize(w, scale)  # [K, N]
    parts = wf.split(list(sizes), dim=1)
    return torch.cat([reference.sparsify(x.float(), t[j]) @ p for j, p in enumerate(parts)], dim=-1)


class Int4Ops(NamedTuple):
    parts: Callable
    residual: Callable
    custom_ops: tuple  # (parts', residual's): what engine.opaque_ops lists
    fake_parts: Callable  # the registered fakes (shapes only, no launch), with the custom ops' signatures
    fake_residual: Callable


def int4_ops(name: str, launch_fn: Callable, config_type: type) -> Int4Ops:
    """The two opaque ops (torch.library.custom_op, so that a compiled decode step sees one op per launch) of an sm_90
    int4 kernel whose `launch_fn` has this module's launch signature, named teal::{name}_parts_sm90 and
    teal::{name}_residual_sm90:
    - parts(x, w, t, sizes, config, scale, glu=False, norm_weight=None, ss_in=None, eps=1e-5): sparse_gemv_parts for
      batch-1 int4 weights, the partials [P, 2 if glu else 1, 1, N / (2 if glu else 1)] float32 that decode attention
      (q/k/v) and the down kernel (gate/up) read;
    - residual(x, w, t, sizes, config, scale, counters, residual): sparse_gemv_ss (o; down, from gate/up's partials
      [P, 2, 1, K]): (residual + sparsify(x) @ W, its per-tile sums of squares for the next fused RMSNorm)."""
    def parts(wrap, x, w, t, norm_weight, ss_in, eps, sizes, glu, config, scale):
        out = launch_fn(x, w, t, sizes, config_type(*config), scale, norm_weight, ss_in, eps, wrap)
        return out.view(out.shape[0], 2 if glu else 1, 1, -1)

    def residual_sum(wrap, x, w, t, counters, residual, sizes, config, scale):
        return launch_fn(x, w, t, sizes, config_type(*config), scale, wrap=wrap, residual=residual,
                         counters=counters)

    @custom_op(f"teal::{name}_parts_sm90", mutates_args=())
    def parts_op(x: Tensor, w: Tensor, t: Tensor, norm_weight: Optional[Tensor], ss_in: Optional[Tensor],
                 eps: float, sizes: list[int], glu: bool, config: list[int], scale: Tensor) -> Tensor:
        return parts(direct, x, w, t, norm_weight, ss_in, eps, sizes, glu, config, scale)

    @custom_op(f"teal::{name}_residual_sm90", mutates_args=("counters",))
    def residual_op(x: Tensor, w: Tensor, t: Tensor, counters: Tensor, residual: Tensor, sizes: list[int],
                    config: list[int], scale: Tensor) -> tuple[Tensor, Tensor]:
        return residual_sum(direct, x, w, t, counters, residual, sizes, config, scale)

    fake_parts, fake_residual = partial(parts, skip), partial(residual_sum, skip)
    parts_op.register_fake(fake_parts)
    residual_op.register_fake(fake_residual)

    def int4_parts(x: Tensor, w: Tensor, t: Tensor, sizes, config, scale: Tensor, glu: bool = False,
                   norm_weight: Optional[Tensor] = None, ss_in: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
        return parts_op(x, w, t, norm_weight, ss_in, eps, list(sizes), glu, list(config), scale)

    def int4_residual(x: Tensor, w: Tensor, t: Tensor, sizes, config, scale: Tensor, counters: Tensor,
                      residual: Tensor) -> tuple:
        return residual_op(x, w, t, counters, residual, list(sizes), list(config), scale)

    return Int4Ops(int4_parts, int4_residual, (parts_op, residual_op), fake_parts, fake_residual)


OPS = int4_ops("int4", launch, Config)
int4_parts, int4_residual = OPS.parts, OPS.residual
