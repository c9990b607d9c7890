"""kernels/gluon_gemv.py on the CPU: its plain-PyTorch reference against the Triton kernel's partials (interpreter),
its launch configs, what a launch checks and allocates. Gluon has no CPU interpreter: the kernel itself is built
for sm_90 by tests/compile_checks.py and test_sm90.py, and run against the reference by scripts/gpu_check.py."""
import pytest
import torch

from kernels import configs, gluon_gemv, reference, sparse_gemv
from kernels.common import skip
from kernels.formats import INT4


def quantized(K: int, N: int, group: int) -> tuple:
    return INT4.quantize(torch.randn(K, N) / K ** 0.5, group)


@pytest.mark.parametrize("sizes,glu,group,norm", [((128, 64, 64), False, 64, True), ((96, 96), True, 32, False),
                                                  ((160,), False, 32, True)], ids=["qkv-norm", "glu", "one-norm"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_reference_is_the_sum_of_the_triton_partials(sizes, glu, group, norm, s):
    """int4_parts_ref (what gpu_check holds the Gluon kernel to) against the Triton kernel's split-K partials, each
    segment under its own thresholds, the norm fused or not (float16: the interpreter truncates bfloat16 casts)."""
    K = 256
    q, scale = quantized(K, sum(sizes), group)
    x = torch.randn(1, K, dtype=torch.float16) * (3 if norm else 1)
    g = (torch.rand(K) + 0.5).half() if norm else None
    ss = reference.sum_squares_ref(x, 128) if norm else None
    xin = reference.rms_norm_ref(x, g, 1e-5) if norm else x
    t = torch.quantile(xin.abs().float(), s) * (torch.rand(len(sizes), K) * 0.4 + 0.8) if s else \
        torch.zeros(len(sizes), K)
    cfg = configs.default_config(1, K, sizes, glu, 4, INT4, group=group)
    parts = sparse_gemv.sparse_gemv_parts(x, q, t, sizes, cfg, glu, g, ss, fmt=INT4, scale=scale)
    ref = gluon_gemv.int4_parts_ref(x, q, t, sizes, scale, g)
    assert ref.shape == (1, sum(sizes))
    got = parts.sum(0).reshape(1, -1)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_default_config():
    """Llama-2-7B's q/k/v and gate/up: 256-column tiles, 8 rows of 2 words per thread (64-row steps), three programs
    per SM (docs/perf-notes.md session 18); shapes it does not take (segments not whole 128-column tiles, groups
    of 32) go to the Triton kernel."""
    cfg = gluon_gemv.default_config(4096, (4096,) * 3, 128, 132)
    assert cfg == gluon_gemv.Config(256, 8, 2, 4, 8)
    assert gluon_gemv.default_config(4096, (11008,) * 2, 128, 132).split == 5
    small = gluon_gemv.default_config(1152, (384, 128, 128), 64, 132)
    assert small.block_n == 128 and small.rpt * 32 // (128 // 8 // small.vec) * small.warps == 64
    assert small.split == 1152 // 64  # never more K ranges than scale groups
    assert gluon_gemv.default_config(4096, (4096, 1024, 96), 128, 132) is None
    assert gluon_gemv.default_config(4096, (4096,), 32, 132) is None


def test_launch_allocates_partials_and_checks_inputs():
    """The op's fake (no launch): partials [P, N] float32 with P the K ranges of whole groups, viewed as the
    consumers read them; inputs it does not take are refused."""
    K, sizes = 1152, (384, 128, 128)
    q, scale = quantized(K, sum(sizes), 64)
    cfg = gluon_gemv.default_config(K, sizes, 64, 4)
    x, t = torch.randn(1, K, dtype=torch.bfloat16), torch.zeros(3, K)
    out = gluon_gemv.launch(x, q, t, sizes, cfg, scale, wrap=skip)
    k_split, P = gluon_gemv.k_layout(K, 64, cfg.split)
    assert out.shape == (P, 640) and out.dtype == torch.float32 and k_split % 64 == 0 and P * k_split >= K
    assert gluon_gemv.OPS.fake_parts(x, q, t, None, None, 1e-5, sizes, False, list(cfg), scale).shape == (P, 1, 1, 640)
    qg, sg = quantized(K, 256, 64)
    glu_cfg = gluon_gemv.default_config(K, (128, 128), 64, 4)
    assert gluon_gemv.OPS.fake_parts(x, qg, torch.zeros(2, K), None, None, 1e-5, (128, 128), True, list(glu_cfg),
                             sg).shape[1:] == (2, 1, 128)
    with pytest.raises(AssertionError):
        gluon_gemv.launch(x.float(), q, t, sizes, cfg, scale, wrap=skip)  # 16-bit inputs only
    with pytest.raises(AssertionError):
        gluon_gemv.launch(x, q, t, sizes, cfg, scale, norm_weight=torch.ones(K, dtype=torch.bfloat16), wrap=skip)


@pytest.mark.parametrize("from_parts", [False, True], ids=["o", "down"])
def test_residual_reference_matches_the_triton_kernel(from_parts):
    """What gpu_check holds the residual launch (o; down from gate/up's partials) to: reference.sparse_gemv_ref with
    the residual (the input made from partials by reference.parts_ref) and its sums of squares, against the Triton
    kernel's (float16, interpreter)."""
    K, N, dtype = 256, 128, torch.float16
    q, scale = quantized(K, N, 64)
    parts = torch.randn(3, 2, 1, K) * 2
    x = parts if from_parts else torch.randn(1, K, dtype=dtype)
    xin = reference.parts_ref(parts, True, dtype) if from_parts else x
    t = torch.quantile(xin.abs().float(), 0.5).expand(1, K).contiguous()
    res = torch.randn(1, N, dtype=dtype)
    cfg = configs.default_config(1, K, (N,), False, 4, INT4, group=64)
    y, ss = sparse_gemv.sparse_gemv_ss(x, q, t, (N,), torch.zeros(64, dtype=torch.int32), cfg, res, fmt=INT4,
                                       scale=scale)
    ref = reference.sparse_gemv_ref(xin, q, t, (N,), residual=res, fmt=INT4, scale=scale)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 3e-3
    assert torch.allclose(ss.sum(), reference.sum_squares_ref(ref, 128).sum(), rtol=1e-2)


def test_residual_launch_allocates_and_checks():
    """The residual launch's fake: (y like the residual, sums of squares [1, tiles]); the counters it needs, at most
    one step of K ranges (their partials are reduced in one load), gate/up partials only with a residual."""
    K, N = 1152, 256
    q, scale = quantized(K, N, 64)
    cfg = gluon_gemv.default_config(K, (N,), 64, 4)
    res = torch.randn(1, N, dtype=torch.bfloat16)
    counters = torch.zeros(8, dtype=torch.int32)
    y, ss = gluon_gemv.OPS.fake_residual(torch.randn(3, 2, 1, K), q, torch.zeros(1, K), counters, res, (N,), list(cfg),
                                 scale)
    assert y.shape == (1, N) and y.dtype == torch.bfloat16 and ss.shape == (1, N // cfg.block_n)
    with pytest.raises(AssertionError):
        gluon_gemv.launch(torch.randn(3, 2, 1, K), q, torch.zeros(1, K), (N,), cfg, scale, wrap=skip)
    with pytest.raises(AssertionError):
        gluon_gemv.launch(torch.randn(1, K, dtype=torch.bfloat16), q, torch.zeros(1, K), (N,), cfg, scale, wrap=skip,
                          residual=res)  # no counters
    K = 64 * 100
    q, scale = quantized(K, N, 64)
    with pytest.raises(AssertionError):  # more K ranges than one step's slots reduce
        gluon_gemv.launch(torch.randn(1, K, dtype=torch.bfloat16), q, torch.zeros(1, K), (N,), cfg._replace(split=200),
                          scale, wrap=skip, residual=res, counters=counters)
