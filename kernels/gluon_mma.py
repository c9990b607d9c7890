"""The batch-1 int4 input-sparse projection on tensor cores (sm_80+ mma.sync, built for sm_90 here): the weight
stream's arithmetic moved off the CUDA cores.

kernels/gluon_gemv.py multiplies each weight on the CUDA cores (~5 instructions per weight: the stream is
instruction-bound at 2-3x its bandwidth time). Here a step of 64 kept inputs x 256 output columns is one
mma [256, 64] x [64, 8] per program: the weights are the A operand (rows = output columns, K = the kept inputs, in
list order), the input the B operand, fp32 accumulation. A thread's A fragment pairs two kept inputs (k, k+1) of one
column, so each pair of 16-bit values is made from two int32 words (rows k and k+1) by one PRMT (byte i of each word
side by side) and one LOP3 per nibble half (q into the mantissa of 128.0 for bf16, 1024.0 for fp16: 128 + q exactly,
no conversion), about one instruction per weight. This needs the columns of a 256-column tile stored in the order
the A fragment holds them (mma_order below, made once at load); the group scales stay as they are.

The B operand has 8 columns and batch 1 uses one: column c carries the input of the range's c-th scale group (zero
elsewhere), so one accumulator holds each column's sum per group, sum_k x_k (O + q_k), for up to 8 groups of a K
range, and the scales apply once at the end: y = sum_c s_c acc_c + (m_c - O s_c) X_c, X_c the group's input sum
(made by the list build). Work decomposition, list and partials out as kernels/gluon_gemv.py. Reference:
gluon_gemv.int4_parts_ref (after mma_order's inverse).
"""
from itertools import accumulate
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from kernels.common import direct
from kernels.formats import INT4, pack_int4, unpack_int4
from kernels.gluon_gemv import ROW_MASK, _build_list, check_inputs, int4_ops, outputs

WARPS = 4  # each warp holds a quarter of a tile's columns: mma rows 16 w + 64 i (+ 256 v)
NW = gl.constexpr(WARPS)


def _asm(magic: int) -> str:
    """PTX of one pair of words (rows k, k+1 of 8 nibbles) -> 8 registers of 2 x 16-bit (O + q_k, O + q_k+1):
    output 2i + h is nibble h of byte i."""
    lines = ["{", ".reg .b32 d, t;"]
    for i in range(4):
        sel = i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12)  # bytes 0, 1 <- byte i of row k; 2, 3 <- of row k+1
        lines += [f"prmt.b32 d, $8, $9, {sel:#x};",
                  f"lop3.b32 ${2 * i}, d, 0x000F000F, {magic:#x}, 0xEA;",  # (d & mask) | magic
                  "shr.u32 t, d, 4;",
                  f"lop3.b32 ${2 * i + 1}, t, 0x000F000F, {magic:#x}, 0xEA;"]
    return "\n".join(lines + ["}"])


ASM_BF16 = _asm(0x43004300)  # bf16 128.0: mantissa LSB 1
ASM_FP16 = _asm(0x64006400)  # fp16 1024.0


def tile_n(wb: int) -> int:
    """Columns of a program's tile when a thread reads wb int32 words of each row (4 wb bytes, LDG.32 / .64)."""
    return 256 * wb


def layouts(wb: int) -> tuple:
    """(load, dequant, B) layouts of a step of 64 / wb rows: words [rows, 32 wb] loaded with a thread's wb words in
    consecutive registers (one vector load per row), the same with rows k, k + 1 consecutive instead (the asm's
    pairs), and the B operand's [rows, 8] (rows distributed as the words', every warp holding all of them)."""
    rows = [[1, 0], [8, 0], [16, 0]] + ([[32, 0]] if wb == 1 else [])
    lanes = [[2, 0], [4, 0], [0, wb], [0, 2 * wb], [0, 4 * wb]]
    warps = [[0, 8 * wb], [0, 16 * wb]]
    bk = 64 // wb
    vec = [[0, 1]] if wb == 2 else []
    load = gl.DistributedLinearLayout(vec + rows, lanes, warps, [], [bk, 32 * wb])
    dq = gl.DistributedLinearLayout(rows[:1] + vec + rows[1:], lanes, warps, [], [bk, 32 * wb])
    b = gl.DistributedLinearLayout(rows, [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]], [[0, 0], [0, 0]], [], [bk, 8])
    return load, dq, b


def mma_order(n: int, wb: int, device=None) -> Tensor:
    """perm [n]: column perm[p] of each tile goes to position p (pack_int4 order: position 2b + h is nibble h of
    byte b). Byte b = 4 wb (8 w + g) + 4 v + i, byte i of word v of lane group g in warp w, holds the A fragment's
    row g + 8 h + 16 w + 64 (i + 4 v)."""
    tn = tile_n(wb)
    p = torch.arange(tn, device=device)
    b, h = p // 2, p % 2
    i, v, g, w = b % 4, (b // 4) % wb, (b // (4 * wb)) % 8, b // (32 * wb)
    tile = g + 8 * h + 16 * w + 64 * (i + 4 * v)
    return (torch.arange(0, n, tn, device=device)[:, None] + tile[None, :]).reshape(-1)


def to_mma_layout(w: Tensor, wb: int) -> Tensor:
    """int4 words [K, N/8] (pack_int4) -> the same weights with each tile's columns in mma_order."""
    q = unpack_int4(w)
    return pack_int4(q[:, mma_order(q.shape[1], wb, q.device)])


def from_mma_layout(w: Tensor, wb: int) -> Tensor:
    q = unpack_int4(w)
    out = torch.empty_like(q)
    out[:, mma_order(q.shape[1], wb, q.device)] = q
    return pack_int4(out)


@gluon.jit
def _dequant(wd, ASM: gl.constexpr, xdt: gl.constexpr, AL: gl.constexpr, WB: gl.constexpr):
    """words [BK, 32 WB] (LWD) -> the A operand [256 WB, BK] in AL: column g + 8h + 16w + 64 (i + 4v)."""
    BK: gl.constexpr = 64 // WB
    if xdt == gl.bfloat16:  # (the asm's result types must be dtypes, not constexprs)
        o = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [wd], is_pure=True, pack=2,
                                      dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16,
                                             gl.bfloat16, gl.bfloat16, gl.bfloat16))
    else:
        o = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [wd], is_pure=True, pack=2,
                                      dtype=(gl.float16, gl.float16, gl.float16, gl.float16, gl.float16, gl.float16,
                                             gl.float16, gl.float16))
    a = gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])),
                gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7])))  # [BK, 32 WB, h, i0, i1]
    a = gl.reshape(a, [BK, NW, 8, WB, 2, 2, 2])  # [k, w, g, v, h, i0, i1]
    a = gl.permute(a, [3, 6, 5, 1, 4, 2, 0])  # [v, i1, i0, w, h, g, k]
    return gl.convert_layout(gl.reshape(a, [256 * WB, BK]), AL)


@gluon.jit
def _step(acc, e, wd, cb, ASM: gl.constexpr, xdt: gl.constexpr, AL: gl.constexpr, BL: gl.constexpr,
          LWD: gl.constexpr, LB: gl.constexpr, GS: gl.constexpr, WB: gl.constexpr):
    """acc + one step: entries e (the load layout's rows) and their words wd. Column c of B holds the entries of the
    range's scale group c (the rows of a step are distributed alike in the words' layouts and LB); zero entries past
    the list hold +0.0."""
    eb = gl.convert_layout(e, gl.SliceLayout(1, LB))
    xv = gl.expand_dims((eb >> 16).to(gl.int16).to(xdt, bitcast=True), 1)
    xb = gl.where(gl.expand_dims(eb & (7 * GS), 1) == cb * GS, xv, gl.zeros_like(xv))
    a = _dequant(gl.convert_layout(wd, LWD), ASM, xdt, AL, WB)
    return mma_v2(a, gl.convert_layout(xb, BL), acc)


@gluon.jit
def _mma_kernel(x_ptr, t_ptr, w_ptr, s_ptr, nw_ptr, ss_ptr, out_ptr, scratch_ptr, xs_ptr, res_ptr, ws_ptr, cnt_ptr,
                ss_out_ptr, K, N, G, K_SPLIT, TILE_END0, TILE_END1, N_SS, GS: gl.constexpr, NORM: gl.constexpr,
                SS_BLOCK: gl.constexpr, EPS: gl.constexpr, X_PARTS: gl.constexpr, ASM: gl.constexpr,
                OFFSET: gl.constexpr, WB: gl.constexpr, RESIDUAL: gl.constexpr):
    """Program (pid_n, pid_k): columns [BN pid_n, +BN) (of segment 0, 1 or 2 as in gluon_gemv) over K range pid_k
    (at most 8 scale groups) -> out[pid_k, its columns] float32; with RESIDUAL the tile of out [1, N] = res + the
    sum over K ranges, reduced by the last program of the tile to arrive (counters at cnt_ptr, partials through
    ws_ptr [programs along K, N], summed in a fixed order), its sum of squares in ss_out_ptr[pid_n]. X_PARTS: the
    input is gate/up's partials (gluon_gemv._load_in)."""
    BN: gl.constexpr = 256 * WB
    BK: gl.constexpr = 64 // WB
    # layouts(WB), spelled out (a layout is no kernel argument)
    LANES: gl.constexpr = [[2, 0], [4, 0], [0, WB], [0, 2 * WB], [0, 4 * WB]]
    WARPS_: gl.constexpr = [[0, 8 * WB], [0, 16 * WB]]
    if WB == 1:
        LWL: gl.constexpr = gl.DistributedLinearLayout([[1, 0], [8, 0], [16, 0], [32, 0]], LANES, WARPS_, [], [BK, 32])
        LWD: gl.constexpr = LWL
        LB: gl.constexpr = gl.DistributedLinearLayout([[1, 0], [8, 0], [16, 0], [32, 0]],
                                                      [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]], [[0, 0], [0, 0]], [],
                                                      [BK, 8])
    else:
        LWL: gl.constexpr = gl.DistributedLinearLayout([[0, 1], [1, 0], [8, 0], [16, 0]], LANES, WARPS_, [], [BK, 64])
        LWD: gl.constexpr = gl.DistributedLinearLayout([[1, 0], [0, 1], [8, 0], [16, 0]], LANES, WARPS_, [], [BK, 64])
        LB: gl.constexpr = gl.DistributedLinearLayout([[1, 0], [8, 0], [16, 0]],
                                                      [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]], [[0, 0], [0, 0]], [],
                                                      [BK, 8])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])
    AL: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    BL: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    if X_PARTS > 0:
        xdt: gl.constexpr = out_ptr.dtype.element_ty
    else:
        xdt: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n_split = gl.num_programs(1)
    seg = (pid_n >= TILE_END0).to(gl.int32) + (pid_n >= TILE_END1).to(gl.int32)
    k_begin = pid_k * K_SPLIT
    k_end = gl.minimum(k_begin + K_SPLIT, K)
    inv = 1.0
    if NORM:
        sj = gl.arange(0, SS_BLOCK, layout=gl.BlockedLayout([1], [32], [NW], [0]))
        inv = gl.rsqrt(gl.sum(gl.load(ss_ptr + sj, mask=sj < N_SS, other=0.0), axis=0) / K + EPS)
    prog = pid_n * n_split + pid_k
    scratch = scratch_ptr + prog * (K_SPLIT + 2 * BK)
    xs = xs_ptr + prog * 8
    # the kept inputs of the range in order, no padding (each entry's row names its group's B column)
    n_kept, t_max = _build_list(x_ptr, t_ptr + seg * K, nw_ptr, inv, scratch, k_begin, k_end, K, GS, 1, NW, NW,
                                NORM, X_PARTS, xdt, xs, True)
    rk = gl.arange(0, BK, layout=gl.SliceLayout(1, LWL))
    gl.store(scratch + n_kept + rk, gl.zeros_like(rk))  # two steps past the list: flagless entries, zero inputs
    gl.store(scratch + n_kept + BK + rk, gl.zeros_like(rk))
    gl.thread_barrier()  # the list and the group sums are complete and visible to every thread

    NWORD = N // 8
    w_tile = (w_ptr + k_begin * NWORD + pid_n * (BN // 8)
              + gl.expand_dims(gl.arange(0, 32 * WB, layout=gl.SliceLayout(0, LWL)), 0))
    cb = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, LB)), 0)  # [1, 8]
    acc = gl.zeros([BN, 8], gl.float32, layout=MMA)
    # weight loads unmasked: entries past the list read row 0 of the range (a line that stays in L1) for a zero input
    ea = gl.load(scratch + rk, cache_modifier=".cg")
    wa = gl.load(w_tile + gl.expand_dims(ea & ROW_MASK, 1) * NWORD)
    n_steps = (n_kept + BK - 1) // BK
    for j in range(0, n_steps // 2 * 2 * BK, 2 * BK):  # two steps a turn: no register moves for the prefetch
        eb = gl.load(scratch + j + BK + rk, cache_modifier=".cg")
        wb = gl.load(w_tile + gl.expand_dims(eb & ROW_MASK, 1) * NWORD)
        acc = _step(acc, ea, wa, cb, ASM, xdt, AL, BL, LWD, LB, GS, WB)
        ea = gl.load(scratch + j + 2 * BK + rk, cache_modifier=".cg")
        wa = gl.load(w_tile + gl.expand_dims(ea & ROW_MASK, 1) * NWORD)
        acc = _step(acc, eb, wb, cb, ASM, xdt, AL, BL, LWD, LB, GS, WB)
    if n_steps % 2 == 1:
        acc = _step(acc, ea, wa, cb, ASM, xdt, AL, BL, LWD, LB, GS, WB)

    LC: gl.constexpr = gl.SliceLayout(0, MMA)
    LM: gl.constexpr = gl.SliceLayout(1, MMA)
    c = gl.arange(0, 8, layout=LC)
    cols = pid_n * BN + gl.arange(0, BN, layout=LM)
    grp = k_begin // GS + c
    ok = grp < (k_end + GS - 1) // GS
    sp = s_ptr + gl.expand_dims(grp * N, 0) + gl.expand_dims(cols, 1)  # [BN, 8]
    s = gl.load(sp, mask=gl.expand_dims(ok, 0), other=0.0).to(gl.float32)
    m = gl.load(sp + G * N, mask=gl.expand_dims(ok, 0), other=0.0).to(gl.float32)
    xsum = gl.expand_dims(gl.load(xs + c, mask=ok, other=0.0), 0)
    y = gl.sum(acc * s + (m - OFFSET * s) * xsum, axis=1)
    if RESIDUAL:
        if n_split == 1:
            _epilogue(y, res_ptr, out_ptr, ss_out_ptr, cols, pid_n)
        else:
            gl.store(ws_ptr + pid_k * N + cols, y)
            gl.thread_barrier()  # every thread's partials are stored before the counter moves
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == n_split - 1:
                LR: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, NW], [1, 0])  # [8 K ranges, BN]
                cr = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, LR))
                pr = gl.arange(0, 8, layout=gl.SliceLayout(1, LR))
                total = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(0, LR))
                for p0 in range(0, n_split, 8):  # K ranges in order, eight at a time
                    p = gl.expand_dims(p0 + pr, 1)
                    part = gl.load(ws_ptr + p * N + gl.expand_dims(cr, 0), mask=p < n_split, other=0.0,
                                   cache_modifier=".cg")
                    total += gl.sum(part, axis=0)
                _epilogue(total, res_ptr, out_ptr, ss_out_ptr, cr, pid_n)
                gl.store(cnt_ptr + pid_n, 0)
    else:
        gl.store(out_ptr + pid_k * N + cols, y)


@gluon.jit
def _epilogue(total, res_ptr, y_ptr, ss_out_ptr, cols, pid_n):
    """y = res + total for the tile's columns cols [BN], rounded where the reference rounds (the projection to y's
    dtype, then the sum), and the tile's sum of squares of y into ss_out_ptr[pid_n] (the next RMSNorm's)."""
    dt: gl.constexpr = y_ptr.dtype.element_ty
    y = (gl.load(res_ptr + cols).to(gl.float32) + total.to(dt).to(gl.float32)).to(dt)
    gl.store(y_ptr + cols, y)
    yf = y.to(gl.float32)
    gl.store(ss_out_ptr + pid_n, gl.sum(yf * yf, axis=0))


class Config(NamedTuple):
    wb: int  # int32 words a thread reads of each row: tiles of 256 wb columns, steps of 64 / wb rows
    split: int  # programs along K (K ranges of whole scale groups, at most 8 of them)


def default_config(K: int, sizes, group: int, n_sm: int) -> Optional[Config]:
    """Launch config of a batch-1 int4 projection on tensor cores, or None where this kernel does not take the
    shape (segments of whole 256-column tiles, groups of 32, 64 or 128): 512-column tiles where the segments allow,
    about three programs per SM."""
    wb = next((b for b in (2, 1) if all(s % tile_n(b) == 0 for s in sizes)), None)
    if wb is None or group not in (32, 64, 128) or K % group:
        return None
    tiles = sum(sizes) // tile_n(wb)
    groups = K // group
    split = max(triton.cdiv(groups, 8), min(round(3 * n_sm / tiles), groups))
    return Config(wb, split)


def launch(x: Tensor, w: Tensor, t: Tensor, sizes, config: Config, scale: Tensor, norm_weight: Optional[Tensor] = None,
           ss_in: Optional[Tensor] = None, eps: float = 1e-5, wrap=direct, residual: Optional[Tensor] = None,
           counters: Optional[Tensor] = None):
    """gluon_gemv.launch for weights in mma_order: x [1, K] 16-bit (RMS-normalised with norm_weight and ss_in; or
    gate/up's partials [P, 2, 1, K] float32 with a residual, the input then silu(gate) * up), w [K, N/8]
    (to_mma_layout(., config.wb)) -> partials [P, N] float32 summing to sparsify(x) @ W; with a residual [1, N] (and
    counters [>= tiles] int32, zero, left zero): (residual + sparsify(x) @ W in the residual's dtype, its per-tile
    sums of squares [1, tiles] float32)."""
    K, N = w.shape[0], w.shape[1] * 8
    wb, split = config
    tn, bk = tile_n(wb), 64 // wb
    group = INT4.group_of(w, scale)
    x_parts = check_inputs(x, w, t, sizes, scale, norm_weight, ss_in, residual)
    assert all(s % tn == 0 for s in sizes) and group in (32, 64, 128)
    k_split = triton.cdiv(triton.cdiv(K, split), group) * group
    split = triton.cdiv(K, k_split)
    assert k_split <= 8 * group
    tiles = [s // tn for s in sizes]
    n_tiles = sum(tiles)
    ends = (list(accumulate(tiles)) + [n_tiles] * 2)[:2]
    out, ws, ss_out, counters = outputs(x, t, N, split, n_tiles, residual, counters)
    scratch = x.new_empty((n_tiles * split * (k_split + 2 * bk),), dtype=torch.int32)
    xs = x.new_empty((n_tiles * split * 8,), dtype=torch.float32)
    n_ss = ss_in.shape[1] if ss_in is not None else 1
    xdt = residual.dtype if x_parts else x.dtype
    asm, offset = (ASM_BF16, 128.0) if xdt == torch.bfloat16 else (ASM_FP16, 1024.0)
    wrap(_mma_kernel)[(n_tiles, split)](
        x, t, w, scale, norm_weight if norm_weight is not None else t, ss_in if ss_in is not None else t, out,
        scratch, xs, residual if residual is not None else out, ws, counters, ss_out,
        K, N, K // group, k_split, ends[0], ends[1], n_ss,
        GS=group, NORM=norm_weight is not None, SS_BLOCK=triton.next_power_of_2(n_ss), EPS=eps, X_PARTS=x_parts,
        ASM=asm, OFFSET=offset, WB=wb, RESIDUAL=residual is not None, num_warps=WARPS)
    return out if residual is None else (out, ss_out)


# gluon_gemv's two ops on tensor cores, weights w in to_mma_layout(., config.wb)
OPS = int4_ops("int4_mma", launch, Config)
int4_parts, int4_residual = OPS.parts, OPS.residual
