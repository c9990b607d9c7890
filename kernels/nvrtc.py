"""Building blocks of the CUDA C++ kernels compiled at run time with NVRTC (the libnvrtc of the CUDA wheels torch
depends on; no nvcc) and launched through the driver API from ctypes: finding and calling NVRTC, a disk cache of
cubins keyed by source, loading a kernel into torch's context, the driver's launch config (grid, PDL attribute),
and the device helpers every such kernel's source starts with (16-bit conversions, streaming loads, profile
stamps). kernels/cuda_gemv.py (the projections) and kernels/cuda_attention.py (decode attention) build on them.
"""
import ctypes
import glob
import hashlib
import os
import site
from functools import cache
from typing import Optional, Sequence

import torch

from errors import UserError
from paths import CACHE

# device helpers; FP16 (0: bf16) is defined before them
HELPERS = r"""
typedef unsigned short u16;
typedef unsigned int u32;
__device__ __forceinline__ float to_f(u16 h) {
#if FP16
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return __uint_as_float(((u32)h) << 16);
#endif
}
__device__ __forceinline__ u16 to_h(float f) {
    u16 h;
#if FP16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ float rnd(float f) { return to_f(to_h(f)); }
__device__ __forceinline__ float lo(u32 u) { return to_f((u16)(u & 0xffffu)); }
__device__ __forceinline__ float hi(u32 u) { return to_f((u16)(u >> 16)); }
__device__ __forceinline__ void unpack(uint4 v, float* f) {
    f[0] = lo(v.x); f[1] = hi(v.x); f[2] = lo(v.y); f[3] = hi(v.y);
    f[4] = lo(v.z); f[5] = hi(v.z); f[6] = lo(v.w); f[7] = hi(v.w);
}
__device__ __forceinline__ void unpack_int8(uint4 v, float* f) {  // one load's 16 int8 weights as floats
    // without int -> float conversions (I2F: 16 per clock per SM, fewer than the H200 needs to keep up with its
    // bytes): each byte, offset by 128, becomes the low byte of the float 2^23 + 128 + w (one PRMT), from which
    // 2^23 + 128 is subtracted exactly (kernels/stream.py widens int8 the same way)
    const u32 u[4] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u, v.z ^ 0x80808080u, v.w ^ 0x80808080u};
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        #pragma unroll
        for (int j = 0; j < 4; j++)
            f[4 * i + j] = __uint_as_float(__byte_perm(u[i], 0x4B000000u, 0x7540u | j)) - 8388736.f;
    }
}
__device__ __forceinline__ uint4 ld_stream(const void* p) {  // weights: read once, not kept in L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 ld16(const u16* p) { return *(const uint4*)p; }
// from L2: written this launch
__device__ __forceinline__ uint4 ld16cg(const u16* p) { return __ldcg((const uint4*)p); }
__device__ __forceinline__ void stamp(long long* rec, int slot) {  // profile: (global timer ns, SM clock) pair
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    rec[slot] = (long long)t;
    rec[slot + 1] = clock64();
}

"""


@cache
def find_nvrtc() -> Optional[str]:
    """The newest libnvrtc.so.N under the Python paths (torch's CUDA wheels put it there), or None; searched once."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    hits = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so.*"), recursive=True)
            if ".alt." not in p and "builtins" not in p]
    return sorted(hits)[-1] if hits else None


def compile_cubin(nvrtc: ctypes.CDLL, src: str, arch: str) -> bytes:
    """src compiled for `arch` (e.g. "sm_90") by NVRTC into a cubin."""
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernel.cu", 0, None, None):
        raise UserError("NVRTC could not create a program")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    if status:
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
        raise UserError(f"NVRTC failed for {arch}: {log.value.decode().strip()}")
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


@cache
def libraries():
    """(NVRTC, the CUDA driver), loaded once per process."""
    lib = find_nvrtc()
    if lib is None:
        raise UserError("no libnvrtc.so.N under the Python paths (it comes with torch's CUDA wheels)")
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuInit(0)  # (torch has done it where it has touched the GPU; repeated calls are no-ops)
    return ctypes.CDLL(lib), cuda


def available() -> bool:
    """Whether this process can compile and launch these kernels (a CUDA GPU and NVRTC)."""
    return torch.cuda.is_available() and find_nvrtc() is not None


def cubin(src: str, arch: str) -> bytes:
    """src compiled for `arch`, from the disk cache (.cache/nvrtc, keyed by source, arch and NVRTC) or NVRTC."""
    key = hashlib.sha256(f"{find_nvrtc()}\n{arch}\n{src}".encode()).hexdigest()[:32]
    path = CACHE / "nvrtc" / f"{key}.cubin"
    if path.exists():
        return path.read_bytes()
    binary = compile_cubin(libraries()[0], src, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(binary)
    tmp.replace(path)
    return binary


@cache
def _primary(device: int) -> int:
    """The device's primary context (the one torch uses), retained once for the process."""
    cuda, dev, primary = libraries()[1], ctypes.c_int(), ctypes.c_void_p()
    if cuda.cuDeviceGet(ctypes.byref(dev), device) or cuda.cuDevicePrimaryCtxRetain(ctypes.byref(primary), dev):
        raise UserError("the CUDA driver gave no primary context")
    return primary.value


def context(device: int):
    """Make the device's primary context current in this thread (a thread that has not touched CUDA has none)."""
    cuda, ctx = libraries()[1], ctypes.c_void_p()
    cuda.cuCtxGetCurrent(ctypes.byref(ctx))
    if ctx.value != _primary(device):
        cuda.cuCtxSetCurrent(ctypes.c_void_p(_primary(device)))


@cache
def function(src: str, name: str, device: int) -> ctypes.c_void_p:
    """The kernel `name` of src, compiled for the device's arch and loaded on it, once per process."""
    cuda = libraries()[1]
    major, minor = torch.cuda.get_device_capability(device)
    binary = cubin(src, f"sm_{major}{minor}")
    context(device)
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    if cuda.cuModuleLoadData(ctypes.byref(mod), binary) or \
            cuda.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()):
        raise UserError("the CUDA driver did not load an NVRTC module")
    return fn


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("n_attrs", ctypes.c_uint)]


def launch_config(grid: tuple, threads: int, stream: ctypes.c_void_p, pdl: bool = False) -> LaunchConfig:
    """The driver's CUlaunchConfig of a launch: its grid (x, y), and the PDL attribute where asked."""
    attr = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=(ctypes.c_int * 16)(1))
    cfg = LaunchConfig(grid_x=grid[0], grid_y=grid[1], grid_z=1, block_x=threads, block_y=1, block_z=1,
                       shared_bytes=0, stream=stream, attrs=ctypes.pointer(attr), n_attrs=int(pdl))
    cfg._keep = attr  # the attribute lives as long as the config
    return cfg


def launch(fn: ctypes.c_void_p, cfg: LaunchConfig, args: Sequence, device: int):
    """Launch fn with cfg; args: ctypes values (c_void_p for pointers), in the kernel's parameter order."""
    cuda = libraries()[1]
    context(device)
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    if cuda.cuLaunchKernelEx(ctypes.byref(cfg), fn, ptrs, None):
        raise UserError("cuLaunchKernelEx failed for an NVRTC kernel")


def stream_of(device: torch.device) -> ctypes.c_void_p:
    """torch's current stream on the device, as the driver takes it."""
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
