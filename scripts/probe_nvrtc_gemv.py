"""Probe for issue 19: a dense batch-1 GEMV written in CUDA C++, compiled at run time with NVRTC (the libnvrtc of the
CUDA wheels torch depends on; no nvcc) and launched through the driver API from ctypes inside a CUDA graph, against
cuBLAS, for the projection shapes of one layer. Its split-K tail is either the Triton kernels' (partials to global
memory, a per-tile counter, the last CTA sums) or, on sm_90, a thread-block cluster's (partials into rank 0's shared
memory through `st.shared::cluster`, one cluster barrier). Needs a CUDA GPU; not a decode path (docs/perf-notes.md,
session 31, has what it measured and what it points to).

    python scripts/probe_nvrtc_gemv.py [--model llama-2-7b] [--splits 1,2,4,8] [--rows 8,16] [--out DIR]
"""
import argparse
import ctypes
import json
from pathlib import Path

import torch

from cli import HelpFormatter, run_cli
from errors import UserError
from kernels.nvrtc import compile_cubin, find_nvrtc
from model import ModelArgs
from scripts.bench import graph_time_us, projection_shapes, read_bandwidth, weight_copies

COLS = 64  # output columns per CTA: 8 threads x 8 bf16 (one 16-byte load) per row, 16 rows at a time (128 threads)

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(128) CLUSTER_ATTR gemv(
        const unsigned short* __restrict__ w,  // [K, N] bf16 bits, each input's weights contiguous
        const float* __restrict__ x,           // [K]
        float* __restrict__ y,                 // [N]
        float* __restrict__ part,              // [SPLIT, N] partials (counter tail)
        unsigned int* __restrict__ counter,    // [N / 64], zero between launches (counter tail)
        int K, int N) {
    const int tile = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    const int col8 = tid & 7, rg = tid >> 3;
    const int kper = (K + SPLIT - 1) / SPLIT, k0 = split * kper, kn = min(kper, K - k0);
    float acc[8];
    #pragma unroll
    for (int j = 0; j < 8; j++) acc[j] = 0.f;
    const unsigned short* wp = w + (size_t)k0 * N + tile * 64 + col8 * 8;
    for (int r0 = rg; r0 < kn; r0 += 16 * ROWS) {
        uint4 v[ROWS];  // ROWS loads in flight per thread before any is used
        float xv[ROWS];
        #pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const int r = r0 + 16 * i;
            v[i] = make_uint4(0, 0, 0, 0);
            xv[i] = 0.f;
            if (r < kn) {
                asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(v[i].x), "=r"(v[i].y), "=r"(v[i].z), "=r"(v[i].w) : "l"(wp + (size_t)r * N));
                xv[i] = x[k0 + r];
            }
        }
        #pragma unroll
        for (int i = 0; i < ROWS; i++) {
            const unsigned int u[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
            #pragma unroll
            for (int j = 0; j < 4; j++) {  // bf16 -> float is the top half of the float's bits
                acc[2 * j] += xv[i] * __uint_as_float(u[j] << 16);
                acc[2 * j + 1] += xv[i] * __uint_as_float(u[j] & 0xffff0000u);
            }
        }
    }
    __shared__ float red[16][64];
    __shared__ float cl[SPLIT][64];
    #pragma unroll
    for (int j = 0; j < 8; j++) red[rg][col8 * 8 + j] = acc[j];
    __syncthreads();
    float s = 0.f;
    if (tid < 64) {
        #pragma unroll
        for (int i = 0; i < 16; i++) s += red[i][tid];
    }
#if CLUSTER
    unsigned int rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    if (tid < 64) {
        const unsigned int local = (unsigned int)__cvta_generic_to_shared(&cl[rank][tid]);
        unsigned int remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(0));
        asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(remote), "f"(s) : "memory");
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    if (rank == 0 && tid < 64) {
        float t = 0.f;
        for (int i = 0; i < SPLIT; i++) t += cl[i][tid];
        y[tile * 64 + tid] = t;
    }
#else
    __shared__ unsigned int last;
    if (tid < 64) part[(size_t)split * N + tile * 64 + tid] = s;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counter + tile, 1u) == SPLIT - 1;
    __syncthreads();
    if (last && tid < 64) {
        __threadfence();
        float t = 0.f;
        for (int i = 0; i < SPLIT; i++) t += __ldcg(part + (size_t)i * N + tile * 64 + tid);
        y[tile * 64 + tid] = t;
        if (tid == 0) counter[tile] = 0;
    }
#endif
}
"""


def kernel_source(split: int, rows: int, cluster: bool) -> str:
    attr = f"__cluster_dims__(1, {split}, 1)" if cluster else ""
    return f"#define SPLIT {split}\n#define ROWS {rows}\n#define CLUSTER {int(cluster)}\n" + \
        SOURCE.replace("CLUSTER_ATTR", attr)


def load_kernel(cuda, cubin: bytes):
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    if cuda.cuModuleLoadData(ctypes.byref(mod), cubin) or cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"gemv"):
        raise UserError("the driver did not load the NVRTC module")
    return fn


def launch(cuda, fn, split: int, w, x, y, part, counter):
    K, N = w.shape
    args = [ctypes.c_void_p(t.data_ptr()) for t in (w, x, y, part, counter)] + [ctypes.c_int(K), ctypes.c_int(N)]
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    if cuda.cuLaunchKernel(fn, N // COLS, split, 1, 128, 1, 1, 0, stream, ptrs, None):
        raise UserError("cuLaunchKernel failed")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="whose projection shapes")
    p.add_argument("--splits", default="1,2,4,8", help="comma-separated K splits (CTAs per column tile, at most 8)")
    p.add_argument("--rows", default="8,16", help="comma-separated rows in flight per thread")
    p.add_argument("--out", type=Path, default=None, help="directory for probe_nvrtc_gemv.json")
    a = p.parse_args()
    try:
        args = ModelArgs.from_name(a.model)
        splits = [int(s) for s in a.splits.split(",")]
        rows = [int(r) for r in a.rows.split(",")]
    except (KeyError, ValueError):
        raise UserError(f"unknown --model {a.model!r} or non-integer --splits/--rows") from None
    if not all(1 <= s <= 8 for s in splits) or not all(1 <= r <= 32 for r in rows):
        raise UserError("--splits take 1..8, --rows 1..32")
    if not torch.cuda.is_available():
        raise UserError("probe_nvrtc_gemv.py needs a CUDA GPU")
    lib = find_nvrtc()
    if lib is None:
        raise UserError("no libnvrtc.so.N under the Python paths (it comes with torch's CUDA wheels)")
    nvrtc, cuda = ctypes.CDLL(lib), ctypes.CDLL("libcuda.so.1")
    major, minor = torch.cuda.get_device_capability()
    torch.zeros(1, device="cuda")  # the primary context current for the driver calls
    variants = [(s, r, c) for s in splits for r in rows for c in (False, True) if not c or (s > 1 and major >= 9)]
    kernels = {v: load_kernel(cuda, compile_cubin(nvrtc, kernel_source(*v), f"sm_{major}{minor}")) for v in variants}
    bw = read_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw / 1e9:.0f} GB/s; {lib}", flush=True)
    recs = []
    for proj, (K, sizes, _) in projection_shapes(args).items():
        N = sum(sizes)
        ws = [(torch.randn(K, N, device="cuda") / K ** 0.5).to(torch.bfloat16)
              for _ in range(weight_copies(K * N * 2, l2))]  # [K, N]
        x = torch.randn(K, device="cuda")  # [K]
        ref = x @ ws[0].float()  # [N]
        y, part = torch.empty(N, device="cuda"), torch.empty(8, N, device="cuda")
        counter = torch.zeros(N // COLS, dtype=torch.int32, device="cuda")
        xb = x.to(torch.bfloat16)[None]
        cublas = graph_time_us([lambda w=w: torch.matmul(xb, w) for w in ws], launches=32, replays=10)
        line = [f"{proj} [{K}, {N}]: bytes at bw {K * N * 2 / bw * 1e6:.2f} us, cuBLAS {cublas:.2f}"]
        recs.append(dict(proj=proj, K=K, N=N, variant="cublas", us=cublas, bytes_us=K * N * 2 / bw * 1e6))
        for (split, r, clu), fn in kernels.items():
            y.fill_(float("nan"))  # poisoned: every column must be written
            launch(cuda, fn, split, ws[0], x, y, part, counter)
            err = ((y - ref).norm() / ref.norm()).item()
            us = graph_time_us([lambda w=w, fn=fn, split=split: launch(cuda, fn, split, w, x, y, part, counter)
                                for w in ws], launches=32, replays=10)
            name = f"{'cluster' if clu else 'counter'} {split}x{r}"
            recs.append(dict(proj=proj, K=K, N=N, variant=name, split=split, rows=r, cluster=clu, us=us, err=err))
            line.append(f"{name} {us:.2f}" + ("" if err < 1e-2 else f" WRONG ({err:.2g})"))
        print(" | ".join(line), flush=True)
        del ws
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "probe_nvrtc_gemv.json").write_text(json.dumps(recs, indent=0))


if __name__ == "__main__":
    run_cli(main)
