"""Decode attention for one token in CUDA C++ through NVRTC (kernels/nvrtc.py): the work of
kernels/decode_attention.py (RoPE of the group's queries and the new key, the cache write at `pos`, attention over
[lo, pos] split over programs, the splits combined in a fixed order), with what Triton cannot express on sm_90:
the splits of a KV head summed through a thread-block cluster's shared memory instead of partials in global memory
and a counter. Batch 1; the q/k/v projection's output in 16-bit (kernels/cuda_gemv.py reduces it in its launch).

Grid (KV heads, S splits), 4 warps a CTA (8 at four or more queries per KV head). S is decode_attention.n_splits
of the cache (the same programs per head as the Triton kernel); S <= 8 sums through a cluster of the head's S CTAs,
S > 8 through a per-head counter whose last CTA sums (left at zero). Each CTA:
1. loads pos, the group's queries and the new key and value (independent of pos), then issues its positions' key
   and value loads (each warp NB positions at a time, 16 or 8 at GQA; a lane D / 32 dimensions of each: 8 bytes
   at D = 128);
2. rotates the queries and the new key (rounded to the cache's dtype, as the reference rounds), the split holding
   `pos` writes the new key and value into the cache and takes position `pos` from registers;
3. each warp keeps an online softmax (base 2) over its positions: a chunk's NB x G dot products are
   reduce-scattered over the warp (lane l ends with product l: one exp2 a lane) where NB x G is a power of 2 <= 32,
   else all-reduced by one butterfly; the warps meet in shared memory, then the splits: rank 0 of the cluster (or
   the counter's last CTA) combines them in split order and writes y.
Rounding follows decode_attention_ref up to the order of the sums (probabilities stay in float32).
"""
import ctypes
from functools import cache
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.library import custom_op

from kernels import decode_attention, nvrtc
from kernels.common import PROFILE_SLOTS

WARPS = 4  # per CTA, by default (Spec.warps)
BT = 16  # positions per split come in whole blocks of BT

SOURCE = r"""
#define WARPS (THREADS / 32)
#define DPL (D / 32)                  // dimensions per lane
#define HALF (D / 2)
#define P (NB * G)                    // a chunk's dot products per warp (NB positions in flight per warp)
#define FULL 0xffffffffu
#define R ((G * D + THREADS - 1) / THREADS)  // (query, dimension) values per thread in the combines
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)
#if DPL == 4
typedef uint2 vec;
__device__ __forceinline__ vec ld_vec(const u16* p) {  // cache entries: read once here
    vec v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ void unpk(vec v, float* f) {
    f[0] = lo(v.x); f[1] = hi(v.x); f[2] = lo(v.y); f[3] = hi(v.y);
}
#else
typedef u32 vec;
__device__ __forceinline__ vec ld_vec(const u16* p) {
    vec v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ void unpk(vec v, float* f) { f[0] = lo(v); f[1] = hi(v); }
#endif
__device__ __forceinline__ u16 ld_q(const u16* p) {  // the q/k/v launch's output: through L2 under PDL
#if PDL
    return __ldcg(p);
#else
    return *p;
#endif
}
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}
#if RS
// one step of a reduce-scatter of s[0, 2 W) over the warp: lanes with bit W keep the upper half (summed with their
// partner's), the others the lower half, into s[0, W)
template <int W>
__device__ __forceinline__ void rs_step(float (&s)[P], const int lane) {
    if (2 * W > P) return;
    const bool up = lane & W;
    #pragma unroll
    for (int i = 0; i < W; i++) {
        const float a = s[i], b = s[i + W];
        s[i] = (up ? b : a) + __shfl_xor_sync(FULL, up ? a : b, W);
    }
}
#endif
__device__ __forceinline__ float weight(float m, float mx) { return m == NEG_INF ? 0.f : exp2f(m - mx); }

extern "C" __global__ void __launch_bounds__(THREADS) CLUSTER_ATTR attn(
        const u16* __restrict__ qkv,       // [(H + 2 HKV) D]: q, k, v of the new token
        const float* __restrict__ rope,    // [D / 2, 2]: cos, sin at pos
        u16* __restrict__ kc,              // [HKV, T, D] key cache (rotated keys)
        u16* __restrict__ vc,              // [HKV, T, D]
        const void* __restrict__ posp,     // [1] int64 (POS64) or int32
        u16* __restrict__ y,               // [H D]
        float* __restrict__ ws,            // [HKV, S, G, D + 2] partials (counter path)
        u32* __restrict__ counter,         // [HKV] zero between launches (counter path)
        long long* __restrict__ prof,      // [>= HKV S, PROF_SLOTS] (PROFILE): CTA (hk, split) stamps row hk S + split
        const int T, const int window) {
    const int hk = blockIdx.x, split = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#if PROFILE
    long long* rec = prof + PROF_SLOTS * (hk * S + split);
    if (tid == 0) stamp(rec, 0);  // slots 0-1: start
#endif
#if CLUSTER
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");  // started (waited for before DSMEM use)
#endif
    const int d0 = lane * DPL, pd = d0 < HALF ? d0 + HALF : d0 - HALF, dh = d0 % HALF;
    const int pos = POS64 ? (int)((const long long*)posp)[0] : ((const int*)posp)[0];
    // loads that do not depend on pos, in flight while it arrives: the group's queries, the new key and value
    // (under PDL: after the cache's first loads and the wait for the q/k/v launch), and the rotation
    u16 xq[G][DPL], xqp[G][DPL], xk[DPL], xkp[DPL], xv[DPL];
    float cs[DPL][2];
    auto load_qkv = [&]() {
        #pragma unroll
        for (int i = 0; i < DPL; i++) {
            #pragma unroll
            for (int g = 0; g < G; g++) {
                xq[g][i] = ld_q(qkv + (hk * G + g) * D + d0 + i);
                xqp[g][i] = ld_q(qkv + (hk * G + g) * D + pd + i);
            }
            xk[i] = ld_q(qkv + (H + hk) * D + d0 + i);
            xkp[i] = ld_q(qkv + (H + hk) * D + pd + i);
            xv[i] = ld_q(qkv + (H + HKV + hk) * D + d0 + i);
        }
    };
#if !PDL
    load_qkv();
#endif
    #pragma unroll
    for (int i = 0; i < DPL; i++) {
        cs[i][0] = rope[2 * (dh + i)];
        cs[i][1] = rope[2 * (dh + i) + 1];
    }
    const int lo_ = window > 0 ? max(pos - window + 1, 0) : 0;
    const int per = ((pos - lo_) / BT + S) / S * BT;  // positions per split, whole blocks of BT
    const int start = lo_ + split * per;
    const int last = (pos - lo_) / per;               // the split holding pos; splits 0 .. last have positions
    const int t_end = min(start + per, pos);          // cached positions of this split: [start, t_end)
    const size_t head = (size_t)hk * T * D;
    int base = start + warp * NB;
    vec kv[NB], vv[NB];
    if (base < t_end) {  // the first chunk's cache loads, before anything waits on the values above
        #pragma unroll
        for (int j = 0; j < NB; j++) {
            const int t = min(base + j, t_end - 1);
            kv[j] = ld_vec(kc + head + (size_t)t * D + d0);
            vv[j] = ld_vec(vc + head + (size_t)t * D + d0);
        }
    }
#if PDL
    // programmatic dependent launch: everything above (pos, the rotation, the first cached keys and values) was
    // written before the q/k/v launch began; its output is visible once it has finished
    asm volatile("griddepcontrol.wait;" ::: "memory");
    load_qkv();
#endif
    // half-split RoPE of the queries and the new key, rounded as the reference rounds; queries scaled for base 2
    const float scale = LOG2E * rsqrtf((float)D);
    const float sgn = d0 < HALF ? -1.f : 1.f;
    float q[G][DPL], kn[DPL];
    #pragma unroll
    for (int i = 0; i < DPL; i++) {
        #pragma unroll
        for (int g = 0; g < G; g++)
            q[g][i] = rnd(to_f(xq[g][i]) * cs[i][0] + sgn * to_f(xqp[g][i]) * cs[i][1]) * scale;
        kn[i] = rnd(to_f(xk[i]) * cs[i][0] + sgn * to_f(xkp[i]) * cs[i][1]);
    }
#if PROFILE
    // slots 2-3: q/k/v in (the branch on a rotated query waits for its loads; a NaN pattern never taken)
    if (tid == 0 && __float_as_int(q[0][0]) != -1) stamp(rec, 2);
#endif
    float m[G], l[G], acc[G][DPL];
    #pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
        #pragma unroll
        for (int i = 0; i < DPL; i++) acc[g][i] = 0.f;
    }
#if RS
    // a lane's softmax state for the one query it scores, me % G: the running max, and the sum of the
    // probabilities of its own products only (summed over the query's lanes once, after the loop)
    const int me = lane % P;
    float mrun = NEG_INF, lpart = 0.f;
#endif
    if (split == last && warp == 0) {  // the new entry: into the cache, and position pos from registers
        #pragma unroll
        for (int i = 0; i < DPL; i++) {
            kc[head + (size_t)pos * D + d0 + i] = to_h(kn[i]);
            vc[head + (size_t)pos * D + d0 + i] = xv[i];
        }
        #pragma unroll
        for (int g = 0; g < G; g++) {
            float s = 0.f;
            #pragma unroll
            for (int i = 0; i < DPL; i++) s += q[g][i] * kn[i];
            s = warp_sum(s);
#if RS
            if (me % G == g) {  // (scalars: a select over m[g] would become an indexed local array)
                mrun = s;
                lpart = me == g ? 1.f : 0.f;
            }
#else
            m[g] = s;
            l[g] = 1.f;
#endif
            #pragma unroll
            for (int i = 0; i < DPL; i++) acc[g][i] = to_f(xv[i]);
        }
    }
    for (; base < t_end; base += WARPS * NB) {
        const int next = base + WARPS * NB;
        float s[P];  // s[j G + g]: position base + j, query g
        #pragma unroll
        for (int j = 0; j < NB; j++) {
            float kf[DPL];
            unpk(kv[j], kf);
            #pragma unroll
            for (int g = 0; g < G; g++) {
                s[j * G + g] = 0.f;
                #pragma unroll
                for (int i = 0; i < DPL; i++) s[j * G + g] += q[g][i] * kf[i];
            }
        }
#if RS
        // reduce-scatter: lane l ends with the whole sum of product l % P (position (l % P) / G, query l % G), in
        // P - 1 shuffles (a butterfly gives every lane every sum in 5 P) and one exp2 a lane instead of P
        #pragma unroll
        for (int o = 16; o >= P; o >>= 1) {
            #pragma unroll
            for (int i = 0; i < P; i++) s[i] += __shfl_xor_sync(FULL, s[i], o);
        }
        rs_step<16>(s, lane);
        rs_step<8>(s, lane);
        rs_step<4>(s, lane);
        rs_step<2>(s, lane);
        rs_step<1>(s, lane);
        const float sc = base + me / G < t_end ? s[0] : NEG_INF;  // (loads were clamped)
        float mx = fmaxf(mrun, sc);
        #pragma unroll
        for (int o = G; o < P; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, o));  // finite: `base` in range
        if (next < t_end) {  // the next chunk's keys, under this chunk's values
            #pragma unroll
            for (int j = 0; j < NB; j++) kv[j] = ld_vec(kc + head + (size_t)min(next + j, t_end - 1) * D + d0);
        }
        const float alpha = exp2f(mrun - mx), pr = exp2f(sc - mx);  // 0 past t_end
        lpart = lpart * alpha + pr;
        mrun = mx;
        #pragma unroll
        for (int g = 0; g < G; g++) {
            const float a = __shfl_sync(FULL, alpha, g);
            #pragma unroll
            for (int i = 0; i < DPL; i++) acc[g][i] *= a;
        }
        #pragma unroll
        for (int j = 0; j < NB; j++) {
            float vf[DPL];
            unpk(vv[j], vf);
            #pragma unroll
            for (int g = 0; g < G; g++) {
                const float pj = __shfl_sync(FULL, pr, j * G + g);
                #pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] += pj * vf[i];
            }
        }
#else
        // the chunk's NB x G dot products summed over the warp together: each butterfly step's shuffles are
        // independent (one reduction after another would expose the shuffle latency NB x G times)
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            #pragma unroll
            for (int j = 0; j < NB; j++) {
                #pragma unroll
                for (int g = 0; g < G; g++) s[j * G + g] += __shfl_xor_sync(FULL, s[j * G + g], o);
            }
        }
        #pragma unroll
        for (int j = 0; j < NB; j++) {
            #pragma unroll
            for (int g = 0; g < G; g++) s[j * G + g] = base + j < t_end ? s[j * G + g] : NEG_INF;  // (clamped loads)
        }
        if (next < t_end) {  // the next chunk's keys, under this chunk's values
            #pragma unroll
            for (int j = 0; j < NB; j++) kv[j] = ld_vec(kc + head + (size_t)min(next + j, t_end - 1) * D + d0);
        }
        #pragma unroll
        for (int g = 0; g < G; g++) {
            float mx = m[g];
            #pragma unroll
            for (int j = 0; j < NB; j++) mx = fmaxf(mx, s[j * G + g]);  // finite: position `base` is in range
            const float alpha = exp2f(m[g] - mx);
            l[g] *= alpha;
            #pragma unroll
            for (int i = 0; i < DPL; i++) acc[g][i] *= alpha;
            m[g] = mx;
        }
        #pragma unroll
        for (int j = 0; j < NB; j++) {
            float vf[DPL];
            unpk(vv[j], vf);
            #pragma unroll
            for (int g = 0; g < G; g++) {
                const float p = exp2f(s[j * G + g] - m[g]);  // 0 past t_end
                l[g] += p;
                #pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] += p * vf[i];
            }
        }
#endif
        if (next < t_end) {
            #pragma unroll
            for (int j = 0; j < NB; j++) vv[j] = ld_vec(vc + head + (size_t)min(next + j, t_end - 1) * D + d0);
        }
    }
#if RS
    float lsum = lpart;
    #pragma unroll
    for (int o = G; o < P; o <<= 1) lsum += __shfl_xor_sync(FULL, lsum, o);
    #pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = __shfl_sync(FULL, mrun, g);
        l[g] = __shfl_sync(FULL, lsum, g);
    }
#endif
#if PROFILE
    if (tid == 0 && __float_as_int(acc[0][0]) != -1) stamp(rec, 4);  // slots 4-5: warp 0's positions read
#endif
#if !CLUSTER
    if (split > last)
        return;  // no positions
#endif
    // the warps meet in shared memory; thread tid then holds the CTA's (m, l, acc) of values e = r THREADS + tid
    __shared__ float sm_m[WARPS][G], sm_l[WARPS][G], sm_a[WARPS][G][D];
    #pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
        #pragma unroll
        for (int i = 0; i < DPL; i++) sm_a[warp][g][d0 + i] = acc[g][i];
    }
    __syncthreads();
    float cm[R], cl[R], ca[R];
    #pragma unroll
    for (int r = 0; r < R; r++) {
        const int e = r * THREADS + tid, g = min(e / D, G - 1), d = e % D;
        cm[r] = NEG_INF;
        cl[r] = 0.f;
        ca[r] = 0.f;
        #pragma unroll
        for (int w = 0; w < WARPS; w++) cm[r] = fmaxf(cm[r], sm_m[w][g]);
        #pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const float f = weight(sm_m[w][g], cm[r]);
            cl[r] += f * sm_l[w][g];
            ca[r] += f * sm_a[w][g][d];
        }
    }
#if CLUSTER
    // the splits meet in rank 0's shared memory (rank = split); every CTA of the cluster takes both barriers
    __shared__ float cl_m[S][G], cl_l[S][G], cl_a[S][G][D];
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (split <= last) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            const int e = r * THREADS + tid, g = e / D, d = e % D;
            if (e < G * D) {
                to_rank0(&cl_a[split][g][d], ca[r]);
                if (d == 0) {
                    to_rank0(&cl_m[split][g], cm[r]);
                    to_rank0(&cl_l[split][g], cl[r]);
                }
            }
        }
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#if PROFILE
    if (tid == 0) stamp(rec, 6);  // slots 6-7: the splits met
#endif
    if (split == 0) {
        #pragma unroll
        for (int r = 0; r < R; r++) {
            const int e = r * THREADS + tid, g = e / D, d = e % D;
            if (e < G * D) {
                float mx = NEG_INF, L = 0.f, A = 0.f;
                for (int j = 0; j <= last; j++) mx = fmaxf(mx, cl_m[j][g]);
                for (int j = 0; j <= last; j++) {  // split order: no dependence on arrival
                    const float f = exp2f(cl_m[j][g] - mx);
                    L += f * cl_l[j][g];
                    A += f * cl_a[j][g][d];
                }
                y[hk * G * D + e] = to_h(A / L);
            }
        }
#if PROFILE
        __syncthreads();
        if (tid == 0) stamp(rec, 8);  // slots 8-9: y written
#endif
    }
#else
    if (last == 0) {  // one split: the result
        #pragma unroll
        for (int r = 0; r < R; r++) {
            const int e = r * THREADS + tid;
            if (e < G * D) y[hk * G * D + e] = to_h(ca[r] / cl[r]);
        }
#if PROFILE
        __syncthreads();
        if (tid == 0) stamp(rec, 8);
#endif
        return;
    }
    // partials to global memory; the head's last CTA through its counter sums them in split order
    float* wsp = ws + ((size_t)hk * S + split) * G * (D + 2);
    #pragma unroll
    for (int r = 0; r < R; r++) {
        const int e = r * THREADS + tid, g = e / D, d = e % D;
        if (e < G * D) {
            wsp[g * (D + 2) + d] = ca[r];
            if (d == 0) {
                wsp[g * (D + 2) + D] = cm[r];
                wsp[g * (D + 2) + D + 1] = cl[r];
            }
        }
    }
    __threadfence();
    __syncthreads();
    __shared__ u32 arrived;
    if (tid == 0) {
        arrived = atomicAdd(counter + hk, 1u);
#if PROFILE
        if (arrived != 0xffffffffu) stamp(rec, 6);  // slots 6-7: counted in (the stamp waits on the count)
#endif
    }
    __syncthreads();
    if (arrived != (u32)last)
        return;
    __threadfence();
    const float* wh = ws + (size_t)hk * S * G * (D + 2);
    #pragma unroll
    for (int r = 0; r < R; r++) {
        const int e = r * THREADS + tid, g = e / D, d = e % D;
        if (e < G * D) {
            float mx = NEG_INF, L = 0.f, A = 0.f;
            // every split's partials loaded at once (S known at compile time): one L2 round trip, where a loop to
            // `last` (a runtime bound, unrolled by four) waited on one every four splits, twice
            float pm[S], pl[S], pa[S];
            #pragma unroll
            for (int j = 0; j < S; j++) {
                const float* p = wh + (j * G + g) * (D + 2);
                pm[j] = j <= last ? __ldcg(p + D) : NEG_INF;
                pl[j] = j <= last ? __ldcg(p + D + 1) : 0.f;
                pa[j] = j <= last ? __ldcg(p + d) : 0.f;
            }
            #pragma unroll
            for (int j = 0; j < S; j++) mx = fmaxf(mx, pm[j]);
            #pragma unroll
            for (int j = 0; j < S; j++) {  // split order: no dependence on arrival (splits past `last` add 0)
                const float f = j <= last ? exp2f(pm[j] - mx) : 0.f;
                L += f * pl[j];
                A += f * pa[j];
            }
            y[hk * G * D + e] = to_h(A / L);
        }
    }
#if PROFILE
    __syncthreads();
    if (tid == 0) stamp(rec, 8);
#endif
    if (tid == 0) counter[hk] = 0;
#endif
}
"""

TO_RANK0 = r"""
__device__ __forceinline__ void to_rank0(float* local, float v) {  // a float into rank 0's copy of `local`
    unsigned int remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"((u32)__cvta_generic_to_shared(local)),
                 "r"(0));
    asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(v) : "memory");
}
"""


class Spec(NamedTuple):
    """What one compiled kernel is specialised on (everything but the tensors, the cache length and the window)."""
    D: int  # head dim
    G: int  # query heads per KV head
    HKV: int
    S: int  # splits per KV head (the grid's y)
    fp16: bool
    pos64: bool  # pos is int64 (else int32)
    warps: int = WARPS
    nb: int = 0  # positions per warp in flight (0: 16, or 8 at four or more queries per KV head)
    rs: bool = True  # a chunk's dot products reduce-scattered over the warp where NB x G is a power of 2 <= 32
    profile: bool = False  # each CTA stamps its phases (launch's `prof`; scripts/profile_phases.py --nvrtc)
    pdl: bool = False  # launched under PDL after a q/k/v launch that triggers it: the first cache loads before the wait


def many_queries(G: int) -> bool:
    """Four or more queries per KV head: CTAs of 8 warps, each with 8 positions in flight (else WARPS and 16; the
    sweeps of docs/perf-notes.md, session 41)."""
    return G >= 4


def positions_in_flight(spec: Spec) -> int:
    return spec.nb or (8 if many_queries(spec.G) else 16)


def reduce_scatter(spec: Spec) -> bool:
    p = positions_in_flight(spec) * spec.G  # the lanes holding one query's products are G apart: G a power of 2
    return spec.rs and p <= 32 and p & (p - 1) == 0 and spec.G & (spec.G - 1) == 0


def supported(n_head: int, n_kv_head: int, head_dim: int) -> bool:
    """Shapes the kernel takes: head dim 64 or 128, at most 512 query values per KV head (shared memory)."""
    return head_dim in (64, 128) and n_head % n_kv_head == 0 and n_head // n_kv_head * head_dim <= 512


def pdl_pays(n_head: int, n_kv_head: int, splits: int) -> bool:
    """Where launching the kernel under PDL after q/k/v measured faster end to end: splits met through a cluster
    (caches of up to 512 positions: +0.3 to +0.9%, docs/perf-notes.md session 42) and MHA's 4-warp CTAs through the
    counter (+0.8% at 4,096); 8-warp CTAs through the counter (GQA, longer caches) lost 3.4% at 4,096 (session 43)."""
    return splits <= 8 or not many_queries(n_head // n_kv_head)


def cluster(spec: Spec) -> bool:
    """Whether the splits meet through a cluster (a portable cluster holds 8 CTAs) rather than a counter."""
    return 1 < spec.S <= 8


def kernel_source(spec: Spec) -> str:
    c = cluster(spec)
    defines = dict(THREADS=32 * spec.warps, FP16=int(spec.fp16), D=spec.D, G=spec.G, HKV=spec.HKV,
                   H=spec.G * spec.HKV, S=spec.S, BT=BT, CLUSTER=int(c), POS64=int(spec.pos64),
                   NB=positions_in_flight(spec), RS=int(reduce_scatter(spec)), PROFILE=int(spec.profile),
                   PROF_SLOTS=PROFILE_SLOTS, PDL=int(spec.pdl))
    attr = f"__cluster_dims__(1, {spec.S}, 1)" if c else ""
    return ("".join(f"#define {k} {v}\n" for k, v in defines.items()) + nvrtc.HELPERS + (TO_RANK0 if c else "")
            + SOURCE.replace("CLUSTER_ATTR", attr))


@cache
def _function(spec: Spec, device: int) -> ctypes.c_void_p:
    return nvrtc.function(kernel_source(spec), "attn", device)


def spec_of(qkv: Tensor, k_cache: Tensor, pos: Tensor, n_head: int, window: Optional[int], warps: int = 0,
            nb: int = 0, rs: bool = True, splits: int = 0) -> Spec:
    _, Hkv, T, D = k_cache.shape
    G = n_head // Hkv
    return Spec(D, G, Hkv, splits or decode_attention.n_splits(T, window), k_cache.dtype == torch.float16,
                pos.dtype == torch.int64, warps or (8 if many_queries(G) else WARPS), nb, rs)


def launch(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, counters: Tensor, n_head: int,
           window: Optional[int], out: Tensor, warps: int = 0, nb: int = 0, rs: bool = True, splits: int = 0,
           prof: Optional[Tensor] = None, pdl: bool = False):
    """One launch into out [H D] on the current stream: qkv [(H + 2 Hkv) D] in the caches' dtype, rope [D/2, 2]
    float32 (the row of pos), caches [B', Hkv, T, D] (row 0 used), pos [1] int32 or int64, counters [>= Hkv] int32
    zeros (left at zero). warps, nb, rs, splits: other variants of the kernel (sweeps). prof: int64 [>= Hkv S,
    PROFILE_SLOTS], each CTA's phase stamps in the Triton kernel's layout (scripts/profile_phases.py), from the
    PROFILE build."""
    spec = spec_of(qkv, k_cache, pos, n_head, window, warps, nb, rs, splits)._replace(profile=prof is not None,
                                                                                    pdl=pdl)
    assert prof is None or (prof.shape[0] >= spec.HKV * spec.S and prof.shape[1] == PROFILE_SLOTS
                            and prof.dtype == torch.int64 and prof.is_contiguous())
    assert qkv.is_contiguous() and qkv.numel() == (n_head + 2 * spec.HKV) * spec.D and qkv.dtype == k_cache.dtype
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and rope.is_contiguous() and rope.dtype == torch.float32
    assert counters.numel() >= spec.HKV and counters.dtype == torch.int32 and pos.dtype in (torch.int32, torch.int64)
    ws = torch.empty(0 if cluster(spec) else spec.HKV * spec.S * spec.G * (spec.D + 2), device=qkv.device)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (qkv, rope, k_cache, v_cache, pos, out, ws, counters)]
    args.append(ctypes.c_void_p(prof.data_ptr() if prof is not None else 0))
    args += [ctypes.c_int(k_cache.shape[2]), ctypes.c_int(window or 0)]
    dev = qkv.device.index
    cfg = nvrtc.launch_config((spec.HKV, spec.S), 32 * spec.warps, nvrtc.stream_of(qkv.device), pdl)
    nvrtc.launch(_function(spec, dev), cfg, args, dev)


@custom_op("teal::cuda_attention", mutates_args=("k_cache", "v_cache", "counters"))
def _cuda_attention_op(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, counters: Tensor,
                       n_head: int, window: int, pdl: bool = False) -> Tensor:
    out = qkv.new_empty(n_head * k_cache.shape[3])
    launch(qkv, rope, k_cache, v_cache, pos, counters, n_head, window or None, out, pdl=pdl)
    return out


@_cuda_attention_op.register_fake
def _(qkv, rope, k_cache, v_cache, pos, counters, n_head, window, pdl=False):
    return qkv.new_empty(n_head * k_cache.shape[3])


@_cuda_attention_op.register_kernel("cpu")
def _(qkv, rope, k_cache, v_cache, pos, counters, n_head, window, pdl=False):
    # the reference: a plan with nvrtc_attention set routes a model on the CPU through it (tests of the routing)
    return cuda_attention_ref(qkv, rope, k_cache, v_cache, pos, n_head, window or None)


def cuda_attention(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, counters: Tensor,
                   n_head: int, window: Optional[int], pdl: bool = False) -> Tensor:
    """One decode step of attention for batch 1: qkv [(H + 2 Hkv) D] (the q/k/v projection's output), rope [D/2, 2]
    float32 at pos [1]; writes the new key and value into the caches' row 0 and returns [H D] in their dtype. pdl:
    launched under PDL, after a q/k/v launch that triggers it (cuda_gemv's Config.pdl 3 or 4)."""
    D = k_cache.shape[3]
    return _cuda_attention_op(qkv.reshape(-1), rope.reshape(D // 2, 2), k_cache, v_cache, pos, counters, n_head,
                              window or 0, pdl)


def cuda_attention_ref(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, n_head: int,
                       window: Optional[int] = None) -> Tensor:
    """Plain-PyTorch reference of cuda_attention (decode_attention_ref at batch 1)."""
    D = k_cache.shape[3]
    return decode_attention.decode_attention_ref(qkv.view(1, -1), rope.view(1, D // 2, 2), k_cache, v_cache,
                                                 int(pos.reshape(-1)[0]), n_head, window)[0]
