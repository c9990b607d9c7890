"""kernels/cuda_attention.py (decode attention in CUDA C++ through NVRTC): the shapes it takes, where its splits
meet (cluster or counter), its op's CPU kernel against the Triton kernel's reference, and (where libnvrtc is
installed) a build of every variant a model's step launches to an sm_90 binary. The kernel runs on a GPU only:
scripts/gpu_check.py (check_cuda_attention) compares it with the reference (poisoned outputs, block edges, a
sliding window, both ways of meeting, bit for bit over two launches)."""
import ctypes

import pytest
import torch

from kernels import cuda_attention, decode_attention, nvrtc
from kernels.common import PROFILE_SLOTS
from model import ModelArgs


def test_supported_shapes_and_meeting():
    assert cuda_attention.supported(32, 32, 128) and cuda_attention.supported(32, 8, 128)  # Llama-2 / Llama-3
    assert cuda_attention.supported(9, 3, 64)  # SmolLM2-135M
    assert not cuda_attention.supported(64, 8, 128)  # 8 queries per KV head: 1,024 values, over shared memory
    assert not cuda_attention.supported(8, 8, 32) and not cuda_attention.supported(6, 4, 128)
    spec = cuda_attention.Spec(128, 1, 32, 6, False, True)
    assert cuda_attention.cluster(spec) and cuda_attention.cluster(spec._replace(S=8))
    assert not cuda_attention.cluster(spec._replace(S=16)) and not cuda_attention.cluster(spec._replace(S=1))
    # reduce-scatter where a chunk's products fill at most a warp's lanes, a power of 2 of them, G apart
    assert cuda_attention.reduce_scatter(spec) and not cuda_attention.reduce_scatter(spec._replace(rs=False))
    rs = cuda_attention.reduce_scatter
    assert rs(spec._replace(G=2)) and rs(spec._replace(G=4)) and not rs(spec._replace(G=4, nb=16))
    assert not rs(spec._replace(G=3))


def test_supported_heads():
    """Head dims 64 and 128, at most 512 query values per KV head (the group's queries in shared memory)."""
    assert cuda_attention.supported(32, 32, 128) and cuda_attention.supported(32, 8, 128)
    assert cuda_attention.supported(32, 4, 64) and not cuda_attention.supported(64, 8, 128)
    assert not cuda_attention.supported(32, 8, 96) and not cuda_attention.supported(30, 8, 128)


def test_spec_follows_the_triton_kernels_programs():
    """As many splits per KV head as the Triton kernel launches for the same cache and window."""
    for T, window in ((128, None), (384, None), (4096, None), (4096, 100), (40, None)):
        k = torch.zeros(1, 8, T, 128, dtype=torch.bfloat16)
        spec = cuda_attention.spec_of(torch.zeros(1), k, torch.tensor([3]), 32, window)
        assert spec == cuda_attention.Spec(128, 4, 8, decode_attention.n_splits(T, window), False, True, 8)  # 8 warps
        assert cuda_attention.reduce_scatter(spec)  # 8 positions x 4 queries: a product per lane
    assert cuda_attention.spec_of(torch.zeros(1), k.half(), torch.tensor([3], dtype=torch.int32), 32, None).fp16
    assert not cuda_attention.spec_of(torch.zeros(1), k, torch.tensor([3], dtype=torch.int32), 32, None).pos64


@pytest.mark.parametrize("window", [None, 7])
def test_cpu_op_is_the_reference(window):
    """The op's CPU kernel (what a plan with nvrtc_attention runs on a CPU) writes the caches and attends as the
    Triton kernel's reference does at batch 1, under torch.compile too (its fake gives the output's shape)."""
    H, Hkv, D, T, pos = 4, 2, 64, 32, 19
    qkv = torch.randn((H + 2 * Hkv) * D, dtype=torch.bfloat16)
    rope = torch.randn(1, D // 2, 2)
    caches = [torch.randn(1, Hkv, T, D, dtype=torch.bfloat16) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    ref = decode_attention.decode_attention_ref(qkv.view(1, -1), rope, *ref_caches, pos, H, window)[0]
    counters = torch.zeros(Hkv, dtype=torch.int32)
    step = torch.compile(cuda_attention.cuda_attention, fullgraph=True)
    out = step(qkv, rope, *caches, torch.tensor([pos]), counters, H, window)
    assert out.shape == (H * D,) and torch.equal(out, ref)
    assert all(torch.equal(c, r) for c, r in zip(caches, ref_caches))


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "smollm2-135m"])
def test_every_variant_of_a_model_builds_for_sm90(name):
    """bf16 and fp16, int64 and int32 positions, caches short and long enough for the cluster and for the counter."""
    a = ModelArgs.from_name(name)
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    for T in (128, 384, 4096):
        for fp16 in (False, True):
            for pos64 in (True, False):
                spec = cuda_attention.Spec(a.head_dim, a.n_head // a.n_kv_head, a.n_kv_head,
                                           decode_attention.n_splits(T, None), fp16, pos64)
                assert nvrtc.compile_cubin(lib, cuda_attention.kernel_source(spec), "sm_90")[:4] == b"\x7fELF"
    G = a.n_head // a.n_kv_head
    for S in (6, 16):  # launched under PDL after a triggering q/k/v launch (cluster, counter), and its profiled build
        for profile in (False, True):  # (profile_phases.py --attention-pdl)
            spec = cuda_attention.Spec(a.head_dim, G, a.n_kv_head, S, False, True, pdl=True, profile=profile)
            assert nvrtc.compile_cubin(lib, cuda_attention.kernel_source(spec), "sm_90")[:4] == b"\x7fELF"
    for warps, nb, rs, S, prof in ((8, 0, True, 6, False), (4, 4, True, 6, False), (4, 0, False, 6, False),
                                   (8, 0, True, 32, False), (4, 0, True, 6, True), (8, 0, True, 16, True)):
        # the variants sweeps time, and the profiled builds scripts/profile_phases.py --nvrtc runs (cluster, counter)
        spec = cuda_attention.Spec(a.head_dim, G, a.n_kv_head, S, False, True, warps, nb, rs, prof)
        assert nvrtc.compile_cubin(lib, cuda_attention.kernel_source(spec), "sm_90")[:4] == b"\x7fELF"


def test_launch_checks_its_profile_buffer():
    """A profiled launch takes an int64 [>= Hkv S, PROFILE_SLOTS] buffer (checked before anything reaches a GPU)."""
    H, Hkv, D, T = 8, 2, 64, 384  # 6 splits: 12 CTAs
    qkv = torch.zeros((H + 2 * Hkv) * D, dtype=torch.bfloat16)
    cache = torch.zeros(1, Hkv, T, D, dtype=torch.bfloat16)
    args = (qkv, torch.zeros(D // 2, 2), cache, cache.clone(), torch.tensor([5]), torch.zeros(Hkv, dtype=torch.int32),
            H, None, torch.empty(H * D, dtype=torch.bfloat16))
    for bad in (torch.zeros(11, PROFILE_SLOTS, dtype=torch.int64), torch.zeros(12, PROFILE_SLOTS)):
        with pytest.raises(AssertionError):
            cuda_attention.launch(*args, prof=bad)
