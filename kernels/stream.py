"""The batch-1 weight stream shared by the projection kernel (sparse_gemv.py) and the one-launch MLP
(sparse_mlp.py): a program lists the kept inputs of its K range, then streams only their weight rows.

1. The kept-input list (one per program, int32 entries in an L2 scratch buffer, read back by the same CTA after a
   barrier). An entry holds the input's position in the K range (ROW_MASK bits), a flag per half of a GLU pair
   (KEEP: gate or the only segment, KEEP_UP: up) and, for 16-bit inputs, the input's bits above VALUE_SHIFT;
   float32 inputs go to a second list of the same length (K_SPLIT entries further on).
2. The stream: steps of BK list entries (or of BK rows in order when every threshold of the range is zero, which
   is exactly dense), the next step's weight rows (and the step after's entries) in flight while the current step
   is multiplied. Rows k and k + ACC_ROWS sit in one thread, so folding a [BK, BN] step into an [ACC_ROWS, BN]
   accumulator stays in registers. The bytes in flight per step do not shrink as sparsity grows; the steps do.
3. Or, with no list at all (16/8-bit, a launch config's `masked`): the rows in order, each loaded only where its input
   passes its threshold (_masked_stream). Its steps are (1 - s) empty at sparsity s, so it pays only where the list's
   own phases cost more than that: o's short K ranges at 40-65% (docs/perf-notes.md, session 29).

Weight formats (QUANT, see kernels/formats.py): 0 16/32-bit floats, 1 int8 rows (widened exactly by a magic
number, per-column scales applied by the caller to the sums), 2 int4 (eight weights per int32 word, a scale and
offset per group of GS inputs): every group starts a new step of the list, so one group's scales serve a step,
and nibbles are widened to 1 + q/16 without an int -> float conversion (_fma4).
"""
import triton
import triton.language as tl

from kernels.common import _glu, _inv_rms, _load_rows, _load_x, _rms_scale, _stamp, _stamp_after

ROW_BITS = tl.constexpr(14)  # list entries hold k - k_begin in 14 bits: K ranges < 16384 inputs
ROW_MASK = tl.constexpr(0x3FFF)
KEEP = tl.constexpr(0x4000)  # the input passes its (first) segment's threshold
KEEP_UP = tl.constexpr(0x8000)  # ... and the up half's (GLU)
VALUE_SHIFT = tl.constexpr(16)  # a 16-bit input's bits sit above this


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
def _build_list(x_ptr, t_seg, t_up_ptr, nw_ptr, ss, scratch, k_begin, k_end, K, K_SPLIT, COMPACT: tl.constexpr,
                BLOCK_K: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr,
                X_PARTS: tl.constexpr, QUANT: tl.constexpr, GS: tl.constexpr, xdt: tl.constexpr, prof,
                PROFILE: tl.constexpr):
    """Stage 1: the kept inputs of [k_begin, k_end) into `scratch` -> (entries listed, the largest threshold seen,
    1 / RMS of the input row with NORM). The input is x [K] (or silu(gate) * up of gate/up partials [X_PARTS, 2, K]),
    RMS-normalised first with NORM; t_seg the segment's thresholds, t_up_ptr up's (GLU).
    Inputs are loaded here directly, not through _load_x: torch.compile's mutation analysis takes every pointer handed
    to a call whose result feeds a store's address (the list position depends on x) as written."""
    X32: tl.constexpr = xdt.primitive_bitwidth == 32
    n_kept = 0
    t_max = 0.0
    inv = 0.0  # 1 / RMS of the input row with NORM, kept for the dense branch
    for c0 in range(k_begin, k_end, COMPACT):
        ks = c0 + tl.arange(0, COMPACT)
        k_ok = ks < k_end
        # every load of the chunk first, so that they are all in flight before anything waits on one
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
            t_up = tl.load(t_up_ptr + ks, mask=k_ok, other=0.0)
        if NORM:
            g = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            # the sums of squares made chunk-dependent (c0 >= 0 always): the compiler would otherwise hoist their
            # sum above the loop, in front of this chunk's loads, and wait for ss before issuing them
            inv = tl.sum(_inv_rms(tl.where(c0 >= 0, ss, 0.0), K, EPS), axis=0)
        if X_PARTS > 0:
            x = _glu(gate, up, xdt).to(xdt)
        if NORM:
            x = _rms_scale(x, g, inv)
        xf = x.to(tl.float32)
        _stamp_after(prof, 16, xf, PROFILE)
        keep = (tl.abs(xf) > t) & k_ok
        t_max = tl.maximum(t_max, tl.max(t, axis=0))
        entry = (keep.to(tl.int32) << ROW_BITS) | (ks - k_begin)
        if GLU:
            keep_up = (tl.abs(xf) > t_up) & k_ok
            t_max = tl.maximum(t_max, tl.max(t_up, axis=0))
            entry = entry | (keep_up.to(tl.int32) << (ROW_BITS + 1))
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
            _stamp(prof, 18, tl.max(pos, axis=0), PROFILE)
            n_kept += tl.sum(keep.to(tl.int32), axis=0)
        if X32:
            tl.store(scratch + K_SPLIT + pos, x.to(tl.int32, bitcast=True), mask=keep)
        else:
            entry = entry | (x.to(tl.uint16, bitcast=True).to(tl.int32) << VALUE_SHIFT)
        tl.store(scratch + pos, entry, mask=keep)
    return n_kept, t_max, inv


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
        x = (e >> VALUE_SHIFT).to(tl.uint16).to(xdt, bitcast=True).to(tl.float32)
    return e, x


@triton.jit
def _group_rows(w_cols, e, stride_wk, N_W, col_ok, EVEN_N: tl.constexpr, GLU: tl.constexpr):
    """The weight rows [BK, BN] of a step of entries (gate/first segment, and up, N_W columns further, with GLU)."""
    rows = w_cols + (e & ROW_MASK)[:, None] * stride_wk
    w = _load_rows(rows, (e & KEEP) != 0, col_ok, EVEN_N)
    w_up = w
    if GLU:
        w_up = _load_rows(rows + N_W, (e & KEEP_UP) != 0, col_ok, EVEN_N)
    return w, w_up


@triton.jit
def _dense_group(x_ptr, nw_ptr, inv_rms, w_cols, k_begin, j, k_end, K, stride_wk, N_W, col_ok,
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
        w_up = _load_rows(rows + N_W, ok, col_ok, EVEN_N)
    return x.to(tl.float32), w, w_up


@triton.jit
def _masked_inputs(x_ptr, nw_ptr, inv, t_seg, t_up_ptr, k_begin, j, k_end, K, BLOCK_K: tl.constexpr,
                   GLU: tl.constexpr, NORM: tl.constexpr, X_PARTS: tl.constexpr, xdt: tl.constexpr):
    """Inputs k_begin+j .. +BK as the list path sees them (float32, normalised) and which pass their threshold
    (the first segment's, and up's with GLU): the masked stream's step without a list."""
    ks = k_begin + j + tl.arange(0, BLOCK_K)
    ok = ks < k_end
    x = _load_x(x_ptr, ks, ok, K, X_PARTS, xdt)
    t = tl.load(t_seg + ks, mask=ok, other=0.0)
    if NORM:
        x = _rms_scale(x, tl.load(nw_ptr + ks, mask=ok, other=0.0).to(tl.float32), inv)
    xf = x.to(tl.float32)
    keep = (tl.abs(xf) > t) & ok
    keep_up = keep
    if GLU:
        keep_up = (tl.abs(xf) > tl.load(t_up_ptr + ks, mask=ok, other=0.0)) & ok
    return xf, keep, keep_up


@triton.jit
def _masked_stream(x_ptr, nw_ptr, inv, t_seg, t_up_ptr, w_cols, col_ok, k_begin, k_end, K, stride_wk, N_W,
                   BLOCK_K: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr,
                   NORM: tl.constexpr, X_PARTS: tl.constexpr, xdt: tl.constexpr, ACC_ROWS: tl.constexpr,
                   QUANT: tl.constexpr):
    """Stage 2 without a list: the rows in order, each step's rows loaded only where their input passes its
    threshold (a dropped row costs an instruction slot, no bytes), inputs two steps ahead of the products and rows
    one step ahead. No list store, barrier and reload; at sparsity s the steps are (1 - s) empty. 16/8-bit."""
    acc = _acc_zeros(ACC_ROWS, BN, QUANT)
    acc_up = _acc_zeros(ACC_ROWS, BN, QUANT)
    jj = tl.arange(0, BLOCK_K)
    xa, ka, kua = _masked_inputs(x_ptr, nw_ptr, inv, t_seg, t_up_ptr, k_begin, 0, k_end, K, BLOCK_K, GLU, NORM,
                                 X_PARTS, xdt)
    xb, kb, kub = _masked_inputs(x_ptr, nw_ptr, inv, t_seg, t_up_ptr, k_begin, BLOCK_K, k_end, K, BLOCK_K, GLU,
                                 NORM, X_PARTS, xdt)
    rows = w_cols + jj[:, None] * stride_wk
    wa = _load_rows(rows, ka, col_ok, EVEN_N)
    wua = wa
    if GLU:
        wua = _load_rows(rows + N_W, kua, col_ok, EVEN_N)
    for j in range(BLOCK_K, k_end - k_begin, BLOCK_K):
        xc, kc, kuc = _masked_inputs(x_ptr, nw_ptr, inv, t_seg, t_up_ptr, k_begin, j + BLOCK_K, k_end, K, BLOCK_K,
                                     GLU, NORM, X_PARTS, xdt)
        rows = w_cols + (j + jj)[:, None] * stride_wk
        wb = _load_rows(rows, kb, col_ok, EVEN_N)
        wub = wb
        if GLU:
            wub = _load_rows(rows + N_W, kub, col_ok, EVEN_N)
        acc, acc_up = _step_fma(acc, acc_up, tl.where(ka, xa, 0.0), tl.where(kua, xa, 0.0), wa, wua, 0.0, 0.0,
                                0.0, 0.0, ACC_ROWS, GLU, QUANT)
        xa, ka, kua, wa, wua = xb, kb, kub, wb, wub
        xb, kb, kub = xc, kc, kuc
    acc, acc_up = _step_fma(acc, acc_up, tl.where(ka, xa, 0.0), tl.where(kua, xa, 0.0), wa, wua, 0.0, 0.0, 0.0, 0.0,
                            ACC_ROWS, GLU, QUANT)
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
def _scales4(s_cols, grp, n_tot, G, N_OUT, col_ok, GLU: tl.constexpr):
    """Group grp's scales s and offsets m (w = q s + m) of the tile's columns s_cols [BN/8, 8], float32; with GLU
    also up's (N_OUT columns further)."""
    s = tl.load(s_cols + grp * n_tot, mask=col_ok, other=0.0).to(tl.float32)
    m = tl.load(s_cols + (G + grp) * n_tot, mask=col_ok, other=0.0).to(tl.float32)
    s_up, m_up = s, m
    if GLU:
        s_up = tl.load(s_cols + grp * n_tot + N_OUT, mask=col_ok, other=0.0).to(tl.float32)
        m_up = tl.load(s_cols + (G + grp) * n_tot + N_OUT, mask=col_ok, other=0.0).to(tl.float32)
    return s, m, s_up, m_up


@triton.jit
def _step_scales(s_cols, grp, n_tot, G, N_OUT, col_ok, GLU: tl.constexpr, QUANT: tl.constexpr):
    """A step's group scales (int4); other formats have none (their scales apply to the sums)."""
    if QUANT == 2:
        s, m, s_up, m_up = _scales4(s_cols, grp, n_tot, G, N_OUT, col_ok, GLU)
    else:
        s, m, s_up, m_up = 0.0, 0.0, 0.0, 0.0
    return s, m, s_up, m_up


@triton.jit
def _step_group(scratch, j, n_kept, k_begin, GS: tl.constexpr, QUANT: tl.constexpr):
    """The scale group of list entries j .. j+BK (int4: one group per step, that of its first entry)."""
    if QUANT == 2:
        e0 = tl.load(scratch + j, mask=j < n_kept, other=0, cache_modifier=".cg")
        g = (k_begin + (e0 & ROW_MASK)) // GS
    else:
        g = 0
    return g


@triton.jit
def _step_fma(acc, acc_up, x, x_up, w, w_up, s, m, s_up, m_up, ROWS: tl.constexpr, GLU: tl.constexpr,
              QUANT: tl.constexpr):
    """One step's rows into the accumulators: x, x_up [BK] the inputs (zero where a half drops them)."""
    if QUANT == 2:
        acc = _fma4(acc, x, w, s, m, ROWS)
        if GLU:
            acc_up = _fma4(acc_up, x_up, w_up, s_up, m_up, ROWS)
    else:
        acc = _fma(acc, x, w, ROWS)
        if GLU:
            acc_up = _fma(acc_up, x_up, w_up, ROWS)
    return acc, acc_up


@triton.jit
def _acc_zeros(ROWS: tl.constexpr, BN: tl.constexpr, QUANT: tl.constexpr):
    """The accumulator of a stream over BN columns: [ROWS, BN], or [ROWS, BN / 8, 8] (word, nibble) for int4, which
    keeps tiles in the layout they were loaded in (joining nibbles into columns per step goes through shared
    memory)."""
    if QUANT == 2:
        acc = tl.zeros((ROWS, BN // 8, 8), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BN), dtype=tl.float32)
    return acc


@triton.jit
def _settle(acc, QUANT: tl.constexpr):
    """What a stream returns: int4 accumulators folded to their column sums [BN] inside each branch, 16/8-bit ones
    as they are (folded by _fold after the branches merge). These are the placements the register allocator serves
    best (sm_90 builds: int4 gate/up 168 registers against 229, bf16 projections 131 against 143)."""
    if QUANT == 2:
        W: tl.constexpr = acc.shape[1]
        out = tl.reshape(tl.sum(acc, axis=0), (W * 8,))
    else:
        out = acc
    return out


@triton.jit
def _fold(acc, QUANT: tl.constexpr):
    """A stream's result -> the column sums [BN] (see _settle)."""
    if QUANT == 2:
        sums = acc
    else:
        sums = tl.sum(acc, axis=0)
    return sums


@triton.jit
def _list_stream(scratch, n_kept, K_SPLIT, w_cols, col_ok, s_cols, s_ok, k_begin, stride_wk, N_W, N_OUT, n_tot, G,
                 BLOCK_K: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr,
                 xdt: tl.constexpr, ACC_ROWS: tl.constexpr, QUANT: tl.constexpr, GS: tl.constexpr, prof,
                 PROFILE: tl.constexpr):
    """Stage 2 over a kept list: steps of BK entries, step b's weight rows and step c's entries in flight while
    step a is multiplied -> the accumulators (and up's; see _settle, _fold). w_cols: the K range's
    first row at the tile's columns (int32 words for int4), N_W: up's offset from gate's in those units; s_cols,
    s_ok: int4 scales [BN/8, 8]."""
    acc = _acc_zeros(ACC_ROWS, BN, QUANT)
    acc_up = _acc_zeros(ACC_ROWS, BN, QUANT)
    ea, xa = _entries(scratch, 0, n_kept, K_SPLIT, xdt, BLOCK_K)
    _stamp(prof, 4, tl.max(ea, axis=0), PROFILE)
    eb, xb = _entries(scratch, BLOCK_K, n_kept, K_SPLIT, xdt, BLOCK_K)
    ga = _step_group(scratch, 0, n_kept, k_begin, GS, QUANT)
    gb = _step_group(scratch, BLOCK_K, n_kept, k_begin, GS, QUANT)
    wa, wua = _group_rows(w_cols, ea, stride_wk, N_W, col_ok, EVEN_N, GLU)
    _stamp_after(prof, 20, wa, PROFILE)
    sa, ma, sua, mua = _step_scales(s_cols, ga, n_tot, G, N_OUT, s_ok, GLU, QUANT)
    for j in range(BLOCK_K, n_kept, BLOCK_K):
        ec, xc = _entries(scratch, j + BLOCK_K, n_kept, K_SPLIT, xdt, BLOCK_K)
        gc = _step_group(scratch, j + BLOCK_K, n_kept, k_begin, GS, QUANT)
        wb, wub = _group_rows(w_cols, eb, stride_wk, N_W, col_ok, EVEN_N, GLU)
        sb, mb, sub, mub = _step_scales(s_cols, gb, n_tot, G, N_OUT, s_ok, GLU, QUANT)
        acc, acc_up = _step_fma(acc, acc_up, tl.where((ea & KEEP) != 0, xa, 0.0),
                                tl.where((ea & KEEP_UP) != 0, xa, 0.0), wa, wua, sa, ma, sua, mua, ACC_ROWS, GLU,
                                QUANT)
        ea, xa, wa, wua, sa, ma, sua, mua = eb, xb, wb, wub, sb, mb, sub, mub
        eb, xb, gb = ec, xc, gc
    acc, acc_up = _step_fma(acc, acc_up, tl.where((ea & KEEP) != 0, xa, 0.0), tl.where((ea & KEEP_UP) != 0, xa, 0.0),
                            wa, wua, sa, ma, sua, mua, ACC_ROWS, GLU, QUANT)
    return _settle(acc, QUANT), _settle(acc_up, QUANT)


@triton.jit
def _dense_stream(x_ptr, nw_ptr, inv, w_cols, col_ok, s_cols, s_ok, k_begin, k_end, K, stride_wk, N_W, N_OUT, n_tot,
                  G, BLOCK_K: tl.constexpr, BN: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr,
                  NORM: tl.constexpr, X_PARTS: tl.constexpr, xdt: tl.constexpr, ACC_ROWS: tl.constexpr,
                  QUANT: tl.constexpr, GS: tl.constexpr):
    """Stage 2 with every threshold of the range at zero (dense): every row counts (a zero input adds zero), so the
    rows stream in order, with no list and no dependent load before the weight loads. Arguments as _list_stream."""
    acc = _acc_zeros(ACC_ROWS, BN, QUANT)
    acc_up = _acc_zeros(ACC_ROWS, BN, QUANT)
    xa, wa, wua = _dense_group(x_ptr, nw_ptr, inv, w_cols, k_begin, 0, k_end, K, stride_wk, N_W, col_ok, BLOCK_K,
                               EVEN_N, GLU, NORM, X_PARTS, xdt)
    sa, ma, sua, mua = _step_scales(s_cols, k_begin // GS, n_tot, G, N_OUT, s_ok, GLU, QUANT)
    for j in range(BLOCK_K, k_end - k_begin, BLOCK_K):
        xb, wb, wub = _dense_group(x_ptr, nw_ptr, inv, w_cols, k_begin, j, k_end, K, stride_wk, N_W, col_ok, BLOCK_K,
                                   EVEN_N, GLU, NORM, X_PARTS, xdt)
        sb, mb, sub, mub = _step_scales(s_cols, (k_begin + j) // GS, n_tot, G, N_OUT, s_ok, GLU, QUANT)
        acc, acc_up = _step_fma(acc, acc_up, xa, xa, wa, wua, sa, ma, sua, mua, ACC_ROWS, GLU, QUANT)
        xa, wa, wua, sa, ma, sua, mua = xb, wb, wub, sb, mb, sub, mub
    acc, acc_up = _step_fma(acc, acc_up, xa, xa, wa, wua, sa, ma, sua, mua, ACC_ROWS, GLU, QUANT)
    return _settle(acc, QUANT), _settle(acc_up, QUANT)
