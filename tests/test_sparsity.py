"""sparsity.py: the activation hooks (what each sparse projection thresholds, under the materialised plan, put back
afterwards), quantiles, uniform thresholds on captured inputs, sparsity counted on the kernel path, and a calibration
file refused for another model."""
import pytest
import torch

from calibration import save_calibration
from errors import UserError
from loading import random_model
from model import ModelArgs, SparseLinear
from plan import decode_plan
from sparsity import (CALIB_FILE, CALIB_FORMAT, CRITERIA, LEVELS, PROJECTIONS, TARGETS, Calibration, SparsityCounter,
                      capture_inputs, crit_key, input_hooks, load_calibration, quantile, set_uniform_thresholds)
from tests.helpers import reference_and_kernel_models

ARGS = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=101, max_seq_len=64)


def small_model():
    return random_model(ModelArgs(**ARGS), "cpu", torch.float32, seed=0)


@torch.no_grad()
def test_input_hooks_give_each_projections_input_and_restore_the_plan():
    model = small_model()
    model.set_plan(decode_plan(torch.device("cpu"), sparsity=0.5, kernels=True, n_sm=4))
    plan = model.plan
    model.setup_caches(1, 16)
    idx = torch.randint(0, 101, (1, 12))
    seen, plans = {}, []

    def grab(mod, a):
        seen.setdefault(mod, a)
        plans.append(model.plan)

    with input_hooks(model, grab):
        model(idx, torch.arange(12), sparse_from=None)
    sparse = {mod for _, _, mod, _ in model.sparse_modules()}
    assert set(seen) == sparse and not isinstance(model.output, SparseLinear)
    assert all(p == plan.materialised() for p in plans)
    assert model.plan is plan  # put back
    layer = model.layers[0]
    x = model.tok_embeddings(idx)
    assert torch.equal(seen[layer.attention.wqkv], layer.attention_norm(x))  # the normalised input
    for mod, a in seen.items():
        assert a.shape == (1, 12, mod.in_features)
    calls = len(plans)
    with pytest.raises(RuntimeError, match="inside"):
        with input_hooks(model, grab):
            raise RuntimeError("raised inside the hooks")
    assert model.plan is plan
    model(idx, torch.arange(12), sparse_from=None)
    assert len(plans) == calls  # the hooks are gone


def test_quantile_matches_torch():
    a = torch.randn(7, 13)
    for q in (0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0):
        assert torch.equal(quantile(a, q), torch.quantile(a.flatten(), q, interpolation="nearest")), q
    b = torch.randn(101)  # q (n - 1) whole: every interpolation agrees
    for q in (0.2, 0.5, 0.95):
        assert torch.allclose(quantile(b, q), torch.quantile(b, q))


def test_uniform_thresholds_hit_the_level_on_captured_inputs():
    model = small_model()
    captured = capture_inputs(model, torch.randint(0, 101, (2, 24)))
    assert set(captured) == {mod for _, _, mod, _ in model.sparse_modules()}
    for s in (0.25, 0.5, 0.9):
        set_uniform_thresholds(model, captured, s)
        for mod, a in captured.items():
            t = mod.threshold
            assert (t == t.flatten()[0]).all()  # one scalar per projection
            assert abs((a <= t.flatten()[0]).float().mean().item() - s) < 0.02, (s, mod)
    set_uniform_thresholds(model, captured, 0.0)
    assert not any(mod.threshold.any() for mod in captured)


def test_sparsity_counted_on_the_kernel_path():
    """Measuring sparsity over a decode step on the kernel path (deferred reduction on) sees every projection's
    input, as on the reference path, and leaves the deferral on afterwards."""
    ref_model, model = reference_and_kernel_models()
    stats, prompt = [], torch.randint(0, 101, (1, 20))
    for m in (ref_model, model):
        m.setup_caches(1, 64)
        m(prompt, torch.arange(20), sparse_from=None)
        counter = SparsityCounter(m)
        with torch.no_grad(), counter.counting():
            m(torch.tensor([[7]]), torch.tensor([20]))  # one decode step: the kernel path on `model`
        stats.append(counter.stats())
    assert set(stats[1]) == {(0, p) for p in ("q", "k", "v", "o", "gate", "up", "down")}
    assert all(abs(stats[0][k] - stats[1][k]) < 1e-6 for k in stats[0])
    assert model.plan.defer_reduction and model.plan.fuse_mlp  # the hooks ran the materialised plan, and put it back


def write_calibration(model, path, fingerprint):
    a, shapes = model.args, model.args.linear_shapes()
    t = {f"quantiles.{crit_key(c)}": torch.rand(a.n_layer, len(PROJECTIONS), len(LEVELS)) for c in CRITERIA}
    t.update({f"greedy.{crit_key(c)}": torch.rand(a.n_layer, len(TARGETS), len(PROJECTIONS)) for c in CRITERIA})
    t.update({f"norms.{p}": torch.rand(a.n_layer, shapes[p][0]) for p in PROJECTIONS})
    t["quantiles.cats"] = torch.rand(a.n_layer, len(LEVELS))
    save_calibration(Calibration(t, {"format": CALIB_FORMAT, "fingerprint": fingerprint}), path)


def test_calibration_of_another_model_refused(tmp_path):
    model = small_model()
    model.fingerprint = "0123456789abcdef"
    path = tmp_path / CALIB_FILE
    write_calibration(model, path, model.fingerprint)
    calib = load_calibration(model, path)
    assert calib.quantiles["magnitude"].shape == (2, len(PROJECTIONS), len(LEVELS))
    write_calibration(model, path, "fedcba9876543210")
    with pytest.raises(UserError, match="another model"):
        load_calibration(model, path)
