"""kernels/cuda_gemv.py (the NVRTC kernel): its plain-PyTorch reference against the Triton kernels (interpreted on CPU)
for the same work, its launch configs and sources, the plan's refusal without a GPU, and (where libnvrtc is installed)
a build of every kernel a model's plan launches to an sm_90 binary. The kernel itself runs on a GPU only:
scripts/gpu_check.py compares it with this reference (poisoned outputs, odd sizes, both tails, bit for bit)."""
import ctypes

import pytest
import torch

from errors import UserError
from kernels.common import PROFILE_SLOTS
from kernels import configs, cuda_gemv, nvrtc, reference, sparse_gemv
from kernels.formats import FLOAT, INT8, int4_variant
from model import ModelArgs
from plan import decode_plan
from tests.kernel_cases import halfway_thresholds

BF16 = torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def triton_launch(x, w, t, sizes, norm_weight=None, residual=None, parts=None, scale=None):
    """What the Triton projection kernel makes of the same work (norm fused from sums of squares; down reads gate/up's
    partials `parts` [1, 2, 1, K] and gates them; int8 weights with their column scales)."""
    K, N = w.shape
    fmt = FLOAT if scale is None else INT8
    cfg = configs.default_config(1, K, sizes, False, 4, fmt)
    counters = torch.zeros(configs.counters_size(sizes, False, cfg.block_n), dtype=torch.int32, device=DEVICE)
    xin = x.view(1, K) if parts is None else parts
    if residual is not None:
        return sparse_gemv.sparse_gemv_ss(xin, w, t, sizes, counters, cfg, residual.view(1, N), fmt=fmt,
                                          scale=scale)[0][0]
    ss = None if norm_weight is None else reference.sum_squares_ref(x.view(1, K), 128)
    return sparse_gemv.sparse_gemv(xin, w, t, sizes, counters, cfg, norm_weight=norm_weight, ss_in=ss, fmt=fmt,
                                   scale=scale)[0]


@pytest.mark.parametrize("int8", [False, True], ids=["16-bit", "int8"])
@pytest.mark.parametrize("case", ["qkv", "o", "gate_up", "down", "dense"])
def test_reference_matches_the_triton_kernels(case, int8):
    dt = torch.float32
    """cuda_gemv_ref computes what the Triton kernels compute for the decode step's four calls: q/k/v (three
    segments, their own thresholds) and gate/up (un-gated) with the norm fused, o with the residual, down gating
    gate/up's outputs as it loads them; odd K; 16-bit-style weights or int8 with column scales. In float32: in bf16 the Triton kernels' different summation orders flip
    inputs that round onto a threshold (the bf16 rounding itself is checked on the GPU, scripts/gpu_check.py)."""
    K = {"down": 136, "o": 128}.get(case, 200)
    sizes = {"qkv": (128, 64, 64), "gate_up": (128, 128), "o": (128,), "down": (64,), "dense": (192,)}[case]
    N = sum(sizes)
    w = (torch.randn(K, N, device=DEVICE) / K ** 0.5).to(dt)
    scale = None
    if int8:
        w, scale = INT8.quantize_weight(w)
    norm = case in ("qkv", "gate_up", "dense")
    x = (torch.randn(K, device=DEVICE) * 3).to(dt)
    g = (torch.rand(K, device=DEVICE) + 0.5).to(dt) if norm else None
    residual = torch.randn(N, device=DEVICE).to(dt) if case in ("o", "down") else None
    parts = None
    if case == "down":
        parts = torch.zeros(1, 2, 1, K, device=DEVICE)
        parts[0] = torch.randn(2, 1, K, device=DEVICE) * 2
        x = parts[0, :, 0].to(dt)  # gate/up's outputs as the NVRTC path hands them over: rounded
    xin = reference.rms_norm_ref(x, g, 1e-5) if norm else (reference.parts_ref(parts, True, dt)[0]
                                                            if parts is not None else x)
    t = None if case == "dense" else torch.cat([halfway_thresholds(xin.view(1, K), s)
                                                  for s in (0.5, 0.4, 0.6)[:len(sizes)]]).to(dt)  # per segment
    ours = cuda_gemv.cuda_gemv_ref(x, w, t, sizes, g, 1e-5, residual, glu_in=case == "down", scale=scale)
    theirs = triton_launch(x, w, torch.zeros(len(sizes), K, device=DEVICE, dtype=dt) if t is None else t, sizes,
                           g, residual, parts, scale)
    assert ours.shape == (N,) and ours.dtype == dt
    assert rel_err(ours, theirs) < 1e-5
    if t is not None:  # the thresholds did something
        dense = cuda_gemv.cuda_gemv_ref(x, w, None, sizes, g, 1e-5, residual, glu_in=case == "down", scale=scale)
        assert rel_err(ours, dense) > 1e-2


def test_launch_configs():
    """Wide projections (>= 2.5 column tiles per SM: gate/up) two K ranges, 4 rows in flight, counter tail; others
    the fewest K ranges that put >= 2.5 CTAs per SM (8 at most), 8 rows, cluster tails on sm_90; more ranges where
    one would not fit shared memory; no programmatic dependent launch (measured slower)."""
    shapes = {p: (K, s) for p, (K, s, _) in _shapes("llama-2-7b").items()}
    got = {p: cuda_gemv.default_config(K, s, 132, 9) for p, (K, s) in shapes.items()}
    assert got == {"qkv": (2, 8, 1, 0), "o": (8, 8, 1, 0), "gate_up": (2, 4, 0, 0), "down": (8, 8, 1, 0)}
    assert cuda_gemv.default_config(4096, (4096,), 132, 8) == (8, 8, 0, 0)  # no clusters before sm_90
    assert cuda_gemv.default_config(16384, (131072,), 132, 9).split == 4  # a K range of 4096 at most
    for K, s in shapes.values():
        cfg = cuda_gemv.default_config(K, s, 132, 9)
        assert cuda_gemv.k_per(K, cfg.split) <= cuda_gemv.MAX_KPER and cuda_gemv.k_per(K, cfg.split) % 8 == 0


def test_int8_tiles():
    """int8 weights in 128-column tiles where every segment holds whole ones (128-byte row pieces), with up to 16 K
    ranges (counter tail beyond a cluster's 8) to keep >= 2.5 CTAs per SM; 16-bit weights and odd segments 64."""
    assert cuda_gemv.tile_cols((11008, 11008), True) == 128 and cuda_gemv.tile_cols((4096, 1024, 1024), True) == 128
    assert cuda_gemv.tile_cols((4096,), False) == 64 and cuda_gemv.tile_cols((128, 64, 64), True) == 64
    assert cuda_gemv.default_config(11008, (4096,), 132, 9, True) == (16, 8, 0, 0)
    assert cuda_gemv.default_config(4096, (4096,) * 3, 132, 9, True) == (4, 8, 1, 0)
    odd = (128, 64, 64)  # 64-column segments: int8 in 64-column tiles too, so the same config
    assert cuda_gemv.default_config(4096, odd, 4, 9, True) == cuda_gemv.default_config(4096, odd, 4, 9)
    spec = cuda_gemv.spec_of(11008, (4096,), BF16, True, False, True, True, 1e-5,
                             cuda_gemv.default_config(11008, (4096,), 132, 9, True), int8=True)
    assert spec.cols == 128 and cuda_gemv.grid(spec) == 32 * 16
    assert "#define TILE 128\n" in cuda_gemv.kernel_source(spec)


def test_supported_shapes():
    assert cuda_gemv.supported(4096, (4096, 1024, 1024), BF16) and cuda_gemv.supported(576, (576,), torch.float16)
    assert not cuda_gemv.supported(4096, (4096,), torch.float32)  # 16-bit weights only
    assert not cuda_gemv.supported(4096, (4096, 96), BF16)  # a segment of part of a 64-column tile
    assert not cuda_gemv.supported(4100, (4096,), BF16)  # 16-byte input loads
    assert not cuda_gemv.supported(64, (64,) * 4, BF16)  # three segments at most


def test_kernel_source_specialises():
    spec = cuda_gemv.spec_of(4096, (4096, 1024, 1024), BF16, True, True, False, False, 1e-5,
                             cuda_gemv.Config(8, 8, 1, 1))
    src = cuda_gemv.kernel_source(spec)
    for line in ("#define K 4096", "#define N 6144", "#define SEG1 4096", "#define SEG2 5120", "#define KPER 512",
                 "#define SPARSE 1", "#define NORM 1", "#define CLUSTER 1", "#define FP16 0", "#define EPS 1e-05f", "#define PDL 1"):
        assert line + "\n" in src, line
    assert "__cluster_dims__(1, 8, 1) gemv16(" in src and "CLUSTER_ATTR" not in src
    with pytest.raises(UserError, match="cluster"):
        cuda_gemv.kernel_source(spec._replace(config=cuda_gemv.Config(1, 8, 1)))
    with pytest.raises(UserError, match="split K further"):
        cuda_gemv.kernel_source(spec._replace(K=16384, config=cuda_gemv.Config(2, 8, 0)))
    # the phase stamps only where asked (scripts/profile_phases.py --nvrtc), in kernels/common.py's slot layout
    assert "#define PROFILE 0\n" in src and "#if 0\n    long long* rec = prof + PROF_SLOTS" in src
    late = cuda_gemv.kernel_source(spec._replace(config=cuda_gemv.Config(8, 8, 1, 2)))  # trigger after the stream
    assert "#define PDL 2\n" in late and "#if PDL == 2 || PDL == 4\n    // the late trigger" in late
    profiled = cuda_gemv.kernel_source(spec._replace(profile=True))
    assert "#define PROFILE 1\n" in profiled and "#if 1\n    long long* rec = prof + PROF_SLOTS" in profiled
    assert f"#define PROF_SLOTS {PROFILE_SLOTS}\n" in profiled


def test_launch_checks_its_profile_buffer():
    """A profiled spec takes an int64 [>= CTAs, PROFILE_SLOTS] buffer and an unprofiled one none (checked before any
    driver call)."""
    spec = cuda_gemv.spec_of(1024, (256,), BF16, True, False, False, False, 1e-5, cuda_gemv.Config(2, 8, 0))
    assert cuda_gemv.grid(spec) == 4 * 2
    x = torch.zeros(1024, dtype=BF16)
    with pytest.raises(AssertionError):
        cuda_gemv.launch(spec, x, None, None, None, None, None, None, None,
                         prof=torch.zeros(8, PROFILE_SLOTS, dtype=torch.int64))
    for rows, slots in ((7, PROFILE_SLOTS), (8, 4)):
        with pytest.raises(AssertionError):
            cuda_gemv.launch(spec._replace(profile=True), x, None, None, None, None, None, None, None,
                             prof=torch.zeros(rows, slots, dtype=torch.int64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_plan_refuses_nvrtc_without_a_gpu():
    with pytest.raises(UserError, match="NVRTC"):
        decode_plan(torch.device("cpu"), nvrtc=True)


def _shapes(name):
    a = ModelArgs.from_name(name)
    q, kv = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    return {"qkv": (a.dim, (q, kv, kv), False), "o": (q, (a.dim,), False),
            "gate_up": (a.dim, (a.intermediate_size,) * 2, False), "down": (a.intermediate_size, (a.dim,), True)}


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "smollm2-135m"])
def test_every_kernel_of_a_model_builds_for_sm90(name):
    """Every launch a model's decode step makes on this path (dense and sparse, bf16 and fp16, its default configs
    a counter tail where the default is a cluster, with PDL, float32 or 16-bit thresholds, 16-bit or int8 weights;
    profiled) compiles for sm_90."""
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    for proj, (K, sizes, glu_in) in _shapes(name).items():
        for dtype in (BF16, torch.float16):
            for sparse, t32, int8 in ((False, False, False), (True, True, False), (True, False, False),
                                      (False, False, True), (True, True, True)):
                cfg = cuda_gemv.default_config(K, sizes, 132, 9, int8)
                for c in {cfg, cfg._replace(cluster=0), *(cfg._replace(pdl=p) for p in (1, 2, 3, 4))}:
                    spec = cuda_gemv.spec_of(K, sizes, dtype, sparse, proj in ("qkv", "gate_up"), glu_in,
                                             proj in ("o", "down"), 1e-5, c, t32, int8)
                    assert nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(spec), "sm_90")[:4] == b"\x7fELF"
        for pdl in (0, 3):  # scripts/profile_phases.py --nvrtc [--attention-pdl 3]
            profiled = cuda_gemv.spec_of(K, sizes, BF16, True, proj in ("qkv", "gate_up"), glu_in,
                                         proj in ("o", "down"), 1e-5,
                                         cuda_gemv.default_config(K, sizes, 132, 9)._replace(pdl=pdl), True,
                                         profile=True)
            assert nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(profiled), "sm_90")[:4] == b"\x7fELF"


def test_launch_config_matches_the_driver_layout():
    """The ctypes mirror of CUlaunchConfig / CUlaunchAttribute (cuda.h: 56 and 72 bytes on 64-bit Linux), filled
    for a PDL launch and for a plain one."""
    assert ctypes.sizeof(nvrtc.LaunchConfig) == 56 and ctypes.sizeof(nvrtc.LaunchAttribute) == 72
    assert nvrtc.LaunchConfig.stream.offset == 32 and nvrtc.LaunchAttribute.value.offset == 8
    spec = cuda_gemv.spec_of(4096, (4096,), BF16, True, False, False, True, 1e-5, cuda_gemv.Config(8, 8, 1, 1))
    cfg = cuda_gemv.launch_config(spec, ctypes.c_void_p(1234))
    assert (cfg.grid_x, cfg.grid_y, cfg.block_x, cfg.stream, cfg.n_attrs) == (64, 8, 128, 1234, 1)
    assert cfg.attrs.contents.id == nvrtc.PROGRAMMATIC_STREAM_SERIALIZATION and cfg.attrs.contents.value[0] == 1
    assert cuda_gemv.launch_config(spec._replace(config=cuda_gemv.Config(8, 8, 1, 0)), None).n_attrs == 0
    assert cuda_gemv.launch_config(spec._replace(config=cuda_gemv.Config(8, 8, 1, 2)), None).n_attrs == 1  # late
    for trigger in (3, 4):  # launched plainly, only triggering the next launch
        assert cuda_gemv.launch_config(spec._replace(config=cuda_gemv.Config(8, 8, 1, trigger)), None).n_attrs == 0
        source = cuda_gemv.kernel_source(spec._replace(config=cuda_gemv.Config(8, 8, 1, trigger)))
        assert "#define PDL_WAIT (PDL == 1 || PDL == 2)" in source and f"#define PDL {trigger}\n" in source


@pytest.mark.parametrize("case", ["qkv", "down"])
def test_int4_reference_matches_the_triton_kernels(case):
    """cuda_gemv_ref on int4 weights (groups of 32 inputs, column order) computes what the Triton int4 kernel does:
    q/k/v with the norm fused and three thresholded segments, down gating gate/up's outputs with the residual."""
    K, sizes = (256, (256, 256, 256)) if case == "qkv" else (160, (256,))
    N = sum(sizes)
    fmt = int4_variant(32)
    w, scale = fmt.quantize_weight(torch.randn(K, N, device=DEVICE) / K ** 0.5)
    g = (torch.rand(K, device=DEVICE) + 0.5) if case == "qkv" else None
    residual = torch.randn(N, device=DEVICE) if case == "down" else None
    parts = None
    x = torch.randn(K, device=DEVICE) * 3
    if case == "down":
        parts = torch.zeros(1, 2, 1, K, device=DEVICE)
        parts[0] = torch.randn(2, 1, K, device=DEVICE) * 2
        x = parts[0, :, 0]
    xin = reference.rms_norm_ref(x, g, 1e-5) if g is not None else reference.parts_ref(parts, True, x.dtype)[0]
    t = torch.cat([halfway_thresholds(xin.view(1, K), s) for s in (0.5, 0.4, 0.6)[:len(sizes)]])
    ours = cuda_gemv.cuda_gemv_ref(x, w, t, sizes, g, 1e-5, residual, glu_in=case == "down", scale=scale)
    cfg = configs.default_config(1, K, sizes, False, 4, fmt, False, 32)
    counters = torch.zeros(configs.counters_size(sizes, False, cfg.block_n), dtype=torch.int32, device=DEVICE)
    if case == "down":
        theirs = sparse_gemv.sparse_gemv_ss(parts, w, t, sizes, counters, cfg, residual.view(1, N), fmt=fmt,
                                            scale=scale)[0][0]
    else:
        theirs = sparse_gemv.sparse_gemv(x.view(1, K), w, t, sizes, counters, cfg, norm_weight=g,
                                         ss_in=reference.sum_squares_ref(x.view(1, K), 128), fmt=fmt, scale=scale)[0]
    assert ours.shape == (N,) and rel_err(ours, theirs) < 1e-5
    assert rel_err(ours, cuda_gemv.cuda_gemv_ref(x, w, None, sizes, g, 1e-5, residual, case == "down", scale)) > 1e-2


def test_int4_configs_and_shapes():
    """int4 weights: 256-column tiles, a K range of at most 8 scale groups (D's eight columns) and a multiple of the
    group, no empty range, the fewest ranges that put >= 2.5 CTAs an SM, clusters where 4 or fewer on sm_90."""
    assert cuda_gemv.supported(4096, (4096, 1024, 1024), BF16, 128)
    assert not cuda_gemv.supported(576, (576, 192, 192), BF16, 64)  # SmolLM2: not whole 256-column tiles
    assert not cuda_gemv.supported(4096, (4096,), BF16, 48) and not cuda_gemv.supported(4000, (4096,), BF16, 128)
    got = {p: cuda_gemv.default_config(K, s, 132, 9, group=128) for p, (K, s, _) in _shapes("llama-2-7b").items()}
    assert got == {"qkv": (8, 2, 0, 0), "o": (32, 2, 0, 0), "gate_up": (4, 2, 1, 0), "down": (22, 2, 0, 0)}
    for name in ("llama-2-7b", "llama-3-8b", "mistral-7b-v0.1"):
        for K, sizes, _ in _shapes(name).values():
            for group in (128, 64, 32):
                cfg = cuda_gemv.default_config(K, sizes, 132, 9, group=group)
                kper = cuda_gemv.k_per(K, cfg.split, group)
                assert kper % group == 0 and kper <= 8 * group and (cfg.split - 1) * kper < K <= cfg.split * kper
    spec = cuda_gemv.spec_of(4096, (4096,), BF16, True, False, False, True, 1e-5, cuda_gemv.Config(4, 2, 1),
                             group=128)
    assert spec.cols == 256 and cuda_gemv.grid(spec) == 16 * 4
    src = cuda_gemv.kernel_source(spec)
    assert "#define INT4 1\n" in src and "#define GROUP 128\n" in src and "#define TILE 256\n" in src
    with pytest.raises(UserError, match="8 scale groups"):
        cuda_gemv.kernel_source(spec._replace(config=cuda_gemv.Config(2, 2, 1)))


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b"])
def test_every_int4_kernel_of_a_model_builds_for_sm90(name):
    """int4's launches (tensor cores: mma.sync in bf16 and fp16), dense and sparse, default configs and a counter
    tail, groups of 128 and 32, compile for sm_90."""
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    for proj, (K, sizes, glu_in) in _shapes(name).items():
        for dtype, sparse, group in ((BF16, True, 128), (torch.float16, False, 128), (BF16, False, 32)):
            cfg = cuda_gemv.default_config(K, sizes, 132, 9, group=group)
            for c in {cfg, cfg._replace(cluster=0)}:
                spec = cuda_gemv.spec_of(K, sizes, dtype, sparse, proj in ("qkv", "gate_up"), glu_in,
                                         proj in ("o", "down"), 1e-5, c, True, group=group)
                assert nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(spec), "sm_90")[:4] == b"\x7fELF"
