"""Batch-1 input-sparse GEMV of 16-bit or int8 weights in CUDA C++, compiled at run time with NVRTC (the libnvrtc of
the CUDA wheels torch depends on; no nvcc) and launched through the driver API: what Triton and Gluon cannot express,
the kept-row list built and kept in shared memory and split-K partials summed through a thread-block cluster's shared
memory on sm_90. The plan (plan.py, `nvrtc_arch`, `nvrtc_sparse`, `nvrtc_int8`) runs batch-1 decode steps on it on
sm_90: dense and sparse, 16-bit and int8 weights.

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
from kernels.formats import FLOAT, INT8

COLS = 64  # output columns per CTA
THREADS = 128
MAX_KPER = 4096  # inputs per K range: its list and values live in shared memory

HELPERS = r"""
#define CPT (INT8 ? 16 : 8)             // columns per thread: one 16-byte load (of the item's INT8 at each use)
#define TPR (TILE / CPT)                // threads per row of the tile's columns
#define RG (THREADS / TPR)              // row groups
#define ROUNDS ((KPER + 8 * THREADS - 1) / (8 * THREADS))  // prologue rounds of 8 inputs per thread
#define NROUNDS ((K + 8 * THREADS - 1) / (8 * THREADS))   // ... over the whole input (its norm)

// what an earlier launch wrote: under PDL that launch may still run beside this one, which breaks the read-only
// path's contract (ld.global.nc: unchanged while the kernel runs), so such loads go through L2
#define PDL_WAIT (PDL == 1 || PDL == 2)  // launched under PDL (3, 4: plainly, only triggering the next launch)
#define ld_in(p) (PDL_WAIT ? ld16cg(p) : ld16(p))
"""

# one work item of the GEMV: a column tile over a K range, specialised by the #defines before it
ITEM = r"""
__device__ __forceinline__ bool ITEM_NAME(  // column tile `tile` over K range `split`; true in the CTA that finished it
        const int tile, const int split,
        const void* __restrict__ w,   // [K, N] weights (16-bit, or int8 with INT8), each input's row contiguous
        const u16* __restrict__ x,    // [K] input ([2, K]: gate/up outputs with GLU_IN)
        const void* __restrict__ thr,  // [segments, K] thresholds (SPARSE): float32 with THR32, else 16-bit
        const u16* __restrict__ nw,   // [K] RMSNorm weight (NORM)
        const u16* __restrict__ res,  // [N] residual (RES)
        u16* __restrict__ y,          // [N]
        float* __restrict__ part,     // [SPLIT, N] partial sums (counter tail)
        u32* __restrict__ counter,    // [N / 64] zero between launches (counter tail)
        const float* __restrict__ scale,  // [N] int8 weights' column scales, applied to the sums (INT8)
        long long* __restrict__ rec) {  // this item's profile record (PROFILE; scripts/profile_phases.py --nvrtc)
    const int tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, ct = tid % TPR, rg = tid / TPR;
    const int k0 = split * KPER, kn = min(KPER, K - k0);
#if INT8
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
#if PDL == 1 || PDL == 3
    // programmatic dependent launch: the next launch may be scheduled now; it waits for this one to finish before
    // reading what it writes (griddepcontrol.wait below), as this one waits for its predecessor
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    uint4 v[ROWS];
#if !SPARSE
    #pragma unroll
    for (int i = 0; i < ROWS; i++) {
        const int r = rg + RG * i;
        v[i] = r < kn ? ld_stream(wp + (size_t)r * N) : make_uint4(0, 0, 0, 0);
    }
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
    __syncthreads();
    const int n = nkept;
#if PROFILE
    if (tid == 0) {  // slots 2-3: the kept list ready (end of the prologue); 12: its length
        stamp(rec, 2);
        rec[12] = n;
    }
#endif
    // 2. the stream: entry j of the range (a kept row with SPARSE), ROWS in flight, the next ROWS issued before
    // the current ones are used
#if SPARSE
    #pragma unroll
    for (int i = 0; i < ROWS; i++) {
        const int j = rg + RG * i;
        v[i] = j < n ? ld_stream(wp + (size_t)ks[j] * N) : make_uint4(0, 0, 0, 0);
    }
#endif
    float acc[CPT];
    #pragma unroll
    for (int j = 0; j < CPT; j++) acc[j] = 0.f;
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
    __syncthreads();
#if PDL == 2 || PDL == 4
    // the late trigger: the next launch's CTAs take only the slots of CTAs whose rows are streamed
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#if PROFILE
    if (tid == 0) stamp(rec, 6);  // slots 6-7: every row streamed
#endif
    float s = 0.f;
    if (tid < TILE) {
        #pragma unroll
        for (int i = 0; i < RG; i++) s += red[i][tid];
    }
    const int col = tile * TILE + tid;
#if SPLIT == 1
    const bool fin = true;
    bool mine = tid < TILE;
#elif CLUSTER
    __shared__ float cl[SPLIT][TILE];
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    if (tid < TILE) {
        const u32 local = (u32)__cvta_generic_to_shared(&cl[rank][tid]);
        u32 remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(0));
        asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(s) : "memory");
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    const bool fin = rank == 0;
    bool mine = fin && tid < TILE;
    if (mine) {
        s = 0.f;
        #pragma unroll
        for (int i = 0; i < SPLIT; i++) s += cl[i][tid];
    }
#else
    __shared__ int last;
    if (tid < TILE) part[(size_t)split * N + col] = s;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counter + tile, 1u) == SPLIT - 1;
    __syncthreads();
    const bool fin = last;
    bool mine = fin && tid < TILE;
    if (mine) {
        __threadfence();
        s = 0.f;
        #pragma unroll
        for (int i = 0; i < SPLIT; i++) s += __ldcg(part + (size_t)i * N + col);
        if (tid == 0) counter[tile] = 0;
    }
#endif
    if (mine) {
#if INT8
        s *= scale[col];
#endif
        float o = rnd(s);
#if RES
        o = to_f(PDL_WAIT ? __ldcg(res + col) : res[col]) + o;
#endif
        y[col] = to_h(o);
    }
    return fin;
}
"""

KERNEL = r"""
extern "C" __global__ void __launch_bounds__(THREADS) CLUSTER_ATTR gemv16(
        const void* __restrict__ w, const u16* __restrict__ x, const void* __restrict__ thr,
        const u16* __restrict__ nw, const u16* __restrict__ res, u16* __restrict__ y,
        float* __restrict__ part, u32* __restrict__ counter, const float* __restrict__ scale,
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


def supported(K: int, sizes, dtype: torch.dtype) -> bool:
    """Whether a projection of this shape and activation dtype runs here: 16-bit activations (and weights, or int8
    ones), segments of whole 64-column tiles (at most three), K a multiple of 8."""
    return (dtype in (torch.bfloat16, torch.float16) and len(sizes) <= 3 and all(s % COLS == 0 for s in sizes)
            and K % 8 == 0)


def tile_cols(sizes, int8: bool) -> int:
    """Output columns per CTA: 128 for int8 weights where every segment holds whole 128-column tiles (a kept row's
    piece is then 128 bytes, as a 16-bit row's in 64 columns), else 64."""
    return 2 * COLS if int8 and all(s % (2 * COLS) == 0 for s in sizes) else COLS


def default_config(K: int, sizes, n_sm: int, major: int, int8: bool = False) -> Config:
    """The launch config of a projection of K inputs into segments `sizes` (int8: int8 weights, in tile_cols' tiles).
    Wide projections (>= 2.5 column tiles per SM: gate/up) two K ranges, 4 rows in flight per thread, counter
    tail; the others the fewest K ranges that put >= 2.5 CTAs per SM, 8 rows, K ranges summed through a cluster on
    sm_90; more ranges where one would not fit shared memory. From sweeps (docs/perf-notes.md, session 32): on an
    H100, Llama-2-7B q/k/v 2 x 8 cluster, o and down 8 x 8 cluster, gate/up 2 x 4, within 0.5 us of the best at 40
    and 50% (gate/up dense 0.9 us above it); on an H200, Llama-3-8B, the same rule within 1.0 us of the best at 0,
    40 and 50% (one K range with 16 rows: 11.4 us slower on gate/up dense)."""
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


def k_per(K: int, split: int) -> int:
    """Inputs per K range: a multiple of 8 (16-byte loads)."""
    return -(-K // (8 * split)) * 8


def item_source(spec: Spec, name: str) -> str:
    """The GEMV's work item specialised on `spec` as the device function `name` (its #defines undone after it)."""
    cfg = spec.config
    if cfg.cluster and cfg.split == 1:
        raise UserError("a cluster tail needs a split of 2 or more")
    kper = k_per(spec.K, cfg.split)
    if kper > MAX_KPER:
        raise UserError(f"a K range of {kper} inputs exceeds {MAX_KPER}: split K further")
    defines = dict(K=spec.K, N=spec.N, SEG1=spec.seg1, SEG2=spec.seg2, KPER=kper, SPLIT=cfg.split, ROWS=cfg.rows,
                   CLUSTER=cfg.cluster, SPARSE=int(spec.sparse), NORM=int(spec.norm), GLU_IN=int(spec.glu_in),
                   RES=int(spec.residual), EPS=f"{spec.eps!r}f", THR32=int(spec.thr32), PDL=cfg.pdl, TILE=spec.cols,
                   INT8=int(spec.int8), PROFILE=int(spec.profile))
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
            config: Config, thr32: bool = False, int8: bool = False, profile: bool = False) -> Spec:
    """dtype: the activations' (and 16-bit weights')."""
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    N = ends[-1]
    return Spec(K, N, ends[0] if len(ends) > 1 else N, ends[1] if len(ends) > 2 else N, dtype == torch.float16,
                sparse, norm, glu_in, residual, float(eps), config, thr32, int8, profile, tile_cols(sizes, int8))


def launch(spec: Spec, x: Tensor, w: Tensor, t: Optional[Tensor], nw: Optional[Tensor], residual: Optional[Tensor],
           counters: Tensor, y: Tensor, part: Tensor, scale: Optional[Tensor] = None, prof: Optional[Tensor] = None):
    """One launch into y [N] on the current stream (every tensor contiguous, on one device; scale: int8's; prof:
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
    K, N = w.shape
    spec = spec_of(K, sizes, x.dtype, t is not None, norm_weight is not None, glu_in, residual is not None, eps,
                   Config(split, rows, cluster, pdl), t is not None and t.dtype == torch.float32, scale is not None)
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
    return x.new_empty(w.shape[1])


@_cuda_gemv_op.register_kernel("cpu")
def _(x, w, t, norm_weight, residual, counters, scale, sizes, glu_in, eps, split, rows, cluster, pdl):
    # the reference: a plan with nvrtc_arch set routes a model on the CPU through it (tests of the routing)
    return cuda_gemv_ref(x, w, t, sizes, norm_weight, eps, residual, glu_in, scale)


def cuda_gemv(x: Tensor, w: Tensor, t: Optional[Tensor], sizes, counters: Tensor, config: Config,
              norm_weight: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None,
              glu_in: bool = False, scale: Optional[Tensor] = None) -> Tensor:
    """y [N] = (residual +) sparsify(f(x)) @ w for one token: x [K] (or gate/up's outputs [2, K] with glu_in: f is
    silu(gate) * up), RMS-normalised with norm_weight; t [segments, K] thresholds, float32 or x's dtype (None:
    dense); counters [N / 64] int32 zeros (left at zero). w [K, N] in x's dtype (16-bit), or int8 with its column
    scales `scale` [N] float32 (kernels/formats.py INT8); norm_weight, residual in x's dtype."""
    K, N = w.shape
    assert supported(K, sizes, x.dtype) and sum(sizes) == N and x.numel() == K * (2 if glu_in else 1)
    assert (w.dtype == torch.int8 and scale is not None and scale.dtype == torch.float32) or \
        (w.dtype == x.dtype and scale is None)
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
                                     fmt=FLOAT if scale is None else INT8, scale=scale)[0]
