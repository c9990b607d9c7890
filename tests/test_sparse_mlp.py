"""kernels/sparse_mlp.py: the whole MLP of one token in one launch (gate/up, then down from a queue of work units)
against the reference and against the two launches it replaces; int8 weights; what it refuses. Interpreted on CPU."""
import pytest
import torch
import triton

from kernels import common, configs, reference, sparse_gemv, sparse_mlp
from kernels.formats import INT8, rtn_int8
from tests.kernel_cases import DEVICE, DTYPE_IDS, TOL, C, grid, halfway_thresholds, poisoned, rel_err

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

MLP_CONFIGS = [C(32, 16, 1, 4, 1, 0), C(32, 32, 3, 4, 1, 0), C(16, 64, 2, 1, 1, 0)]


# Each shape meets every sparsity and every dtype once (two Latin squares, not the product: each case runs eight
# launch-config pairs in the interpreter, 15-45 s).
@pytest.mark.parametrize("D,I,sparsity,dtype", [
    pytest.param(D, I, s, dt, id=f"{D}x{I}-{s}-{DTYPE_IDS[dt]}", marks=pytest.mark.slow)
    for (D, I), cases in [((72, 96), [(0.0, F32), (0.5, F16), (0.95, BF16)]),
                          ((130, 200), [(0.0, BF16), (0.5, F32), (0.95, F16)])] for s, dt in cases])
def test_sparse_mlp_matches_reference(D, I, sparsity, dtype):
    """The whole MLP in one launch (batch 1, norm fused) against the reference, and against the two launches it
    replaces (gate/up partials, then down from them), which round where it rounds: odd sizes (the last gate/up
    tile and the last output slice partial), one to three programs along K, fp32 lists of kept rows."""
    interpreted_bf16 = common.INTERPRETED and dtype == torch.bfloat16
    x = torch.randn(1, D, device=DEVICE).to(dtype) * 3
    g = (torch.rand(D, device=DEVICE) + 0.5).to(dtype)
    ss_in = reference.sum_squares_ref(x, 16)
    w = (torch.randn(D, 2 * I, device=DEVICE) / D ** 0.5).to(dtype)
    wd = (torch.randn(I, D, device=DEVICE) / I ** 0.5).to(dtype)
    t = halfway_thresholds(reference.rms_norm_ref(x, g, 1e-5), sparsity).expand(2, D).contiguous()
    t[1] *= 0.9  # gate and up keep different inputs
    h = reference.sparse_gemv_ref(reference.rms_norm_ref(x, g, 1e-5), w, t, (I, I), glu=True)
    td = halfway_thresholds(h, sparsity)
    ref = reference.sparse_mlp_ref(x, w, t, wd, td, g, 1e-5)
    # each gate/up config with one down config, the two down configs taking turns (over the cases, each pair runs)
    all_configs = MLP_CONFIGS + [configs.default_config(1, D, (I, I), True, n_sm=4)]
    turn = int(sparsity * 20) + D
    for i, config in enumerate(all_configs):
        dcfg = (configs.default_down_config(D, I, config), configs.DownConfig(32, 4, 3))[(i + turn) % 2]
        out, ss = poisoned((1, D), dtype), torch.full((1, dcfg.n_red), float("nan"), device=DEVICE)
        counters = torch.zeros(configs.mlp_counters_size(I, config) + 8, dtype=torch.int32, device=DEVICE)
        sparse_mlp.launch_mlp(x, w, t, wd, td, counters, config, dcfg, out, ss, norm_weight=g, ss_in=ss_in)
        assert not out.isnan().any() and not counters.any(), (config, dcfg)
        red_d = triton.next_power_of_2(triton.cdiv(D, dcfg.n_red))
        assert rel_err(ss, reference.sum_squares_ref(out, red_d)) < 1e-5, (config, dcfg)
        # the two launches of the deferred path, with the same kernel code (and the interpreter's roundings)
        parts = sparse_gemv.sparse_gemv_parts(x, w, t, (I, I), config, glu=True, norm_weight=g, ss_in=ss_in)
        pair = sparse_gemv.launch(parts, wd, td, torch.zeros(64, dtype=torch.int32, device=DEVICE), (D,), False,
                                  C(32, 16, 2, 4, 1, 0), x, poisoned((1, D), dtype))
        assert rel_err(out, pair) < TOL.get(dtype, 1e-5) / 10, (config, dcfg)
        if not interpreted_bf16 or sparsity == 0:  # the interpreter truncates bf16 casts where GPUs round
            assert rel_err(out, ref) < (5e-2 if interpreted_bf16 else TOL.get(dtype, 1e-5)), (config, dcfg)
    config = configs.default_config(1, D, (I, I), True, n_sm=4)
    dcfg = configs.default_down_config(D, I, config)
    counters = torch.zeros(configs.mlp_counters_size(I, config), dtype=torch.int32, device=DEVICE)
    y, ss = sparse_mlp.sparse_mlp(x, w, t, wd, td, counters, config, dcfg, g, ss_in)
    assert y.dtype == dtype and ss.shape == (1, dcfg.n_red) and rel_err(y, out) < 1e-6 and not counters.any()


@pytest.mark.parametrize("sparsity", grid([0.0, 0.5, 0.95], quick=[(0.5,)]))
def test_sparse_mlp_int8(sparsity):
    """The one-launch MLP on int8 gate/up and down weights against the reference on the same weights."""
    D, I, dtype = 72, 96, torch.bfloat16
    x = torch.randn(1, D, device=DEVICE).to(dtype) * 3
    g = (torch.rand(D, device=DEVICE) + 0.5).to(dtype)
    ss_in = reference.sum_squares_ref(x, 16)
    q, s = rtn_int8(torch.randn(D, 2 * I, device=DEVICE) / D ** 0.5)
    qd, sd = rtn_int8(torch.randn(I, D, device=DEVICE) / I ** 0.5)
    t = halfway_thresholds(reference.rms_norm_ref(x, g, 1e-5), sparsity).expand(2, D).contiguous()
    h = reference.sparse_gemv_ref(reference.rms_norm_ref(x, g, 1e-5), q, t, (I, I), glu=True, fmt=INT8, scale=s)
    td = halfway_thresholds(h, sparsity)
    ref = reference.sparse_mlp_ref(x, q, t, qd, td, g, 1e-5, fmt=INT8, scale=s, scale_down=sd)
    for config in MLP_CONFIGS:
        dcfg = configs.default_down_config(D, I, config)
        counters = torch.zeros(configs.mlp_counters_size(I, config), dtype=torch.int32, device=DEVICE)
        y, ss = sparse_mlp.sparse_mlp(x, q, t, qd, td, counters, config, dcfg, g, ss_in, fmt=INT8, scale=s, scale_down=sd)
        assert not counters.any() and not y.isnan().any()
        assert rel_err(y, ref) < 5e-2 if common.INTERPRETED and sparsity else rel_err(y, ref) < 2e-2, config


def test_sparse_mlp_rejects_what_it_does_not_serve():
    x, w, wd = torch.randn(2, 64), torch.randn(64, 64), torch.randn(32, 64)
    cfg, dcfg = configs.default_config(1, 64, (32, 32), True, n_sm=4), configs.DownConfig(64, 8, 4)
    counters = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(AssertionError, match="batch 1"):
        sparse_mlp.launch_mlp(x, w, torch.zeros(2, 64), wd, torch.zeros(1, 32), counters, cfg, dcfg,
                               torch.empty(2, 64), torch.empty(1, 4))
