"""awq.py and quantize.py --mode awq: the scales fold exactly (the float model is unchanged), the search beats
round-to-nearest where activations have outlier channels, thresholds of the source model drop the same inputs, and
the file loads back."""
import copy

import pytest
import torch

from awq import awq_quantize, awq_scale, linear_groups
from calibration import BlockProbe, collect, column_norms, hist_quantiles
from checkpoint import read_metadata, save_checkpoint
from errors import UserError
from kernels.formats import AWQ, INT4
from loading import load_model, random_model, random_tensors
from model import ModelArgs, SparseLinear
from quantization import quant_file, quantize_model, save_quantized
from sparsity import (LEVELS, PROJECTIONS, TARGETS, Calibration, CRITERIA, apply_thresholds, capture_inputs, crit_key,
                      measure_sparsity)

ARGS = dict(dim=128, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=192, vocab_size=300, max_seq_len=128)


def outlier_model(seed=0):
    """A random fp32 GQA model whose norms make a few input channels ten times larger (as trained models have)."""
    model = random_model(ModelArgs(**ARGS), "cpu", torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for norm in (layer.attention_norm, layer.ffn_norm):
            norm.weight[torch.randperm(128, generator=g)[:6]] *= 10
    return model


def batches(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (2, 48), generator=g) for _ in range(n)]


def logits(model, idx):
    model.setup_caches(idx.shape[0], idx.shape[1])
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1]), sparse_from=None)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_scales_fold_exactly_and_beat_round_to_nearest():
    src = outlier_model()
    held_out = batches(9, 1)[0]
    ref = logits(src, held_out)
    scaled = copy.deepcopy(src)
    report = awq_scale(scaled, batches(1), grid=10)
    assert set(report) == {(i, g) for i in range(2) for g in ("qkv", "o", "gate_up", "down")}
    assert rel(logits(scaled, held_out), ref) < 1e-5  # norms, v and up columns absorb 1/s
    assert any(alpha > 0 for alpha, _ in report.values())  # the outlier channels get scales
    assert all(isinstance(m.input_scale, torch.Tensor) for m in scaled.modules()
               if isinstance(m, SparseLinear) and not m.head)
    quantize_model(scaled, AWQ)
    rtn = quantize_model(copy.deepcopy(src), INT4)
    assert rel(logits(scaled, held_out), ref) < 0.97 * rel(logits(rtn, held_out), ref)  # seeds fixed: 0.477 vs 0.507


def tables(model, idx) -> Calibration:
    """A calibration with exact |x| quantiles of `model` on idx (uniform magnitude thresholds only)."""
    cap = capture_inputs(model, idx)
    L, levels = model.args.n_layer, LEVELS.double()
    q = torch.zeros(L, len(PROJECTIONS), len(LEVELS))
    for layer, name, mod, _ in model.sparse_modules():
        q[layer, PROJECTIONS.index(name)] = torch.quantile(cap[mod].flatten()[:100000].double(), levels).float()
    shapes = model.args.linear_shapes()
    t = {f"quantiles.{crit_key(c)}": q for c in CRITERIA}
    t.update({f"greedy.{crit_key(c)}": torch.zeros(L, len(TARGETS), len(PROJECTIONS)) for c in CRITERIA})
    t.update({f"norms.{p}": torch.ones(L, shapes[p][0]) for p in PROJECTIONS})
    t["quantiles.cats"] = torch.zeros(L, len(LEVELS))
    return Calibration(t, {})


def test_source_thresholds_drop_the_same_inputs():
    src = outlier_model(1)
    calib = tables(src, batches(2)[0])
    scaled = copy.deepcopy(src)
    awq_scale(scaled, batches(3), grid=10)
    idx = batches(4, 1)[0]
    got = []
    for m in (src, scaled):
        apply_thresholds(m, calib, 0.5, "uniform", "magnitude")
        got.append(measure_sparsity(m, idx))
    assert all(abs(got[0][k] - got[1][k]) < 2e-3 for k in got[0]), (got[0], got[1])
    assert abs(sum(got[1].values()) / len(got[1]) - 0.5) < 0.1


def test_awq_file_round_trip(tmp_path):
    args = ModelArgs(**ARGS)
    save_checkpoint(tmp_path, args, random_tensors(args, torch.float32, "cpu", 0), torch.float32)
    with pytest.raises(UserError, match="quantize.py --checkpoint .* --mode awq"):
        load_model(tmp_path, quant=AWQ)
    model = load_model(tmp_path)
    awq_quantize(model, batches(5), grid=4, progress=False)
    path = save_quantized(model, tmp_path, read_metadata(tmp_path), AWQ)
    assert path.name == quant_file(AWQ) == "model-awq.safetensors"
    back = load_model(tmp_path, quant=AWQ)
    assert back.layers[0].feed_forward.w2.fmt is AWQ and back.layers[0].feed_forward.w2.input_scale is not None
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert back.fingerprint == load_model(tmp_path).fingerprint  # the source's calibration applies


def test_clip_rounding_is_the_formats_and_clipping_only_lowers_the_error():
    """round_int4 (what search_clip scores) rounds as the file's rtn_int4; each group's share of the output error
    after search_clip is no larger than unclipped round-to-nearest's (ratio 1 is a candidate), and the output error
    as a whole drops; clipping only shrinks weights."""
    from awq import search_clip
    from kernels.formats import dequantize_int4, round_int4, rtn_int4
    g = torch.Generator().manual_seed(0)
    K, N, group = 256, 96, 64
    w = torch.randn(K, N, generator=g) / 16
    w[5, 3] = 2.0  # an outlier in group 0 of column 3
    x = torch.randn(300, K, generator=g)
    wg = w.reshape(K // group, group, N)
    q, s, m = round_int4(wg, wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0))
    assert torch.equal((q * s[:, None] + m[:, None]).reshape(K, N), dequantize_int4(*rtn_int4(w, group)))

    def shares(v):  # [G, N]: each group's share of the output error
        dw = (dequantize_int4(*rtn_int4(v, group)) - w).reshape(K // group, group, N)
        return torch.einsum("tgk,gkn->tgn", x.reshape(-1, K // group, group), dw).pow(2).sum(0)

    def err(v):
        return (x @ (dequantize_int4(*rtn_int4(v, group)) - w)).pow(2).sum()

    clipped = search_clip(x, w, group, rows=300)
    assert (shares(clipped) <= shares(w) * (1 + 1e-5) + 1e-9).all()
    assert err(clipped) < 0.95 * err(w)  # seeded: 242.7 against 263.5
    assert clipped.abs().le(w.abs()).all() and not torch.equal(clipped, w)


def test_awq_groups_of_32_round_trip(tmp_path):
    """quantize.py --mode awq --group 32: the file names its scheme, and --quant awq loads that variant back."""
    from kernels.formats import awq_variant
    from quantize import main as quantize_main
    args = ModelArgs(**ARGS)
    save_checkpoint(tmp_path, args, random_tensors(args, torch.float32, "cpu", 0), torch.float32)
    model = load_model(tmp_path)
    g32 = awq_variant(32)
    awq_quantize(model, batches(6), g32, grid=4, progress=False)
    save_quantized(model, tmp_path, read_metadata(tmp_path), g32)
    back = load_model(tmp_path, quant=AWQ)
    w2 = back.layers[0].feed_forward.w2
    assert w2.fmt == g32 and w2.scale.shape == (2, 192 // 32, 128) and w2.input_scale is not None
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(UserError, match="--group applies to --mode awq"):
        quantize_main(["--checkpoint", str(tmp_path), "--mode", "int4", "--group", "32"])
    with pytest.raises(UserError, match="groups of 128, 64 or 32"):
        quantize_main(["--checkpoint", str(tmp_path), "--mode", "awq", "--group", "16"])
    with pytest.raises(UserError, match=r"--sparse-level must be in \[0, 1\)"):
        quantize_main(["--checkpoint", str(tmp_path), "--mode", "awq", "--sparse-level", "1.5"])


def test_gptq_rounding_beats_round_to_nearest_on_correlated_inputs():
    """gptq_int4 writes rtn_int4's format (words and float16 group scales, q in 0..15) and, where inputs are
    correlated (as activations are), its output error on them is a fraction of round-to-nearest's; on inputs it
    has never seen from the same distribution too."""
    from awq import gptq_int4, gram
    from kernels.formats import dequantize_int4, rtn_int4, unpack_int4
    g = torch.Generator().manual_seed(0)
    K, N, group = 256, 64, 128
    mix = torch.randn(32, K, generator=g)
    x, held = [torch.randn(n, 32, generator=g) @ mix + 0.3 * torch.randn(n, K, generator=g) for n in (2048, 512)]
    w = torch.randn(K, N, generator=g) / 16
    h = gram(x)
    q, scale = gptq_int4(w, h, group)
    assert h.equal(gram(x))  # not changed
    assert q.dtype == torch.int32 and q.shape == (K, N // 8) and scale.dtype == torch.float16
    assert scale.shape == (2, K // group, N) and unpack_int4(q).max() <= 15

    def err(v, data):
        return ((data @ (v - w)).pow(2).sum() / (data @ w).pow(2).sum()).item()

    rtn = dequantize_int4(*rtn_int4(w, group))
    assert err(dequantize_int4(q, scale), x) < 0.2 * err(rtn, x)
    assert err(dequantize_int4(q, scale), held) < 0.5 * err(rtn, held)
    # in input order (ranges as the feedback leaves them): also far under round-to-nearest, above act order here
    q_in, scale_in = gptq_int4(w, h, group, act_order=False)
    assert err(dequantize_int4(q, scale), x) < err(dequantize_int4(q_in, scale_in), x) < 0.2 * err(rtn, x)


def test_refit_scales_recovers_exact_scales_and_only_lowers_the_error():
    """refit_scales: weights that are exactly codes times float16 scales plus offsets get those scales back from
    wrong ones; on GPTQ's output it lowers the output error on the fitted inputs, keeps the codes and the format,
    and lowers it on held-out inputs of the same distribution too."""
    from awq import gptq_int4, gram, refit_scales
    from kernels.formats import dequantize_int4, pack_int4
    g = torch.Generator().manual_seed(0)
    K, N, group = 256, 64, 64
    mix = torch.randn(32, K, generator=g)
    x, held = [torch.randn(n, 32, generator=g) @ mix + 0.3 * torch.randn(n, K, generator=g) for n in (2048, 512)]
    codes = torch.randint(0, 16, (K, N), generator=g)
    exact = torch.stack([torch.rand(K // group, N, generator=g) / 50 + 0.01,
                         -torch.rand(K // group, N, generator=g) / 5]).half()
    w = dequantize_int4(pack_int4(codes), exact)
    fit = refit_scales(w, gram(x), pack_int4(codes), (exact.float() * 1.1).half())
    assert torch.allclose(fit.float(), exact.float(), rtol=2e-3, atol=1e-4)

    w = torch.randn(K, N, generator=g) / 16
    q, scale = gptq_int4(w, gram(x), group)
    fit = refit_scales(w, gram(x), q, scale)
    assert fit.dtype == torch.float16 and fit.shape == scale.shape

    def err(sc, data):
        return ((data @ (dequantize_int4(q, sc) - w)).pow(2).sum(0))  # per column

    assert (err(fit, x) <= err(scale, x)).all() and err(fit, x).sum() < 0.95 * err(scale, x).sum()
    assert err(fit, held).sum() < err(scale, held).sum()


def test_awq_with_gptq_beats_awq_rounded_to_nearest():
    src = outlier_model(2)
    held_out = batches(11, 1)[0]
    ref = logits(src, held_out)
    errs = []
    for gptq in (False, True):
        m = copy.deepcopy(src)
        awq_quantize(m, batches(12, 4), grid=4, progress=False, gptq=gptq)
        assert all(lin.fmt is AWQ for lin in m.modules() if isinstance(lin, SparseLinear) and not lin.head)
        errs.append(rel(logits(m, held_out), ref))
    assert errs[1] < errs[0], errs


def test_layer_inputs_are_the_float_models_whatever_the_caller_does_to_earlier_layers():
    """layer_inputs yields each layer's linear inputs as one dense forward of the float model captures them
    (capture_inputs: their magnitudes), one layer at a time, even when the caller quantizes each layer before
    asking for the next (the next layer's inputs were made before)."""
    from awq import layer_inputs
    src, data = outlier_model(3), batches(13, 2)
    whole = {}
    for idx in data:
        for mod, a in capture_inputs(src, idx).items():
            whole.setdefault(mod, []).append(a)
    whole = {m: torch.cat(a) for m, a in whole.items()}
    model = copy.deepcopy(src)
    twins = dict(zip(model.modules(), src.modules()))
    seen = []
    for i, inputs in layer_inputs(model, data, 10 ** 6):
        assert set(inputs) == {lin for _, lin in linear_groups(model.layers[i])}
        for mod, x in inputs.items():
            torch.testing.assert_close(x.abs(), whole[twins[mod]], rtol=1e-5, atol=1e-5)
        for _, lin in linear_groups(model.layers[i]):  # as awq_scale leaves it: far from the float model
            lin.weight.mul_(-3.0)
        seen.append(i)
    assert seen == [0, 1]
    assert layer_inputs(model, data, 5).__next__()[1][model.layers[0].attention.wqkv].shape == (5, 128)


def test_calibrating_awq_weights_gives_the_source_models_statistics():
    """calibrate.py --quant awq: statistics, column norms and the greedy search's block errors are in the source
    model's units, so an AWQ-scaled model (the same function) calibrates as its source does; quantized, its
    norms are close."""
    src = outlier_model(2)
    scaled = copy.deepcopy(src)
    awq_scale(scaled, batches(3), grid=10)
    idx = batches(5, 1)[0]
    got = []
    for m in (src, scaled):
        m.setup_caches(2, 48)
        norms = column_norms(m)
        hists, cats, inputs = collect(m, [idx], 8, norms, 1)
        got.append((norms, {c: hist_quantiles(h) for c, h in hists.items()}, hist_quantiles(cats), inputs))
    for p in PROJECTIONS:
        assert torch.allclose(got[1][0][p], got[0][0][p], rtol=1e-4), p
    for c in CRITERIA:  # bins are 0.27% wide: rounding moves a value by a bin at most
        assert torch.allclose(got[1][1][c], got[0][1][c], rtol=0.01, atol=1e-6), c
    assert torch.allclose(got[1][2], got[0][2], rtol=0.01, atol=1e-6)
    tensors = {f"quantiles.{crit_key(c)}": got[0][1][c] for c in CRITERIA}
    tensors.update({f"greedy.{crit_key(c)}": torch.zeros(2, len(TARGETS), len(PROJECTIONS)) for c in CRITERIA})
    tensors.update({f"norms.{p}": got[0][0][p] for p in PROJECTIONS})
    tensors["quantiles.cats"] = got[0][2]
    calib = Calibration(tensors, {})
    levels = torch.tensor([0.5, 0.3, 0.2, 0.6, 0.4, 0.5, 0.7], dtype=torch.float64)
    for crit in CRITERIA:
        errors = [BlockProbe(m, calib, g[3], 8).error(1, levels, crit) for m, g in zip((src, scaled), got)]
        assert errors[1] == pytest.approx(errors[0], rel=1e-3), crit
    quantize_model(scaled, AWQ)
    norms = column_norms(scaled)
    for p in PROJECTIONS:
        assert ((norms[p] - got[0][0][p]).norm() / got[0][0][p].norm()).item() < 0.1, p


def test_sparse_aware_awq_fits_each_segment_to_its_thresholded_inputs():
    """segment_inputs: without thresholds, x for every column; with them, per output segment (q, k, v here) x and
    below it x as that segment's threshold row leaves it. level_thresholds reads the default method's thresholds
    off the buffers and puts them back. Thresholds above every input add only zero rows: the same weights as the
    dense fit; real ones change them."""
    from awq import level_thresholds, linear_groups, segment_inputs
    src = outlier_model(2)
    wqkv = src.layers[0].attention.wqkv
    x = torch.randn(10, 128)
    (only, cols), = segment_inputs(wqkv, x, None)
    assert only is x and cols == slice(None)
    t = torch.stack([torch.full((128,), v) for v in (0.5, 1.0, 1.5)])
    parts = segment_inputs(wqkv, x, t)
    assert [c for _, c in parts] == [slice(0, 128), slice(128, 192), slice(192, 256)]
    for (xp, _), v in zip(parts, (0.5, 1.0, 1.5)):
        assert torch.equal(xp[:10], x) and torch.equal(xp[10:], torch.where(x.abs() > v, x, 0.0))

    calib = tables(src, batches(2)[0])
    L, T = src.args.n_layer, len(TARGETS)
    calib.greedy["magnitude"] = TARGETS.float()[None, :, None].expand(L, T, len(PROJECTIONS)).clone()
    calib.aimed["magnitude"] = None
    for *_, mod, _ in src.sparse_modules():
        mod.threshold.fill_(0.25)
    at_half = level_thresholds(src, calib, 0.5)
    assert all(mod.threshold.eq(0.25).all() for *_, mod, _ in src.sparse_modules())  # put back
    apply_thresholds(src, calib, 0.5, "greedy", "magnitude")
    assert set(at_half) == {(i, g) for i in range(L) for g in ("qkv", "o", "gate_up", "down")}
    for i, layer in enumerate(src.layers):
        for name, lin in linear_groups(layer):
            assert torch.equal(lin.threshold, at_half[(i, name)]) and at_half[(i, name)].gt(0).all()
            lin.threshold.zero_()

    def quantized(thresholds):
        m = copy.deepcopy(src)
        awq_quantize(m, batches(3), grid=4, progress=False, thresholds=thresholds)
        return [(mod.weight, mod.scale) for *_, mod, _ in m.sparse_modules()]

    dense = quantized(None)
    drop_all = quantized({k: torch.full_like(t, 1e9) for k, t in at_half.items()})
    assert all(torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-3) for a, b in zip(dense, drop_all))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(dense, quantized(at_half)))
