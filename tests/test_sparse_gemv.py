"""kernels/sparse_gemv.py and kernels/sparse_gemv_batch.py against their PyTorch references (kernels/reference.py):
batch 1 (the kept-row list, and rows in order when dense) and 2-8 rows (tensor cores); float, int8 and int4 weights;
the LM head; RMSNorm fused from the producer's sums of squares; unreduced split-K partials, and down fed gate/up's
partials; skipped rows never read; the registered ops. Odd sizes, fp16/bf16/fp32, sparsity 0 / 0.5 / 0.95, scalar
and per-channel thresholds, poisoned outputs. On a machine without a GPU they run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); the sweeps' combinations beyond a few quick ones are marked slow."""
import pytest
import torch

from kernels import common, configs, reference, sparse_gemv
from kernels.formats import INT4, INT8, int4_group, rtn_int4, rtn_int8
from tests.kernel_cases import (CASES, DEVICE, INT4_CASES, TOL, C, configs_for, grid, pairwise, halfway_thresholds, poisoned,
                                rel_err, thresholds_for)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


# batch 1: the list path (0.5) and the rows-in-order path (0); the batch kernel (M = 3)
@pytest.mark.parametrize("case,sparsity,M,dtype", pairwise(list(CASES), [0.0, 0.5, 0.95], [1, 3], [F16, BF16],
                         quick=[("qkv", 0.5, 1, BF16), ("qkv", 0.5, 3, BF16)]))
def test_sparse_gemv_matches_reference(case, sparsity, M, dtype):
    check_sparse_gemv(case, sparsity, M, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("case", ["qkv", "gate_up", "down+residual"])
def test_sparse_gemv_float32(case, sparsity):
    """fp32 inputs keep their values in a second list (16-bit inputs ride in the list entries)."""
    check_sparse_gemv(case, sparsity, 1, torch.float32)


def check_sparse_gemv(case, sparsity, M, dtype):
    K, sizes, glu, has_res = CASES[case]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    res = torch.randn(M, sizes[0] if glu else sum(sizes), dtype=dtype, device=DEVICE) if has_res else None
    for per_channel in (False, True):
        t = thresholds_for(x, len(sizes), sparsity, per_channel)
        ref = reference.sparse_gemv_ref(x.float(), w.float(), t, sizes, glu=glu,
                                          residual=None if res is None else res.float())
        n_out = ref.shape[1]
        for config in configs_for(M, K, sizes, glu):
            counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
            out = poisoned((M, n_out), dtype)
            sparse_gemv.launch(x, w, t, counters, sizes, glu, config, res, out)
            assert not out.isnan().any(), f"unwritten outputs with {config}"
            assert rel_err(out, ref) < TOL.get(dtype, 1e-5), (config, per_channel)
            assert not counters.any(), "the tile counters must be left at zero"


@pytest.mark.parametrize("case,sparsity,M", pairwise(["qkv", "o+residual", "gate_up", "down+residual"], [0.0, 0.5, 0.95],
                                                  [1, 3], quick=[("gate_up", 0.5, 1)]))
def test_sparse_gemv_int8(case, sparsity, M):
    """int8 weights with a scale per output column (quantize.rtn_int8), bf16 inputs: the kernel against the
    reference on the same int8 weights; also unreduced partials (scaled) and, for down, gate/up's int8 partials
    as its input."""
    K, sizes, glu, has_res = CASES[case]
    dtype = torch.bfloat16
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    q, scale = rtn_int8(torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5)
    res = torch.randn(M, sizes[0] if glu else sum(sizes), dtype=dtype, device=DEVICE) if has_res else None
    t = thresholds_for(x, len(sizes), sparsity, True)
    ref = reference.sparse_gemv_ref(x, q, t, sizes, glu=glu, residual=res, fmt=INT8, scale=scale)
    for config in configs_for(M, K, sizes, glu, fmt=INT8):
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(tuple(ref.shape), dtype)
        sparse_gemv.launch(x, q, t, counters, sizes, glu, config, res, out, fmt=INT8, scale=scale)
        assert not out.isnan().any() and not counters.any(), config
        assert rel_err(out, ref) < 2e-2, config
        if not has_res:
            P = configs.k_layout(K, config)[1]
            parts = torch.full((P, 2 if glu else 1, M, ref.shape[1]), float("nan"), device=DEVICE)
            sparse_gemv.launch(x, q, t, None, sizes, glu, config, None, parts, partial_out=True, fmt=INT8, scale=scale)
            assert rel_err(reference.parts_ref(parts, glu, dtype), ref) < 2e-2, config
    if glu:  # down (int8) from these partials
        qd, sd = rtn_int8(torch.randn(sizes[0], 40, device=DEVICE) / sizes[0] ** 0.5)
        h = reference.parts_ref(parts, True, dtype)
        td = halfway_thresholds(h, sparsity)
        r = torch.randn(M, 40, dtype=dtype, device=DEVICE)
        y = sparse_gemv.sparse_gemv(parts, qd, td, (40,), torch.zeros(64, dtype=torch.int32, device=DEVICE),
                                    configs_for(M, sizes[0], (40,), False, fmt=INT8)[-1], residual=r, fmt=INT8, scale=sd)
        assert y.dtype == dtype  # (the interpreter truncates bf16 casts where GPUs round: h differs by an ulp)
        tol = 5e-2 if common.INTERPRETED else 2e-2
        assert rel_err(y, reference.sparse_gemv_ref(h, qd, td, (40,), residual=r, fmt=INT8, scale=sd)) < tol



@pytest.mark.parametrize("case,sparsity,M,dtype", pairwise(list(INT4_CASES), [0.0, 0.5, 0.95], [1, 3], [F16, F32],
                                                        quick=[("gate_up", 0.5, 1, F16)]))
def test_sparse_gemv_int4(case, sparsity, M, dtype):
    """int4 weights (quantize.rtn_int4: eight to a word, a scale and offset per group of inputs): the kernel against
    the reference on the same weights (dequantized in float32); configs whose steps are smaller than a group, as
    large as one, and K ranges of one or several groups; also unreduced partials and, for down, gate/up's
    partials as its input."""
    K, sizes, glu, has_res = INT4_CASES[case]
    group = int4_group(K)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    q, scale = rtn_int4(torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5, group)
    res = torch.randn(M, sizes[0] if glu else sum(sizes), dtype=dtype, device=DEVICE) if has_res else None
    t = thresholds_for(x, len(sizes), sparsity, True)
    ref = reference.sparse_gemv_ref(x.float(), q, t, sizes, glu=glu, residual=None if res is None else res.float(),
                                    fmt=INT4, scale=scale)
    tol = TOL.get(dtype, 1e-5)
    fma = [C(16, 16, 1, 4, 1, 0), C(32, 32, 2, 1, 1, 0), C(8, 32, 3, 4, 1, 0)] if M == 1 else []
    for config in fma + [C(16, 16, 1, 4, 1, 1), configs.default_config(M, K, sizes, glu, n_sm=4, group=group)]:
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(tuple(ref.shape), dtype)
        sparse_gemv.launch(x, q, t, counters, sizes, glu, config, res, out, fmt=INT4, scale=scale)
        assert not out.isnan().any() and not counters.any(), config
        assert rel_err(out, ref) < tol, config
        if not has_res:
            P = configs.k_layout(K, config, group)[1]
            parts = torch.full((P, 2 if glu else 1, M, ref.shape[1]), float("nan"), device=DEVICE)
            sparse_gemv.launch(x, q, t, None, sizes, glu, config, None, parts, partial_out=True, fmt=INT4, scale=scale)
            assert rel_err(reference.parts_ref(parts, glu, dtype), ref) < tol, config
    if glu:  # down (int4, groups of 16 inputs) from these partials
        qd, sd = rtn_int4(torch.randn(sizes[0], 48, device=DEVICE) / sizes[0] ** 0.5, 16)
        h = reference.parts_ref(parts, True, dtype)
        td = halfway_thresholds(h, sparsity)
        r = torch.randn(M, 48, dtype=dtype, device=DEVICE)
        y = sparse_gemv.sparse_gemv(parts, qd, td, (48,), torch.zeros(64, dtype=torch.int32, device=DEVICE),
                                    C(16, 16, 2, 4, 1, int(M > 1)), residual=r, fmt=INT4, scale=sd)
        assert rel_err(y, reference.sparse_gemv_ref(h.float(), qd, td, (48,), residual=r.float(), fmt=INT4, scale=sd)) < tol


@pytest.mark.parametrize("V,M", grid([512, 600], [1, 3], quick=[(512, 1)]))
def test_int8_lm_head(V, M):
    """The int8 LM head as the decode step runs it: zero thresholds (every row streamed), the final RMSNorm fused
    from the last layer's sums of squares, the head's own launch config (256-column tiles; two K ranges and one)
    and a small one, against the reference on the same int8 weights."""
    K, dtype = 200, torch.bfloat16
    x = torch.randn(M, K, dtype=dtype, device=DEVICE) * 3
    g = (torch.rand(K, device=DEVICE) + 0.5).to(dtype)
    q, scale = rtn_int8(torch.randn(K, V, device=DEVICE) / K ** 0.5)
    t = torch.zeros(1, K, device=DEVICE)
    ref = reference.sparse_gemv_ref(reference.rms_norm_ref(x, g, 1e-5), q, t, (V,), fmt=INT8, scale=scale)
    head = configs.default_config(M, K, (V,), False, n_sm=4, fmt=INT8, head=True)
    cfgs = [head, head._replace(split_k=2), C(64, 32, 1, 4, 1, 0)] if M == 1 else [head]
    assert M > 1 or head.block_n == (256 if V % 256 == 0 else 64)
    for config in cfgs:
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(tuple(ref.shape), dtype)
        sparse_gemv.launch(x, q, t, counters, (V,), False, config, None, out, norm_weight=g,
                           ss_in=reference.sum_squares_ref(x, 32), eps=1e-5, fmt=INT8, scale=scale)
        assert not out.isnan().any() and not counters.any(), config
        assert rel_err(out, ref) < 2e-2, config


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_sparse_gemv_k_range_over_several_compaction_chunks(sparsity, glu, dtype):
    """A K range longer than one compaction chunk (2048 inputs, e.g. Llama-2-70B's gate/up): the kept list and
    its positions carry over from chunk to chunk."""
    K, sizes = 2100, ((16, 16) if glu else (16,))
    x = torch.randn(1, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    t = thresholds_for(x, len(sizes), sparsity, True)
    ref = reference.sparse_gemv_ref(x.float(), w.float(), t, sizes, glu=glu)
    config = C(16, 64, 1, 4, 1, 0)
    assert configs.k_layout(K, config)[0] > 2048
    out = poisoned(tuple(ref.shape), dtype)
    sparse_gemv.launch(x, w, t, torch.zeros(4, dtype=torch.int32, device=DEVICE), sizes, glu, config, None, out)
    assert rel_err(out, ref) < TOL.get(dtype, 1e-5)


@pytest.mark.parametrize("M", [1, 2])
def test_sparse_gemv_skips_masked_rows(M):
    """Rows whose input is below threshold in every batch row must not be read: poison them."""
    K, N = 64, 40
    x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
    x[:, ::2] = 0.01  # below threshold in every row
    w = torch.randn(K, N, device=DEVICE, dtype=torch.float16) / 8
    t = torch.full((1, K), 0.05, device=DEVICE)
    ref = reference.sparse_gemv_ref(x.float(), w.float(), t, (N,))
    w[::2] = float("nan")  # any read of a skipped row would poison the result
    for config in ([C(16, 16, 2, 4, 1, 0), C(32, 16, 1, 1, 1, 0)] if M == 1 else [C(16, 16, 2, 4, 1, 1)]):
        out = poisoned((M, N), torch.float16)
        counters = torch.zeros(8, dtype=torch.int32, device=DEVICE)
        sparse_gemv.launch(x, w, t, counters, (N,), False, config, None, out)
        assert rel_err(out, ref) < 2e-3, config


def test_sparse_gemv_op_and_union_over_batch():
    """The registered op; a row kept by one batch row does not leak into another row's sum."""
    K, N = 48, 24
    x = torch.randn(2, K, device=DEVICE, dtype=torch.bfloat16)
    x[1, :24] = 0.001  # row 1 drops the first half, row 0 keeps it: loaded, but only row 0 may use it
    w = (torch.randn(K, N, device=DEVICE) / 7).to(torch.bfloat16)
    t = torch.full((1, K), 0.01, device=DEVICE)
    counters = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    y = sparse_gemv.sparse_gemv(x, w, t, (N,), counters, C(16, 16, 2, 4, 1, 1))
    ref = reference.sparse_gemv_ref(x.float(), w.float(), t, (N,))
    assert rel_err(y, ref) < 1.5e-2


@pytest.mark.parametrize("case,sparsity,M,dtype", pairwise(["qkv", "gate_up", "gate_up-even"], [0.0, 0.5], [1, 3],
                                                        [F32, F16, BF16], quick=[("gate_up", 0.5, 1, F16)]))
def test_sparse_gemv_fused_rmsnorm(case, sparsity, M, dtype):
    """RMSNorm inside the kernel: x is the raw residual stream, its sums of squares come from the producer
    (any column tiling: the consumer adds them up), thresholds apply to the normalised input."""
    interpreted = common.INTERPRETED and dtype == torch.bfloat16
    if interpreted and sparsity > 0:
        pytest.skip("Triton's interpreter truncates bf16 casts (GPUs round), which moves normalised activations "
                    "across thresholds; scripts/gpu_check.py covers this case on the GPU")
    tol = 5e-2 if interpreted else TOL.get(dtype, 1e-5)  # two more truncated roundings than the unfused kernel
    K, sizes, glu, _ = CASES[case]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE) * 3
    g = (torch.rand(K, device=DEVICE) + 0.5).to(dtype)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    xn = reference.rms_norm_ref(x, g, 1e-5)
    # a threshold halfway between two activations: the interpreter truncates bf16 casts where GPUs round, and
    # an activation sitting on the threshold would flip
    v = xn.abs().float().flatten().sort().values
    i = max(1, int(sparsity * v.numel()))
    t = torch.full((len(sizes), K), float((v[i - 1] + v[i]) / 2) if sparsity else 0.0, device=DEVICE)
    # the normalised input rounded to the dtype, as the model's RMSNorm and the kernel round it
    ref = reference.sparse_gemv_ref(xn.float(), w.float(), t, sizes, glu=glu)
    for config, tiles in zip(configs_for(M, K, sizes, glu), (16, 7, 32, 3, 64, 128)):
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        out = poisoned(ref.shape, dtype)
        sparse_gemv.launch(x, w, t, counters, sizes, glu, config, None, out, norm_weight=g,
                           ss_in=reference.sum_squares_ref(x, tiles), eps=1e-5)
        assert not out.isnan().any()
        assert rel_err(out, ref) < tol, config


@pytest.mark.parametrize("dtype,M", grid([F32, F16], [1, 3], quick=[(F16, 1)]))
def test_residual_projection_feeds_the_next_norm(dtype, M):
    """A residual projection's per-tile sums of squares (ss_out) are those of the stream it writes, and a
    following projection normalising with them matches RMSNorm of that stream."""
    K, N = 72, 80
    x, res = torch.randn(M, K, dtype=dtype, device=DEVICE), torch.randn(M, N, dtype=dtype, device=DEVICE) * 3
    w = (torch.randn(K, N, device=DEVICE) / K ** 0.5).to(dtype)
    t = torch.zeros(1, K, device=DEVICE)
    g = (torch.rand(N, device=DEVICE) + 0.5).to(dtype)
    sizes2 = (32, 16, 16)
    w2 = (torch.randn(N, sum(sizes2), device=DEVICE) / N ** 0.5).to(dtype)
    t2 = torch.full((3, N), 0.3, device=DEVICE)
    for config in configs_for(M, K, (N,), False):
        n_tiles = configs.counters_size((N,), False, config.block_n)
        h, ss = poisoned((M, N), dtype), torch.full((M, n_tiles), float("nan"), device=DEVICE)
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        sparse_gemv.launch(x, w, t, counters, (N,), False, config, res, h, ss_out=ss)
        ref = reference.sparse_gemv_ref(x.float(), w.float(), t, (N,), residual=res.float())
        assert rel_err(h, ref) < TOL.get(dtype, 1e-5)
        assert rel_err(ss, reference.sum_squares_ref(h, config.block_n)) < 1e-5, config
        y = poisoned((M, sum(sizes2)), dtype)
        sparse_gemv.launch(h, w2, t2, counters, sizes2, False, config, None, y, norm_weight=g, ss_in=ss)
        hn = reference.rms_norm_ref(h, g, 1e-5)  # rounded where the model rounds
        ref2 = reference.sparse_gemv_ref(hn.float(), w2.float(), t2, sizes2)
        assert rel_err(y, ref2) < TOL.get(dtype, 1e-5), config
        assert not counters.any()


@pytest.mark.parametrize("case,sparsity,M,dtype", pairwise(["qkv", "gate_up"], [0.0, 0.5, 0.95], [1, 3], [F32, F16, BF16],
                                                        quick=[("gate_up", 0.5, 1, BF16)]))
def test_sparse_gemv_partial_sums(case, sparsity, M, dtype):
    """partial_out: one unreduced float32 partial per program along K, which add up to the projection (gate
    and up before the GLU); every partial is written."""
    K, sizes, glu, _ = CASES[case]
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = (torch.randn(K, sum(sizes), device=DEVICE) / K ** 0.5).to(dtype)
    t = thresholds_for(x, len(sizes), sparsity, per_channel=True)
    n_out = sizes[0] if glu else sum(sizes)
    halves = reference.sparse_gemv_ref(x.float(), w.float(), t, sizes).view(M, -1, n_out).transpose(0, 1)
    for config in configs_for(M, K, sizes, glu):
        P = configs.k_layout(K, config)[1]
        parts = poisoned((P, 2 if glu else 1, M, n_out), torch.float32)
        sparse_gemv.launch(x, w, t, None, sizes, glu, config, None, parts, partial_out=True)
        assert not parts.isnan().any(), f"unwritten partials with {config}"
        assert rel_err(parts.sum(0), halves) < 1e-5, config  # float32 sums of the same products
        # the op returns the same partials
        op = sparse_gemv.sparse_gemv_parts(x, w, t, sizes, config, glu=glu)
        assert op.shape == parts.shape and rel_err(op, parts) < 1e-6


@pytest.mark.parametrize("sparsity,M,dtype", grid([0.0, 0.5, 0.95], [1, 3], [F32, F16, BF16], quick=[(0.5, 1, F16)]))
def test_down_projection_from_gate_up_partials(sparsity, M, dtype):
    """The down kernel fed gate/up partials [P, 2, M, K] sums them and applies the GLU as it loads its input:
    the result is the down projection (with residual and sums of squares) of silu(gate) * up."""
    if common.INTERPRETED and dtype == torch.bfloat16 and sparsity > 0:
        pytest.skip("Triton's interpreter truncates bf16 casts (GPUs round), which moves the gated inputs across "
                    "thresholds; scripts/gpu_check.py covers this case on the GPU")
    K, N = 131, 45
    parts = torch.randn(3, 2, M, K, device=DEVICE) * 2
    h = reference.parts_ref(parts, True, dtype)  # [M, K]: what the kernel sees, rounded as the GLU rounds
    v = h.abs().float().flatten().sort().values  # thresholds halfway between two inputs (see the norm test)
    i = max(1, int(sparsity * v.numel()))
    t = torch.full((1, K), float((v[i - 1] + v[i]) / 2) if sparsity else 0.0, device=DEVICE)
    w = (torch.randn(K, N, device=DEVICE) / K ** 0.5).to(dtype)
    res = torch.randn(M, N, dtype=dtype, device=DEVICE)
    ref = reference.sparse_gemv_ref(h.float(), w.float(), t, (N,), residual=res.float())
    for config in configs_for(M, K, (N,), False):
        n_tiles = configs.counters_size((N,), False, config.block_n)
        out, ss = poisoned((M, N), dtype), torch.full((M, n_tiles), float("nan"), device=DEVICE)
        counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        sparse_gemv.launch(parts, w, t, counters, (N,), False, config, res, out, ss_out=ss)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL.get(dtype, 1e-5), config
        assert rel_err(ss, reference.sum_squares_ref(out, config.block_n)) < 1e-5, config
        assert not counters.any()
    y, _ = sparse_gemv.sparse_gemv_ss(parts, w, t, (N,), counters, configs_for(M, K, (N,), False)[-1], res)
    assert y.dtype == dtype and rel_err(y, ref) < TOL.get(dtype, 1e-5)
