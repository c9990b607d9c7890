"""Building blocks every decode kernel shares: batch limits, how a tile meets its input (RMSNorm fused, gate/up
partials summed and gated as they load), how it rounds, how its output leaves (epilogue, split-K reduction without a
memset, unreduced partials). Nothing here launches anything.

Rounding follows the references (kernels/reference.py): each projection rounds to the output dtype, silu rounds,
the product rounds, the residual add rounds.
"""
import os

import triton
import triton.language as tl

MAX_ROWS = 8  # batch rows (tokens) a decode kernel serves; larger batches take the reference path
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def direct(kernel):
    """A launch's `wrap` by default: launch the kernel itself (tests pass a recorder)."""
    return kernel


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def skip(kernel):
    """A launch's `wrap` in the ops' fake implementations: the launch's checks run and its outputs are allocated
    (as fake tensors), nothing is launched."""
    return _NoLaunch()


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:  # Triton's CPU interpreter multiplies bf16 operands wrongly; fp32 gives the same products
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _as(w, xdt: tl.constexpr):
    """Weights in the inputs' dtype for tl.dot: int8 values are exact in 16-bit floats (widened through float32:
    Triton's CPU interpreter converts int8 to bf16 wrongly)."""
    if w.dtype == tl.int8:
        return w.to(tl.float32).to(xdt)
    return w.to(xdt)


@triton.jit
def _glu(gate, up, dt: tl.constexpr):
    """silu(gate) * up in float32 from float32 sums, rounded where the reference rounds: each projection to dt,
    then silu, then the product (the caller rounds the product)."""
    g = gate.to(dt).to(tl.float32)
    return (g * tl.sigmoid(g)).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)


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


@triton.jit
def _finish(part, part_up, res, y_ptr, ws_ptr, cnt_ptr, ss_out_ptr, rows, row_ok, cols, col_ok, out_mask, M, N_OUT,
            stride_rm, stride_ym, pid_n, pid_k, SPLIT_K, BLOCK_M: tl.constexpr, GLU: tl.constexpr,
            HAS_RES: tl.constexpr, IS_SPLIT: tl.constexpr, EMIT_SS: tl.constexpr, PARTIAL_OUT: tl.constexpr,
            RED_BLOCK: tl.constexpr, prof, PROFILE: tl.constexpr):
    """A program's sums [BM, BN] (and up's) leave the kernel:
    - PARTIAL_OUT: into y [SPLIT_K, 2 if GLU, M, N_OUT] float32, unreduced, for a consumer that sums the partials as
      it loads them;
    - one program along K: through the epilogue;
    - split-K without a memset: each program stores its partials to the workspace [SPLIT_K, 2 if GLU, BM, N_OUT],
      bumps its tile's counter, and the last to arrive sums the partials in a fixed order (deterministic), applies
      the epilogue and resets the counter for the next launch. With one row (BM == 1) RED_BLOCK partials come in
      one load: one L2 round trip for up to RED_BLOCK splits."""
    if PARTIAL_OUT:
        n_halves_out: tl.constexpr = 2 if GLU else 1
        yp = y_ptr + (pid_k * n_halves_out * M + rows[:, None]) * N_OUT + cols[None, :]
        tl.store(yp, part, mask=out_mask)
        if GLU:
            tl.store(yp + M * N_OUT, part_up, mask=out_mask)
    elif not IS_SPLIT:
        _epilogue(part, part_up, res, y_ptr, ss_out_ptr, rows, row_ok, cols, out_mask, stride_rm, stride_ym,
                  GLU, HAS_RES, EMIT_SS)
    else:
        n_halves: tl.constexpr = 2 if GLU else 1
        ws = ws_ptr + rows[:, None] * N_OUT + cols[None, :]
        split_stride = n_halves * BLOCK_M * N_OUT
        tl.store(ws + pid_k * split_stride, part, mask=out_mask)
        if GLU:
            tl.store(ws + pid_k * split_stride + BLOCK_M * N_OUT, part_up, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are stored before the counter moves
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        _stamp(prof, 8, arrived, PROFILE)
        _note(prof, 13, arrived, PROFILE)
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, part.shape[1]), dtype=tl.float32)
            total_up = tl.zeros((BLOCK_M, part.shape[1]), dtype=tl.float32)
            if BLOCK_M > 1:
                for s in range(SPLIT_K):  # a fixed order: the sum does not depend on arrival order
                    total += tl.load(ws + s * split_stride, mask=out_mask, other=0.0, cache_modifier=".cg")
                    if GLU:
                        total_up += tl.load(ws + s * split_stride + BLOCK_M * N_OUT, mask=out_mask, other=0.0,
                                            cache_modifier=".cg")
            else:
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
            _stamp_after(prof, 10, total, PROFILE)


@triton.jit
def _tile_columns(pid_n, TILE_END0, TILE_END1, COL_END0, COL_END1, N_OUT, BLOCK_N: tl.constexpr,
                  EVEN_N: tl.constexpr):
    """Column tile pid_n of up to three output segments that share the input (q, k, v; tiles never straddle two)
    -> (segment, first column, the segment's end, columns [BN], their mask)."""
    seg = (pid_n >= TILE_END0).to(tl.int32) + (pid_n >= TILE_END1).to(tl.int32)
    tile0 = tl.where(seg == 0, 0, tl.where(seg == 1, TILE_END0, TILE_END1))
    col0 = tl.where(seg == 0, 0, tl.where(seg == 1, COL_END0, COL_END1))
    col_end = tl.where(seg == 0, COL_END0, tl.where(seg == 1, COL_END1, N_OUT))
    first = col0 + (pid_n - tile0) * BLOCK_N
    cols = first + tl.arange(0, BLOCK_N)  # [BN]
    if EVEN_N:  # every segment is a multiple of BLOCK_N: no column mask, so loads stay vectorised
        cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_N), BLOCK_N)
        col_ok = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        col_ok = cols < col_end
    return seg, first, col_end, cols, col_ok


@triton.jit
def _word_columns(first, col_end, s_ptr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """int4 weights (8 columns per int32 word) of a tile starting at column `first` -> (word columns [BN/8], their
    mask, the scales' columns [BN/8, 8] (word, nibble) as pointers into s_ptr, their mask)."""
    wcols = first // 8 + tl.arange(0, BLOCK_N // 8)  # [BN/8]
    if EVEN_N:
        wcols = tl.max_contiguous(tl.multiple_of(wcols, BLOCK_N // 8), BLOCK_N // 8)
    wcol_ok = wcols * 8 < col_end
    cols3 = wcols[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BN/8, 8]: word, nibble
    return wcols, wcol_ok, s_ptr + cols3, cols3 < col_end


@triton.jit
def _column_scales(s_ptr, cols, col_ok, N_OUT, GLU: tl.constexpr, QUANT: tl.constexpr):
    """int8 weights' per column scales of the tile (and up's, N_OUT columns further), applied to the sums; 1 for
    other formats."""
    scale = 1.0
    scale_up = 1.0
    if QUANT == 1:
        scale = tl.load(s_ptr + cols, mask=col_ok, other=0.0)
        scale_up = scale
        if GLU:
            scale_up = tl.load(s_ptr + N_OUT + cols, mask=col_ok, other=0.0)
    return scale, scale_up


PROFILE_SLOTS = 32  # int64 words per program of a profile buffer (scripts/profile_phases.py reads them)
SLOTS = tl.constexpr(PROFILE_SLOTS)  # the same, for kernels


@triton.jit
def _stamp(prof, slot: tl.constexpr, dep, PROFILE: tl.constexpr):
    """With PROFILE: the GPU's %globaltimer and %clock64 into prof[slot] and prof[slot + 1] once `dep` (an int32
    scalar) is known: the stamp waits on it, so work cannot move across it (~0.2 us a stamp); the first stamp (slot
    0) also notes the SM at slot 14. Without PROFILE: nothing."""
    if PROFILE:
        d = tl.full((1,), 0, tl.int32) + dep
        g = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [d], dtype=tl.int64, is_pure=False, pack=1)
        c = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [d], dtype=tl.int64, is_pure=False, pack=1)
        o = tl.arange(0, 1)
        tl.store(prof + slot + o, g)
        tl.store(prof + slot + 1 + o, c)
        if slot == 0:
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [d], dtype=tl.int32, is_pure=False, pack=1)
            tl.store(prof + 14 + o, sm.to(tl.int64))


@triton.jit
def _note(prof, slot: tl.constexpr, value, PROFILE: tl.constexpr):
    """With PROFILE: an int32 scalar (a count, an SM id) into prof[slot]."""
    if PROFILE:
        tl.store(prof + slot, value.to(tl.int64))


@triton.jit
def _stamp_after(prof, slot: tl.constexpr, x, PROFILE: tl.constexpr):
    """_stamp once every element of the tensor x is known."""
    if PROFILE:
        v = tl.max(tl.reshape(x.to(tl.float32), (x.numel,), can_reorder=True), axis=0)
        _stamp(prof, slot, (v > 1e30).to(tl.int32), PROFILE)
