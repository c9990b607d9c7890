"""Batch-1 input-sparse GEMV of 16-bit or int8 weights in CUDA C++, compiled at run time with NVRTC (the libnvrtc of
the CUDA wheels torch depends on; no nvcc) and launched through the driver API: what Triton and Gluon cannot express,
the kept-row list built and kept in shared memory and split-K partials summed through a thread-block cluster's shared
memory on sm_90. The plan (plan.py, `nvrtc_arch`, `nvrtc_sparse`, `nvrtc_int8`) runs batch-1 decode steps on it on
sm_90: dense and sparse, 16-bit and int8 weights; int4 weights (INT4: `nvrtc_int4`, off by default, slower than the
Gluon kernels so far: docs/perf-notes.md, session 44) stream on tensor cores, one mma.sync per column pair of 16
kept rows, each scale group's sums kept apart in D's eight columns and scaled once per CTA.

y = f(x) · W with W [K, N] input-channel-major (the sparse linears' storage). One launch, 128 threads per CTA, grid
(N / 64 column tiles, SPLIT K ranges; int8 weights in 128-column tiles where the segments allow: `tile_cols`). Each
CTA:
1. prologue, its loads issued together (norm weights and thresholds before a PDL wait, then the inputs): its K
   range's inputs (RMS-normalised when NORM, from a sum of squares over all K it takes itself;
   silu(gate) * up of gate/up's outputs when GLU_IN), and with SPARSE keeps those with |x_i| > t_i of its column
   tile's segment (q, k, v: one threshold row each), compacted into a list in shared memory by one block-wide scan;
   dense launches stream every row, their first rows' loads issued before the prologue (they depend on nothing);
2. streams the kept rows' columns, 16 bytes per thread (8 threads a row; int8's column scales scale the sums),
   ROWS rows in flight per thread, double-buffered;
3. sums the row groups through shared memory, then the K ranges: through rank 0's shared memory of a cluster
   (CLUSTER, sm_90), or a per-tile counter whose last CTA sums the partials in a fixed order (deterministic, counter
   left at zero); SPLIT 1 writes directly. The epilogue rounds to the weights' dtype and adds the residual.
Rounding follows kernels/reference.py (`cuda_gemv_ref`). Shapes: N and each segment multiples of 64, K of 8.
"""
import ctypes
from functools import cache
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.library import custom_op

from errors import UserError
from kernels import nvrtc, reference
from kernels.common import PROFILE_SLOTS
from kernels.formats import FLOAT, INT4, INT8, QuantFormat

COLS = 64  # output columns per CTA
THREADS = 128
MAX_KPER = 4096  # inputs per K range: its list and values live in shared memory
INT4_COLS = 256  # output columns per CTA of int4 weights

HELPERS = r"""
#define CPT (INT4 ? 32 : INT8 ? 16 : 8)  // columns per thread: one 16-byte load (of the item's INT8 at each use)
#define TPR (TILE / CPT)                // threads per row of the tile's columns
#define RG (INT4 ? THREADS / 32 : THREADS / TPR)  // row groups (int4: the warps, each over the whole tile)
#define CPTH ((TILE + THREADS - 1) / THREADS)  // output columns per thread in the tail
#define ROUNDS ((KPER + 8 * THREADS - 1) / (8 * THREADS))  // prologue rounds of 8 inputs per thread
#define NROUNDS ((K + 8 * THREADS - 1) / (8 * THREADS))   // ... over the whole input (its norm)

// what an earlier launch wrote: under PDL that launch may still run beside this one, which breaks the read-only
// path's contract (ld.global.nc: unchanged while the kernel runs), so such loads go through L2
#define PDL_WAIT (PDL == 1 || PDL == 2)  // launched under PDL (3, 4: plainly, only triggering the next launch)
#define ld_in(p) (PDL_WAIT ? ld16cg(p) : ld16(p))

// int4 (INT4) on tensor cores: a lane's e-th entry of a 16-entry step (mma.sync's A and B fragments take entries 2t,
// 2t + 1, 2t + 8, 2t + 9 from thread t of a group of four), the local scale groups of a K range, the widening
// offset (a nibble q in a 16-bit float's low mantissa bits: 1024 + q in float16, 128 + q in bfloat16)
#define ENT(e) (2 * t4 + ((e) & 1) + ((e) >> 1) * 8)
#define NGM (KPER / GROUP)
#define SROUNDS ((2 * NGM * TILE / 8 + THREADS - 1) / THREADS)
#define OFF (FP16 ? 1024.f : 128.f)
#define OFF2 (FP16 ? 0x64006400u : 0x43004300u)
__device__ __forceinline__ u32 word(uint4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float h2f(u16 h) {  // float16 (the int4 scales' dtype, whatever the activations')
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if FP16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
"""

# one work item of the GEMV: a column tile over a K range, specialised by the #defines before it
ITEM = r"""
__device__ __forceinline__ bool ITEM_NAME(  // column tile `tile` over K range `split`; true in the CTA that finished it
        const int tile, const int split,
        const void* __restrict__ w,   // [K, N] weights (16-bit, int8 with INT8; INT4: [K, N / 8] words of eight
                                      // nibbles, column 8c + i in bits 4i..4i+3), each input's row contiguous
        const u16* __restrict__ x,    // [K] input ([2, K]: gate/up outputs with GLU_IN)
        const void* __restrict__ thr,  // [segments, K] thresholds (SPARSE): float32 with THR32, else 16-bit
        const u16* __restrict__ nw,   // [K] RMSNorm weight (NORM)
        const u16* __restrict__ res,  // [N] residual (RES)
        u16* __restrict__ y,          // [N]
        float* __restrict__ part,     // [SPLIT, N] partial sums (counter tail)
        u32* __restrict__ counter,    // [N / 64] zero between launches (counter tail)
        const void* __restrict__ scale,  // INT8: [N] float32 column scales, applied to the sums; INT4: [2, K /
                                         // GROUP, N] float16 scale and offset per group and column (the fold)
        long long* __restrict__ rec) {  // this item's profile record (PROFILE; scripts/profile_phases.py --nvrtc)
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, ct = tid % TPR, rg = tid / TPR;
    const int k0 = split * KPER, kn = min(KPER, K - k0);
#if INT4
    const int g8 = lane >> 2, t4 = lane & 3;  // the mma's group (A rows, B column) and thread in it
    const u32* wp = (const u32*)w + (size_t)k0 * (N / 8) + (tile * TILE + 32 * g8) / 8;
#elif INT8
    const signed char* wp = (const signed char*)w + (size_t)k0 * N + tile * TILE + ct * CPT;
#else
    const u16* wp = (const u16*)w + (size_t)k0 * N + tile * TILE + ct * CPT;
#endif
    __shared__ float xs[KPER];      // the range's inputs: by row (dense), in list order (SPARSE)
    __shared__ float red[RG][TILE];
    __shared__ float wsum[THREADS / 32];
    __shared__ int nkept;
#if SPARSE
    __shared__ short ks[KPER];      // kept rows, offsets within the range
#endif
#if INT4
    __shared__ __align__(16) u16 sq[2][NGM][TILE];  // the range's scales and offsets (float16), by local group
    __shared__ float csum[KPER / 8];  // kept inputs summed by 8 inputs (sxs: by group)
    __shared__ float sxs[NGM];
#endif
#if PDL == 1 || PDL == 3
    // programmatic dependent launch: the next launch may be scheduled now; it waits for this one to finish before
    // reading what it writes (griddepcontrol.wait below), as this one waits for its predecessor
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#if INT4
    uint4 v[ROWS][4];  // steps in flight: entries 2t, 2t + 1, 2t + 8, 2t + 9 of each
#if !SPARSE
    #pragma unroll
    for (int i = 0; i < ROWS; i++) {
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = (warp + RG * i) * 16 + ENT(e);
            v[i][e] = r < kn ? ld_stream(wp + (size_t)r * (N / 8)) : make_uint4(0, 0, 0, 0);
        }
    }
#endif
    // the range's scales (independent of the previous launch): 16 bytes a load, to shared memory after the wait
    uint4 sr[SROUNDS];
    const int ng = (kn + GROUP - 1) / GROUP;
    #pragma unroll
    for (int rd = 0; rd < SROUNDS; rd++) {
        const int f = (rd * THREADS + tid) * 8, part = f / (NGM * TILE), gl = f % (NGM * TILE) / TILE;
        const size_t at = ((size_t)part * (K / GROUP) + k0 / GROUP + gl) * N + tile * TILE + f % TILE;
        sr[rd] = part < 2 && gl < ng ? ld16((const u16*)scale + at) : make_uint4(0, 0, 0, 0);
    }
#else
    uint4 v[ROWS];
#if !SPARSE
    #pragma unroll
    for (int i = 0; i < ROWS; i++) {
        const int r = rg + RG * i;
        v[i] = r < kn ? ld_stream(wp + (size_t)r * N) : make_uint4(0, 0, 0, 0);
    }
#endif
#endif
    // 1. prologue: its loads in flight together (norm weights and thresholds do not depend on the previous
    // launch, so they go before the dependency wait; then the inputs), then the arithmetic
#if NORM
    uint4 nwr[ROUNDS];
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        const int e = rd * 8 * THREADS + tid * 8;
        nwr[rd] = e < kn ? ld16(nw + k0 + e) : make_uint4(0, 0, 0, 0);
    }
#endif
#if SPARSE
    const int col0 = tile * TILE;
    const size_t t0 = (size_t)(col0 >= SEG2 ? 2 : col0 >= SEG1 ? 1 : 0) * K + k0;
#if THR32
    float4 ta[ROUNDS], tb[ROUNDS];
#else
    uint4 tr[ROUNDS];
#endif
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        const int e = rd * 8 * THREADS + tid * 8;
#if THR32
        const float* tf = (const float*)thr + t0 + e;
        ta[rd] = e < kn ? *(const float4*)tf : make_float4(0.f, 0.f, 0.f, 0.f);
        tb[rd] = e < kn ? *(const float4*)(tf + 4) : make_float4(0.f, 0.f, 0.f, 0.f);
#else
        tr[rd] = e < kn ? ld16((const u16*)thr + t0 + e) : make_uint4(0, 0, 0, 0);
#endif
    }
#endif
#if PDL_WAIT
    asm volatile("griddepcontrol.wait;" ::: "memory");  // inputs written by the previous launch: visible from here
#endif
#if GLU_IN
    uint4 xg[ROUNDS], xu[ROUNDS];
#else
    uint4 xr[ROUNDS];
#endif
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        const int e = rd * 8 * THREADS + tid * 8;
#if GLU_IN
        xg[rd] = e < kn ? ld16cg(x + k0 + e) : make_uint4(0, 0, 0, 0);
        xu[rd] = e < kn ? ld16cg(x + K + k0 + e) : make_uint4(0, 0, 0, 0);
#else
        xr[rd] = e < kn ? ld_in(x + k0 + e) : make_uint4(0, 0, 0, 0);
#endif
    }
#if NORM
    // the whole input's sum of squares (every K range needs it): the other ranges' inputs too
    uint4 xa[NROUNDS];
    #pragma unroll
    for (int m = 0; m < NROUNDS; m++) {
        const int i = m * 8 * THREADS + tid * 8;
        xa[m] = i < K ? ld_in(x + i) : make_uint4(0, 0, 0, 0);
    }
#endif
    // this thread's inputs e = rd * 8 * THREADS + tid * 8 + j of the range
    float in[ROUNDS][8];
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
#if GLU_IN
        float g[8], u[8];
        unpack(xg[rd], g);
        unpack(xu[rd], u);
        #pragma unroll
        for (int j = 0; j < 8; j++)  // an approximate divide: IEEE division took ~40% of this prologue (perf-notes)
            in[rd][j] = rnd(rnd(__fdividef(g[j], 1.f + __expf(-g[j]))) * u[j]);
#else
        unpack(xr[rd], in[rd]);
#endif
    }
#if NORM
    float ss = 0.f;
    #pragma unroll
    for (int m = 0; m < NROUNDS; m++) {
        float f[8];
        unpack(xa[m], f);
        #pragma unroll
        for (int j = 0; j < 8; j++) ss += f[j] * f[j];
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) wsum[warp] = ss;
    __syncthreads();
    ss = 0.f;
    #pragma unroll
    for (int i = 0; i < THREADS / 32; i++) ss += wsum[i];
    const float rstd = rsqrtf(ss / K + EPS);
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        float g[8];
        unpack(nwr[rd], g);
        #pragma unroll
        for (int j = 0; j < 8; j++) in[rd][j] = rnd(rnd(in[rd][j] * rstd) * g[j]);
    }
#endif
#if SPARSE
    u32 keep = 0;  // bit rd * 8 + j: input kept (ROUNDS <= 4)
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        const int e = rd * 8 * THREADS + tid * 8;
        if (e < kn) {
            float t[8];
#if THR32
            t[0] = ta[rd].x; t[1] = ta[rd].y; t[2] = ta[rd].z; t[3] = ta[rd].w;
            t[4] = tb[rd].x; t[5] = tb[rd].y; t[6] = tb[rd].z; t[7] = tb[rd].w;
#else
            unpack(tr[rd], t);
#endif
            #pragma unroll
            for (int j = 0; j < 8; j++) keep |= (u32)(fabsf(in[rd][j]) > t[j]) << (rd * 8 + j);
        }
    }
    const int cnt = __popc(keep);
    int inc = cnt;  // inclusive scan over the warp, then over the warps
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += t;
    }
    __syncthreads();  // wsum's earlier use is over
    if (lane == 31) wsum[warp] = __int_as_float(inc);
    __syncthreads();
    int pos = inc - cnt, total = 0;
    #pragma unroll
    for (int i = 0; i < THREADS / 32; i++) {
        const int n = __float_as_int(wsum[i]);
        pos += i < warp ? n : 0;
        total += n;
    }
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            if (keep >> (rd * 8 + j) & 1u) {
                ks[pos] = (short)(rd * 8 * THREADS + tid * 8 + j);
                xs[pos] = in[rd][j];
                pos++;
            }
        }
    }
    if (tid == 0) nkept = total;
#else
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {
        const int e = rd * 8 * THREADS + tid * 8;
        if (e < kn) {
            #pragma unroll
            for (int j = 0; j < 8; j++) xs[e + j] = in[rd][j];
        }
    }
    if (tid == 0) nkept = kn;
#endif
#if INT4
    #pragma unroll
    for (int rd = 0; rd < SROUNDS; rd++) {
        const int f = (rd * THREADS + tid) * 8;
        if (f < 2 * NGM * TILE) *(uint4*)(&sq[0][0][0] + f) = sr[rd];
    }
    #pragma unroll
    for (int rd = 0; rd < ROUNDS; rd++) {  // this thread's 8 inputs of each round: one group's (GROUP % 8 == 0)
        const int e = rd * 8 * THREADS + tid * 8;
        if (e < KPER) {
            float c = 0.f;
            #pragma unroll
            for (int j = 0; j < 8; j++)
#if SPARSE
                c += keep >> (rd * 8 + j) & 1u ? in[rd][j] : 0.f;
#else
                c += in[rd][j];
#endif
            csum[e / 8] = c;
        }
    }
#endif
    __syncthreads();
    const int n = nkept;
#if INT4
    if (tid < NGM) {  // each group's sum of kept inputs, in a fixed order (the offsets' share of the fold)
        float c = 0.f;
        for (int i = 0; i < GROUP / 8; i++) c += csum[tid * (GROUP / 8) + i];
        sxs[tid] = c;
    }
#endif
#if PROFILE
    if (tid == 0) {  // slots 2-3: the kept list ready (end of the prologue); 12: its length
        stamp(rec, 2);
        rec[12] = n;
    }
#endif
#if INT4
    // 2. the stream on tensor cores: a warp takes steps of 16 entries (kept rows) over the whole tile, lane (g, t)
    // loading 16 bytes (columns 32g..32g+31) of entries 2t, 2t+1, 2t+8, 2t+9. One mma.sync m16n8k16 a column pair:
    // A's rows g and g + 8 the pair's nibbles widened to OFF + q (exact in 16 bits), B's column g the entries'
    // inputs where the entry's scale group is g, zero elsewhere, so D [column][group] keeps each group's sum apart
    // and the scales apply once per CTA (the fold below); ROWS steps in flight per warp
    const int nsteps = (n + 15) >> 4;
    float acc[16][4];
    #pragma unroll
    for (int j = 0; j < 16; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#if SPARSE
    #pragma unroll
    for (int i = 0; i < ROWS; i++) {
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            const int j = (warp + RG * i) * 16 + ENT(e);
            v[i][e] = j < n ? ld_stream(wp + (size_t)ks[j] * (N / 8)) : make_uint4(0, 0, 0, 0);
        }
    }
#endif
    // a ring: each step's registers take the step ROWS ahead right after its mmas read them (no second register
    // set: 122 registers a thread at 2 steps against 151; up to 3 us faster a launch on an H100, gate/up dense 1.5
    // us slower, session 46)
    // OFF2 in a register ptxas cannot fold (n >= 0): `p & mask | off2` is then one LOP3 (a LOP3 takes one
    // immediate; with both as immediates it is two), 64 instructions fewer a step (session 50)
    const u32 off2 = OFF2 | (u32)(n >> 31);
    for (int s0 = warp; s0 < nsteps; s0 += RG * ROWS) {
        #pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const int s1 = s0 + RG * i;
            if (s1 < nsteps) {  // (the warp's steps: uniform)
                u32 b[2];
                #pragma unroll
                for (int h = 0; h < 2; h++) {
                    u32 half[2];
                    #pragma unroll
                    for (int q = 0; q < 2; q++) {
                        const int j = s1 * 16 + ENT(2 * h + q);
#if SPARSE
                        const int r = j < n ? ks[j] : -GROUP;
#else
                        const int r = j < n ? j : -GROUP;
#endif
                        half[q] = r >= 0 && r / GROUP == g8 ? (u32)to_h(xs[j]) : 0u;
                    }
                    b[h] = half[0] | half[1] << 16;
                }
                #pragma unroll
                for (int c = 0; c < 16; c++) {  // columns 2c, 2c + 1: byte c % 4 of word c / 4
                    const u32 sel = (c & 3) * 0x11u + (4 + (c & 3)) * 0x1100u;
                    const u32 p01 = __byte_perm(word(v[i][0], c >> 2), word(v[i][1], c >> 2), sel);
                    const u32 p23 = __byte_perm(word(v[i][2], c >> 2), word(v[i][3], c >> 2), sel);
                    mma16816(acc[c], (p01 & 0x000F000Fu) | off2, (p01 >> 4 & 0x000F000Fu) | off2,
                             (p23 & 0x000F000Fu) | off2, (p23 >> 4 & 0x000F000Fu) | off2, b[0], b[1]);
                }
            }
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = (s1 + RG * ROWS) * 16 + ENT(e);
#if SPARSE
                v[i][e] = j < n ? ld_stream(wp + (size_t)ks[j] * (N / 8)) : make_uint4(0, 0, 0, 0);
#else
                v[i][e] = j < n ? ld_stream(wp + (size_t)j * (N / 8)) : make_uint4(0, 0, 0, 0);
#endif
            }
        }
    }
    // the fold: y_c = sum over groups of s (D - OFF sx) + m sx, lane (g, t) holding groups 2t, 2t + 1 of its 32
    // columns; then summed over t by halves (each lane ends with 8 columns), the warps through shared memory
    __syncthreads();  // sxs
    // (the offsets' terms once per CTA: in warp 0's share; the other warps add s D alone)
    const float sa = warp == 0 && 2 * t4 < ng ? sxs[2 * t4] : 0.f;
    const float sb = warp == 0 && 2 * t4 + 1 < ng ? sxs[2 * t4 + 1] : 0.f;
    float val[32];
    #pragma unroll
    for (int c = 0; c < 32; c++) {
        const int col = 32 * g8 + c;
        const float* d = acc[c / 2] + 2 * (c & 1);
        float o = 0.f;
        if (2 * t4 < ng)
            o += h2f(sq[0][2 * t4][col]) * (d[0] - OFF * sa) + h2f(sq[1][2 * t4][col]) * sa;
        if (2 * t4 + 1 < ng)
            o += h2f(sq[0][2 * t4 + 1][col]) * (d[1] - OFF * sb) + h2f(sq[1][2 * t4 + 1][col]) * sb;
        val[c] = o;
    }
    #pragma unroll
    for (int c = 0; c < 16; c++) {  // lanes with t & 2 keep columns 16..31
        const float give = t4 & 2 ? val[c] : val[16 + c];
        val[c] = (t4 & 2 ? val[16 + c] : val[c]) + __shfl_xor_sync(0xffffffffu, give, 2);
    }
    #pragma unroll
    for (int c = 0; c < 8; c++) {  // ... and with t & 1 the upper 8 of those: columns 8t..8t+7
        const float give = t4 & 1 ? val[c] : val[8 + c];
        val[c] = (t4 & 1 ? val[8 + c] : val[c]) + __shfl_xor_sync(0xffffffffu, give, 1);
    }
    #pragma unroll
    for (int c = 0; c < 8; c++) red[warp][32 * g8 + 8 * t4 + c] = val[c];
#else
    float acc[CPT];
    #pragma unroll
    for (int j = 0; j < CPT; j++) acc[j] = 0.f;
    // 2. the stream: entry j of the range (a kept row with SPARSE), ROWS in flight, the next ROWS issued before
    // the current ones are used
#if SPARSE
    #pragma unroll
    for (int i = 0; i < ROWS; i++) {
        const int j = rg + RG * i;
        v[i] = j < n ? ld_stream(wp + (size_t)ks[j] * N) : make_uint4(0, 0, 0, 0);
    }
#endif
    for (int j0 = rg; j0 < n; j0 += RG * ROWS) {
        uint4 nv[ROWS];
        #pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const int j = j0 + RG * (ROWS + i);
#if SPARSE
            nv[i] = j < n ? ld_stream(wp + (size_t)ks[j] * N) : make_uint4(0, 0, 0, 0);
#else
            nv[i] = j < n ? ld_stream(wp + (size_t)j * N) : make_uint4(0, 0, 0, 0);
#endif
        }
        #pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const int j = j0 + RG * i;
            const float xv = j < n ? xs[j] : 0.f;
            float f[CPT];
#if INT8
            unpack_int8(v[i], f);
#else
            unpack(v[i], f);
#endif
            #pragma unroll
            for (int c = 0; c < CPT; c++) acc[c] += xv * f[c];
            v[i] = nv[i];
        }
    }
    // 3. row groups, then K ranges
    #pragma unroll
    for (int c = 0; c < CPT; c++) red[rg][ct * CPT + c] = acc[c];
#endif
    __syncthreads();
#if PDL == 2 || PDL == 4
    // the late trigger: the next launch's CTAs take only the slots of CTAs whose rows are streamed
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#if PROFILE
    if (tid == 0) stamp(rec, 6);  // slots 6-7: every row streamed
#endif
    float s[CPTH];  // this thread's columns c = tid + THREADS q of the tile
    #pragma unroll
    for (int q = 0; q < CPTH; q++) {
        const int c = tid + THREADS * q;
        s[q] = 0.f;
        if (c < TILE) {
            #pragma unroll
            for (int i = 0; i < RG; i++) s[q] += red[i][c];
        }
    }
#if SPLIT == 1
    const bool fin = true;
#elif CLUSTER
    __shared__ float cl[SPLIT][TILE];
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    #pragma unroll
    for (int q = 0; q < CPTH; q++) {
        const int c = tid + THREADS * q;
        if (c < TILE) {
            const u32 local = (u32)__cvta_generic_to_shared(&cl[rank][c]);
            u32 remote;
            asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(0));
            asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(s[q]) : "memory");
        }
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    const bool fin = rank == 0;
    if (fin) {
        #pragma unroll
        for (int q = 0; q < CPTH; q++) {
            const int c = tid + THREADS * q;
            if (c < TILE) {
                s[q] = 0.f;
                #pragma unroll
                for (int i = 0; i < SPLIT; i++) s[q] += cl[i][c];
            }
        }
    }
#else
    __shared__ int last;
    #pragma unroll
    for (int q = 0; q < CPTH; q++) {
        const int c = tid + THREADS * q;
        if (c < TILE) part[(size_t)split * N + tile * TILE + c] = s[q];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counter + tile, 1u) == SPLIT - 1;
    __syncthreads();
    const bool fin = last;
    if (fin) {
        __threadfence();
        #pragma unroll
        for (int q = 0; q < CPTH; q++) {
            const int c = tid + THREADS * q;
            if (c < TILE) {
                s[q] = 0.f;
                #pragma unroll
                for (int i = 0; i < SPLIT; i++) s[q] += __ldcg(part + (size_t)i * N + tile * TILE + c);
            }
        }
        if (tid == 0) counter[tile] = 0;
    }
#endif
    if (fin) {
        #pragma unroll
        for (int q = 0; q < CPTH; q++) {
            const int c = tid + THREADS * q, col = tile * TILE + c;
            if (c < TILE) {
#if INT8
                s[q] *= ((const float*)scale)[col];
#endif
                float o = rnd(s[q]);
#if RES
                o = to_f(PDL_WAIT ? __ldcg(res + col) : res[col]) + o;
#endif
                y[col] = to_h(o);
            }
        }
    }
    return fin;
}
"""

KERNEL = r"""
extern "C" __global__ void __launch_bounds__(THREADS) CLUSTER_ATTR gemv16(
        const void* __restrict__ w, const u16* __restrict__ x, const void* __restrict__ thr,
        const u16* __restrict__ nw, const u16* __restrict__ res, u16* __restrict__ y,
        float* __restrict__ part, u32* __restrict__ counter, const void* __restrict__ scale,
        long long* __restrict__ prof) {  // [>= grid, PROF_SLOTS] (PROFILE_ON): each CTA's stamps, in CTA order
#if PROFILE_ON
    long long* rec = prof + PROF_SLOTS * (blockIdx.y * gridDim.x + blockIdx.x);
    if (threadIdx.x == 0) stamp(rec, 0);  // slots 0-1: start
#else
    long long* rec = nullptr;
#endif
    gemv_item(blockIdx.x, blockIdx.y, w, x, thr, nw, res, y, part, counter, scale, rec);
#if PROFILE_ON
    __syncthreads();
    if (threadIdx.x == 0) {  // slots 10-11: result written (the K-range tail done); 13: the SM
        u32 sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        stamp(rec, 10);
        rec[13] = sm;
    }
#endif
}
"""


class Config(NamedTuple):
    split: int  # CTAs along K per column tile
    rows: int  # weight rows in flight per thread
    cluster: int  # 1: K ranges summed through the cluster's shared memory (sm_90); 0: a counter
    # programmatic dependent launch (sm_90): scheduled during the previous launch, waits for its data; the next one
    # triggered at the start (1) or once the rows are streamed (2). Off: 1 loses 8-12% end to end on an H100, 2 gains
    # 0.8% there at 50% and is not yet checked on whole models (docs/perf-notes.md, sessions 32-34, 39); 3 and 4:
    # launched plainly, the next launch triggered at the start (3) or once the rows are streamed (4): for a consumer
    # with work of its own before it needs this launch's output (the attention's cache reads: session 41)
    pdl: int = 0


class Spec(NamedTuple):
    """What one compiled kernel is specialised on (everything but the tensors)."""
    K: int
    N: int
    seg1: int  # first column of segment 1 (N when there is one segment)
    seg2: int
    fp16: bool
    sparse: bool
    norm: bool
    glu_in: bool
    residual: bool
    eps: float
    config: Config
    thr32: bool = False  # float32 thresholds (the model's buffers), else in the activations' dtype
    int8: bool = False  # int8 weights with float32 column scales (kernels/formats.py INT8), else 16-bit
    profile: bool = False  # each CTA stamps its phases (launch's `prof`; scripts/profile_phases.py --nvrtc)
    cols: int = COLS  # output columns per CTA (tile_cols)
    group: int = 0  # int4 weights (kernels/formats.py INT4) with scale groups of this many inputs; 0: not int4


def supported(K: int, sizes, dtype: torch.dtype, group: int = 0) -> bool:
    """Whether a projection of this shape and activation dtype runs here: 16-bit activations (and weights, or int8
    ones), segments of whole 64-column tiles (at most three), K a multiple of 8; int4 weights in scale groups of
    `group` inputs (32, 64 or 128, dividing K): segments of whole 256-column tiles."""
    cols = INT4_COLS if group else COLS
    return (dtype in (torch.bfloat16, torch.float16) and len(sizes) <= 3 and all(s % cols == 0 for s in sizes)
            and K % 8 == 0 and (not group or group in (32, 64, 128) and K % group == 0))


def tile_cols(sizes, int8: bool, group: int = 0) -> int:
    """Output columns per CTA: 256 for int4 weights (a warp's step covers them: 128 bytes of a row, 16 rows); 128
    for int8 weights where every segment holds whole 128-column tiles (a kept row's piece is then 128 bytes, as a
    16-bit row's in 64 columns), else 64."""
    if group:
        return INT4_COLS
    return 2 * COLS if int8 and all(s % (2 * COLS) == 0 for s in sizes) else COLS


def int4_config(K: int, sizes, n_sm: int, major: int, group: int) -> Config:
    """int4 weights' launch config: the fewest K ranges that put >= 2.5 CTAs per SM, with at most 8 scale groups a
    range (D's eight columns), 2 steps of 16 rows in flight per warp (3 or 4: slower on every launch, session 46),
    summed through a cluster on sm_90 where 4 or fewer (clusters of 8 leave CTAs waiting for a slot: Llama-2-7B
    q/k/v 26.3 / 22.5 µs at 0 / 50% against 20.2 / 18.0 through the counter on an H100; gate/up's clusters of 4
    gain 1 µs, session 44); the split then trimmed to the ranges its K range size needs (no empty range)."""
    tiles = sum(sizes) // INT4_COLS
    split = max(-(-K // (8 * group)), 1)
    while tiles * split < 2.5 * n_sm and k_per(K, split * 2, group) >= group and split * 2 <= K // group:
        split *= 2
    split = -(-K // k_per(K, split, group))
    return Config(split, 2, int(major >= 9 and 1 < split <= 4))


def default_config(K: int, sizes, n_sm: int, major: int, int8: bool = False, group: int = 0) -> Config:
    """The launch config of a projection of K inputs into segments `sizes` (int8: int8 weights, in tile_cols' tiles).
    Wide projections (>= 2.5 column tiles per SM: gate/up) two K ranges, 4 rows in flight per thread, counter
    tail; the others the fewest K ranges that put >= 2.5 CTAs per SM, 8 rows, K ranges summed through a cluster on
    sm_90; more ranges where one would not fit shared memory. From sweeps (docs/perf-notes.md, session 32): on an
    H100, Llama-2-7B q/k/v 2 x 8 cluster, o and down 8 x 8 cluster, gate/up 2 x 4, within 0.5 us of the best at 40
    and 50% (gate/up dense 0.9 us above it); on an H200, Llama-3-8B, the same rule within 1.0 us of the best at 0,
    40 and 50% (one K range with 16 rows: 11.4 us slower on gate/up dense). int4 (group): int4_config."""
    if group:
        return int4_config(K, sizes, n_sm, major, group)
    cols = tile_cols(sizes, int8)
    tiles = sum(sizes) // cols
    if tiles >= 2.5 * n_sm:  # wide (gate/up): two K ranges, 4 rows in flight, counter tail
        split, rows, cluster = 2, 4, 0
    else:
        # (16 K ranges for 128-column tiles alone, few enough to need them; a portable cluster holds 8)
        splits = (2, 4, 8, 16) if cols > COLS else (2, 4, 8)
        split, rows = next((s for s in splits if tiles * s >= 2.5 * n_sm), splits[-1]), 8
        cluster = int(major >= 9 and split <= 8)
    while -(-K // split) > MAX_KPER:
        split *= 2
    return Config(split, rows, cluster)


def k_per(K: int, split: int, group: int = 0) -> int:
    """Inputs per K range: a multiple of 8 (16-byte loads), of int4's scale group where there is one."""
    unit = group or 8
    return -(-K // (unit * split)) * unit


def item_source(spec: Spec, name: str) -> str:
    """The GEMV's work item specialised on `spec` as the device function `name` (its #defines undone after it)."""
    cfg = spec.config
    if cfg.cluster and cfg.split == 1:
        raise UserError("a cluster tail needs a split of 2 or more")
    kper = k_per(spec.K, cfg.split, spec.group)
    if kper > MAX_KPER:
        raise UserError(f"a K range of {kper} inputs exceeds {MAX_KPER}: split K further")
    if spec.group and kper > 8 * spec.group:
        raise UserError(f"an int4 K range holds at most 8 scale groups ({8 * spec.group} inputs): split K further")
    defines = dict(K=spec.K, N=spec.N, SEG1=spec.seg1, SEG2=spec.seg2, KPER=kper, SPLIT=cfg.split, ROWS=cfg.rows,
                   CLUSTER=cfg.cluster, SPARSE=int(spec.sparse), NORM=int(spec.norm), GLU_IN=int(spec.glu_in),
                   RES=int(spec.residual), EPS=f"{spec.eps!r}f", THR32=int(spec.thr32), PDL=cfg.pdl, TILE=spec.cols,
                   INT8=int(spec.int8), INT4=int(spec.group > 0), GROUP=spec.group, PROFILE=int(spec.profile))
    return ("".join(f"#define {k} {v}\n" for k, v in defines.items()) + ITEM.replace("ITEM_NAME", name)
            + "".join(f"#undef {k}\n" for k in defines))


def kernel_source(spec: Spec) -> str:
    """The standalone launch of one projection: grid (N / 64, split)."""
    attr = f"__cluster_dims__(1, {spec.config.split}, 1)" if spec.config.cluster else ""
    return (f"#define THREADS {THREADS}\n#define FP16 {int(spec.fp16)}\n#define PROF_SLOTS {PROFILE_SLOTS}\n"
            + nvrtc.HELPERS + HELPERS
            + item_source(spec, "gemv_item")
            + KERNEL.replace("CLUSTER_ATTR", attr).replace("PROFILE_ON", str(int(spec.profile))))


@cache
def usable(device: int) -> bool:
    """Whether these kernels compile and load on a CUDA device (libnvrtc found, its cubin taken by the driver): the
    default plan keeps cuBLAS where not, rather than failing at the first step."""
    if not nvrtc.available():
        return False
    major = torch.cuda.get_device_capability(device)[0]
    spec = spec_of(64, (64,), torch.bfloat16, True, True, False, True, 1e-5, default_config(64, (64,), 1, major))
    try:
        _function(spec, device)
    except (UserError, OSError):
        return False
    return True


@cache
def _function(spec: Spec, device: int) -> ctypes.c_void_p:
    """The loaded kernel of `spec` on a device, once per process."""
    return nvrtc.function(kernel_source(spec), "gemv16", device)


def spec_of(K: int, sizes, dtype: torch.dtype, sparse: bool, norm: bool, glu_in: bool, residual: bool, eps: float,
            config: Config, thr32: bool = False, int8: bool = False, profile: bool = False, group: int = 0) -> Spec:
    """dtype: the activations' (and 16-bit weights'); group: int4 weights' scale group (0: not int4)."""
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    N = ends[-1]
    return Spec(K, N, ends[0] if len(ends) > 1 else N, ends[1] if len(ends) > 2 else N, dtype == torch.float16,
                sparse, norm, glu_in, residual, float(eps), config, thr32, int8, profile, tile_cols(sizes, int8, group),
                group)


def launch(spec: Spec, x: Tensor, w: Tensor, t: Optional[Tensor], nw: Optional[Tensor], residual: Optional[Tensor],
           counters: Tensor, y: Tensor, part: Tensor, scale: Optional[Tensor] = None, prof: Optional[Tensor] = None):
    """One launch into y [N] on the current stream (every tensor contiguous, on one device; scale: int8's or int4's; prof:
    int64 [>= grid(spec), PROFILE_SLOTS] where spec.profile, each CTA's stamps in the layout of
    kernels/common.py's profile buffers: (global timer, clock) at slots 0 start, 2 kept list ready, 6 rows
    streamed, 10 result written; 12 the kept rows, 13 the SM)."""
    assert spec.profile == (prof is not None)
    assert prof is None or (prof.shape[0] >= grid(spec) and prof.shape[1] == PROFILE_SLOTS and prof.is_contiguous())
    args = [ctypes.c_void_p(a.data_ptr() if a is not None else 0)
            for a in (w, x, t, nw, residual, y, part, counters, scale, prof)]
    nvrtc.launch(_function(spec, x.device.index), launch_config(spec, nvrtc.stream_of(x.device)), args,
                 x.device.index)


def grid(spec: Spec) -> int:
    """CTAs of a launch: one per (column tile, K range)."""
    return spec.N // spec.cols * spec.config.split


def launch_config(spec: Spec, stream: ctypes.c_void_p) -> nvrtc.LaunchConfig:
    """The driver's CUlaunchConfig of a launch: its grid, and the PDL attribute where spec's config asks for it."""
    return nvrtc.launch_config((spec.N // spec.cols, spec.config.split), THREADS, stream, spec.config.pdl in (1, 2))


def _run(x: Tensor, w: Tensor, t: Optional[Tensor], norm_weight: Optional[Tensor], residual: Optional[Tensor],
         counters: Tensor, scale: Optional[Tensor], sizes: list[int], glu_in: bool, eps: float, split: int,
         rows: int, cluster: int, pdl: int) -> Tensor:
    K, N = w.shape[0], sum(sizes)
    spec = spec_of(K, sizes, x.dtype, t is not None, norm_weight is not None, glu_in, residual is not None, eps,
                   Config(split, rows, cluster, pdl), t is not None and t.dtype == torch.float32,
                   w.dtype == torch.int8, group=weight_format(w, scale).group_of(w, scale))
    y = torch.empty(N, dtype=x.dtype, device=w.device)
    part = torch.empty(split if split > 1 and not cluster else 0, N, device=w.device)
    launch(spec, x, w, t, norm_weight, residual, counters, y, part, scale)
    return y


@custom_op("teal::cuda_gemv", mutates_args=("counters",))
def _cuda_gemv_op(x: Tensor, w: Tensor, t: Optional[Tensor], norm_weight: Optional[Tensor],
                  residual: Optional[Tensor], counters: Tensor, scale: Optional[Tensor], sizes: list[int],
                  glu_in: bool, eps: float, split: int, rows: int, cluster: int, pdl: int) -> Tensor:
    return _run(x, w, t, norm_weight, residual, counters, scale, sizes, glu_in, eps, split, rows, cluster, pdl)


@_cuda_gemv_op.register_fake
def _(x, w, t, norm_weight, residual, counters, scale, sizes, glu_in, eps, split, rows, cluster, pdl):
    return x.new_empty(sum(sizes))


@_cuda_gemv_op.register_kernel("cpu")
def _(x, w, t, norm_weight, residual, counters, scale, sizes, glu_in, eps, split, rows, cluster, pdl):
    # the reference: a plan with nvrtc_arch set routes a model on the CPU through it (tests of the routing)
    return cuda_gemv_ref(x, w, t, sizes, norm_weight, eps, residual, glu_in, scale)


def cuda_gemv(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, counters: Tensor, config: Config,
              norm_weight: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None,
              glu_in: bool = False, scale: Optional[Tensor] = None) -> Tensor:
    """y [N] = (residual +) sparsify(f(x)) @ w for one token: x [K] (or gate/up's outputs [2, K] with glu_in: f is
    silu(gate) * up), RMS-normalised with norm_weight; t [segments, K] thresholds, float32 or x's dtype (None:
    dense); counters [N / 64] int32 zeros (left at zero). w [K, N] in x's dtype (16-bit), int8 with its column
    scales `scale` [N] float32 (kernels/formats.py INT8), or int4 words [K, N / 8] with `scale` [2, K / group, N]
    float16 (INT4, in column order); norm_weight, residual in x's dtype."""
    K, N = w.shape[0], sum(sizes)
    fmt = weight_format(w, scale)
    fmt.check(w, scale)
    assert supported(K, sizes, x.dtype, fmt.group_of(w, scale)) and x.numel() == K * (2 if glu_in else 1)
    assert w.shape == fmt.stored_shape(K, N) and (fmt.quantized or w.dtype == x.dtype)
    assert all(a is None or (a.dtype == x.dtype and a.is_contiguous()) for a in (norm_weight, residual))
    assert t is None or (t.dtype in (x.dtype, torch.float32) and t.is_contiguous())
    return _cuda_gemv_op(x, w, t, norm_weight, residual, counters, scale, list(sizes), glu_in, float(eps), *config)


def cuda_gemv_ref(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, norm_weight: Optional[Tensor] = None,
                  eps: float = 1e-5, residual: Optional[Tensor] = None, glu_in: bool = False,
                  scale: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch reference of cuda_gemv (same arguments, no counters or config)."""
    if glu_in:
        x = reference.parts_ref(x.float().view(1, 2, 1, -1), True, x.dtype)[0]
    return reference.sparse_gemv_ref(x.view(1, -1), w, t, sizes, residual=None if residual is None
                                     else residual.view(1, -1), norm_weight=norm_weight, eps=eps,
                                     fmt=weight_format(w, scale), scale=scale)[0]


def weight_format(w: Tensor, scale: Optional[Tensor]) -> QuantFormat:
    """The kernels/formats.py format of weights as this kernel takes them: 16-bit (no scales), int8 or int4 words."""
    return FLOAT if scale is None else INT8 if w.dtype == torch.int8 else INT4
