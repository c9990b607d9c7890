"""calibration.py (and the calibrate.py CLI) and the threshold tables: targets reached, greedy never worse than
uniform on calibration data, refusal of foreign files, sparsity 0 is dense, weight-aware with equal norms is
magnitude, and the shipped calibration of the default model measured on held-out text."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calibrate
import calibration
from checkpoint import save_checkpoint
from cli import fast_cpu_dtype
from errors import UserError
from loading import load_model, random_tensors
from model import ModelArgs, attention_mask
from sparsity import (CALIB_FILE, CRITERIA, DEFAULT_CRITERION, PROJECTIONS, TARGETS, apply_thresholds, load_calibration, measure_sparsity,
                      param_fractions, parameter_weighted, per_projection)
from tokenizer import byte_tokenizer_files, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(arch="llama", dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300,
            max_seq_len=256)
TEXT = (ROOT / "README.md").read_text() * 3
HELD_OUT = ROOT / "tests" / "data" / "shakespeare.txt"  # public-domain Shakespeare, evaluation-side works
AUTO_CPU = str(fast_cpu_dtype()).removeprefix("torch.")  # what calibrate.py --dtype auto runs in on this CPU


def make_ckpt(path: Path, seed: int = 0, equal_norms: bool = False, **over) -> Path:
    args = ModelArgs(**{**TINY, **over})
    tensors = dict(random_tensors(args, torch.float32, "cpu", seed))
    if equal_norms:  # every input channel's weight row has norm 0.7 in each projection: weight-aware == magnitude
        for k, v in tensors.items():
            if k.startswith("layers.") and v.dim() == 2:
                parts = []
                sizes = _segments(k, args)
                for w in v.split(sizes, dim=1):
                    parts.append(w / w.norm(dim=1, keepdim=True) * 0.7)
                tensors[k] = torch.cat(parts, dim=1)
    save_checkpoint(path, args, iter(tensors.items()), torch.float32)
    for name, content in byte_tokenizer_files(args.vocab_size).items():
        (path / name).write_text(json.dumps(content) + "\n")
    return path


def _segments(key, a):
    q, kv = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    if "wqkv" in key:
        return [q, kv, kv]
    if "w13" in key:
        return [a.intermediate_size] * 2
    return [a.dim]


def run_calibrate(ckpt: Path, text_file: Path, *extra) -> Path:
    calibrate.main(["--checkpoint", str(ckpt), "--text", str(text_file), "--tokens", "1536", "--seq-len", "128",
                    "--skip", "16", "--batch", "4", "--greedy-seqs", "2", "--step", "0.05",
                    "--criteria", "magnitude,weight-aware", *extra])
    return ckpt / CALIB_FILE


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    text = tmp / "text.txt"
    text.write_text(TEXT)
    ckpt = make_ckpt(tmp / "ckpt")
    run_calibrate(ckpt, text)
    return ckpt, text


def test_histogram_quantiles_match_torch_quantile():
    """value_hist (bins from the float's bits) and hist_quantiles against exact quantiles of log-normal values over
    many octaves, in parts as collect() adds them; zeros and values beyond the range land in the end bins."""
    g = torch.Generator().manual_seed(0)
    v = torch.exp(torch.randn(300_000, generator=g) * 3)  # ~ 2^-13 .. 2^13
    h = sum(calibration.value_hist(part) for part in v.split(70_001))
    q = calibration.hist_quantiles(h)
    levels = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99], dtype=torch.float64)
    idx = [int(torch.argmin((calibration.LEVELS - p).abs())) for p in levels]
    want = torch.quantile(v.double(), calibration.LEVELS[idx])
    assert ((q[idx] - want).abs() / want).max() < 2e-3, (q[idx], want)
    edges = calibration.value_hist(torch.tensor([0.0, 1e-30, 2.0 ** 40, float("inf"), 1.0]))
    assert edges[0] == 2 and edges[-1] == 2 and edges.sum() == 5
    lower, upper = calibration.bin_edges()
    one = int(torch.nonzero(calibration.value_hist(torch.tensor([1.0])))[0])
    assert lower[one] == 1.0 and upper[one] == 1 + 2 ** -calibration.MANT_BITS


def test_greedy_tables_reach_targets(calibrated):
    ckpt, _ = calibrated
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    w = param_fractions(model.args)
    for crit, table in calib.greedy.items():
        eff = table.double() @ w  # [L, T]: each block's own sparsity (spread_over_blocks), their mean the target
        assert torch.allclose(eff.mean(0), TARGETS.double(), atol=2e-3), crit
        assert (eff >= -1e-6).all() and (eff <= TARGETS[-1] + 1e-6).all()
        assert (table >= 0).all() and (table <= 0.99 + 1e-6).all()
    # every method/criterion gives the target model-wide (parameter-weighted) level
    for method in ("uniform", "greedy"):
        for crit in ("magnitude", "weight-aware"):
            lv = calib.levels(0.45, method, crit)
            assert abs(float((lv @ w).mean()) - 0.45) < 2e-3


def greedy_inputs(ckpt: Path) -> tuple:
    """(model, its calibration, the block inputs of 2 calibration sequences) as calibrate.py's greedy search has
    them (skip 16)."""
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    batches = calibration.token_batches(load_tokenizer(ckpt), TEXT, 1536, 128, 4, "cpu")
    model.setup_caches(4, 128)
    _, _, inputs = calibration.collect(model, batches, 16, calibration.column_norms(model), 1)
    return model, calib, [x[:2] for x in inputs]


def test_greedy_never_worse_than_uniform_on_calibration_data(calibrated):
    """Per block, the greedy table's allocation at each target has no more error than the uniform one (the floor);
    spread over the blocks, the summed relative error at each model target is no more than every block's at the
    target."""
    model, calib, inputs = greedy_inputs(calibrated[0])
    probe = calibration.BlockProbe(model, calib, inputs, 16)
    for crit in ("magnitude", "weight-aware"):
        table = calibration.greedy_tables(model, calib, inputs, 16, crit, 0.05, True, 0.1, workers=1)
        errors = calibration.block_errors(model, calib, inputs, 16, crit, table, workers=2)
        for layer in range(model.args.n_layer):
            for ti in (4, 8, 10, 13):  # 0.2, 0.4, 0.5, 0.65
                greedy = probe.error(layer, table[layer, ti].double(), crit)  # (float32 levels: 1e-6 slack)
                uniform = probe.error(layer, torch.full((7,), float(TARGETS[ti]), dtype=torch.float64), crit)
                assert greedy <= uniform * (1 + 1e-4) + 1e-9, (crit, layer, ti, greedy, uniform)
            probe.reset(layer)
        spread = calibration.block_sparsity(errors)
        grid = TARGETS.double()
        for ti in range(1, len(TARGETS)):
            got = calibration.interp_rows(grid, errors, spread[:, ti]).sum()
            assert got <= errors[:, ti].sum() * (1 + 1e-9), (crit, ti)


def test_blocks_equal_puts_every_block_at_the_target(tmp_path):
    """calibrate.py --blocks equal: TEAL's table, each block at the model's target; the file says which."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ckpt = make_ckpt(tmp_path / "eq")
    path = run_calibrate(ckpt, text, "--criteria", "magnitude", "--blocks", "equal", "--aim-seqs", "0")
    model = load_model(ckpt)
    calib = load_calibration(model, path)
    eff = calib.greedy["magnitude"].double() @ param_fractions(model.args)
    assert torch.allclose(eff, TARGETS.double().expand_as(eff), atol=2e-3) and calib.meta["blocks"] == "equal"
    spread = load_calibration(model, run_calibrate(make_ckpt(tmp_path / "sp"), text, "--criteria", "magnitude",
                                                   "--aim-seqs", "0", "--alloc-seqs", "4"))
    assert spread.meta["blocks"] == "spread over 512 tokens"


def test_block_sparsity_gives_more_to_blocks_that_lose_less():
    """Water-filling on relative errors: the mean is the model target at every target; a block whose error grows
    four times slower takes more sparsity; equal curves stay equal; a grid step at a time from where it was."""
    grid = TARGETS.double()
    curve = grid ** 2  # [T]
    errors = torch.stack([curve, 4 * curve, curve, 4 * curve])
    s = calibration.block_sparsity(errors)
    assert torch.allclose(s.mean(0), grid, atol=1e-9)
    ti = int(torch.argmin((grid - 0.5).abs()))
    assert s[0, ti] > 0.5 > s[1, ti] and s[0, ti] == s[2, ti] and s[1, ti] == s[3, ti]
    assert (s[:, 1:] >= s[:, :-1] - 0.05 - 1e-9).all()
    same = calibration.block_sparsity(torch.stack([curve] * 3))
    assert torch.allclose(same, grid.expand(3, -1), atol=0.05 / 3 + 1e-9)
    table = torch.rand(4, len(TARGETS), 7, generator=torch.Generator().manual_seed(0))
    spread = calibration.spread_over_blocks(table, errors)
    assert spread.shape == table.shape
    assert torch.allclose(spread[:, ti], calibration.interp_rows(grid, table.double(), s[:, ti]).float())
    at_grid = s[0, ti]  # a point on the grid gives that row of the block's table
    assert torch.allclose(calibration.interp_rows(grid, table.double(), torch.full((4,), float(at_grid)))[0],
                          table[0, int(torch.argmin((grid - at_grid).abs()))].double())


@pytest.mark.parametrize("every", [1, 3])
def test_block_probe_reuse_gives_the_whole_block_error(calibrated, every):
    """The probe's reuse (errors by levels, q/k/v and the attention half by their levels, queries and the MLP at the
    scored positions only: every `every`-th from skip) gives what a whole block forward gives there, whatever order
    the levels come in."""
    ckpt, _ = calibrated
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    skip, S = 16, 64
    x = torch.randn(2, S, model.args.dim)
    probe = calibration.BlockProbe(model, calib, [x, x * 0.5], skip, every)
    mask = attention_mask(probe.pos, S, model.args.sliding_window)

    def whole(layer, levels, crit):
        b = model.layers[layer]
        run = lambda sparse: b(x if layer == 0 else x * 0.5, None, probe.rope, mask, probe.pos, sparse,
                               probe.active, model.plan)[0][:, skip::every]
        dense = run(False)
        probe.set_levels(layer, levels, crit)
        return (run(True) - dense).pow(2).sum(dim=(1, 2))

    base = torch.full((7,), 0.3, dtype=torch.float64)
    mlp_only, attn_too, q_only = base.clone(), base.clone(), base.clone()
    mlp_only[5] = 0.6
    attn_too[1] = 0.7
    q_only[0] = 0.5
    for layer, levels, crit in [(0, base, "magnitude"), (0, mlp_only, "magnitude"), (0, attn_too, "magnitude"),
                                (0, q_only, "magnitude"), (0, base, "weight-aware"), (1, mlp_only, "magnitude"),
                                (0, base, "magnitude"), (0, mlp_only, "weight-aware")]:
        want = whole(layer, levels, crit)
        got = probe.seq_errors(layer, levels, crit)
        assert got.shape == (2,) and torch.allclose(got.float(), want, rtol=1e-4), (layer, levels.tolist(), crit)
        assert probe.error(layer, levels, crit) == pytest.approx(want.sum().item(), rel=1e-4)


def test_sparsity_zero_is_dense(calibrated):
    ckpt, _ = calibrated
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    model.setup_caches(1, 64)
    idx = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        dense = model(idx, torch.arange(40), sparse_from=None)
        for method in ("uniform", "greedy"):
            for crit in ("magnitude", "weight-aware"):
                apply_thresholds(model, calib, 0.0, method, crit)
                assert torch.equal(model(idx, torch.arange(40), sparse_from=0), dense)
        apply_thresholds(model, calib, 0.5, "greedy", "weight-aware")
        assert not torch.equal(model(idx, torch.arange(40), sparse_from=0), dense)


def test_uniform_hits_target_on_its_text(calibrated):
    ckpt, _ = calibrated
    model = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    idx = calibration.token_batches(tok, TEXT, 1536, 128, 16, "cpu")[0]
    for s in (0.25, 0.5, 0.8):
        apply_thresholds(model, calib, s, "uniform", "magnitude")
        pp = per_projection(measure_sparsity(model, idx, sparse_from=None, start=16))
        for p in PROJECTIONS:
            assert abs(pp[p] - s) < 0.01, (s, p, pp[p])


def test_weight_aware_with_equal_norms_is_magnitude(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ckpt = make_ckpt(tmp_path / "eq", equal_norms=True)
    run_calibrate(ckpt, text, "--dtype", "float32")  # norms of exactly 0.7: bfloat16 weights round them
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    assert torch.allclose(calib.norms["q"], torch.full_like(calib.norms["q"], 0.7), rtol=1e-5)
    lv = calib.levels(0.5, "uniform", "magnitude")
    mag = calib.thresholds(lv, "magnitude")
    wa = calib.thresholds(lv, "weight-aware")
    for k in mag:
        assert torch.allclose(mag[k], wa[k], rtol=5e-3), k  # histogram bins are 0.24% wide


def test_foreign_or_malformed_calibration_refused(calibrated, tmp_path):
    ckpt, _ = calibrated
    other = load_model(make_ckpt(tmp_path / "other", seed=5))
    with pytest.raises(UserError, match="another model"):
        load_calibration(other, ckpt / CALIB_FILE)
    bigger = load_model(make_ckpt(tmp_path / "bigger", seed=0, n_layer=3))
    bigger.fingerprint = ""  # a file without a fingerprint check still has its shapes checked
    with pytest.raises(UserError, match="shape"):
        load_calibration(bigger, ckpt / CALIB_FILE)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="safetensors"):
        load_calibration(other, bad)
    with pytest.raises(UserError, match="calibrate.py"):
        load_calibration(other, tmp_path / "missing" / CALIB_FILE)


def run_cli(script, *argv, stdin=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                          input=stdin, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_generate_with_calibration_and_clear_errors(calibrated, tmp_path):
    ckpt, _ = calibrated
    r = run_cli("generate.py", "--checkpoint", ckpt, "--prompt", "hello", "--max-new-tokens", "12", "--sparsity", "0.5")
    assert r.returncode == 0, r.stderr
    assert "measured decode sparsity" in r.stderr and "model-wide" in r.stderr
    bare = make_ckpt(tmp_path / "bare", seed=3)
    r = run_cli("generate.py", "--checkpoint", bare, "--sparsity", "0.5")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "calibrate.py --checkpoint" in lines[0], r.stderr
    (bare / CALIB_FILE).write_bytes((ckpt / CALIB_FILE).read_bytes())
    r = run_cli("generate.py", "--checkpoint", bare, "--sparsity", "0.5")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "another model" in lines[0], r.stderr


@pytest.mark.slow
def test_eval_ppl_json(calibrated):
    ckpt, text = calibrated
    r = run_cli("scripts/eval_ppl.py", "--checkpoint", ckpt, "--sparsity", "0.4", "--text", text, "--max-tokens", "300",
                "--window", "128", "--stride", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"ppl", "kl", "top1", "sparsity"} <= set(out)
    assert out["kl"] > 0 and 0 < out["top1"] <= 1 and abs(out["sparsity"] - 0.4) < 0.1
    r = run_cli("scripts/eval_ppl.py", "--checkpoint", ckpt, "--sparsity", "0", "--text", text, "--max-tokens", "200",
                "--window", "128", "--stride", "64", "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kl"] == 0 and out["top1"] == 1 and out["ppl"] == out["dense_ppl"]
    # --at-measured: the target is solved for, and the text then measures the requested sparsity (uniform thresholds,
    # dense quantiles, measure more than their target when every layer is sparse; the aimed greedy levels may already
    # measure it, leaving nothing to solve)
    r = run_cli("scripts/eval_ppl.py", "--checkpoint", ckpt, "--sparsity", "0.45", "--at-measured", "--text", text,
                "--max-tokens", "300", "--window", "128", "--stride", "64", "--sparsity-method", "uniform", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(out["sparsity"] - 0.45) <= 0.001 + 1e-9 and out["target"] != 0.45, out


@pytest.mark.slow
def test_new_sparsity_level_does_not_recompile(calibrated):
    from torch._dynamo.utils import counters

    from engine import Generator
    ckpt, _ = calibrated
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    apply_thresholds(model, calib, 0.5, "greedy", "weight-aware")
    torch._dynamo.reset()
    counters.clear()
    gen = Generator(model, compile=True)
    gen.setup(1, 64)
    prompt = torch.randint(0, 300, (1, 8))
    first, _ = gen.generate(prompt, 6)
    frames = counters["stats"]["unique_graphs"]
    thr = model.layers[0].attention.wqkv.threshold
    before = thr.data_ptr()
    for level in (0.25, 0.65, 0.0):
        apply_thresholds(model, calib, level, "uniform", "magnitude")
        gen.generate(prompt, 6)
    assert counters["stats"]["unique_graphs"] == frames, "a new sparsity level recompiled"
    assert thr.data_ptr() == before  # thresholds are updated in place
    apply_thresholds(model, calib, 0.5, "greedy", "weight-aware")
    again, _ = gen.generate(prompt, 6)
    assert torch.equal(first, again)


def test_interactive_level_switches_decode_path(calibrated):
    """`/sparsity S` in --interactive: a level above 0 decodes through the sparse path, 0 goes back to the dense one."""
    import argparse

    from engine import Generator
    from generate import set_level
    from kernels.formats import INT8
    from plan import decode_plan
    from quantization import quantize_model
    ckpt, _ = calibrated
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    model.set_plan(decode_plan(torch.device("cpu"), sparsity=0.0))
    gen = Generator(model)
    a = argparse.Namespace(sparsity=0.0, sparsity_method="uniform", criterion="magnitude", checkpoint=ckpt,
                           quant=None)
    assert not model.plan.sparse_decode
    set_level(gen, calib, "/sparsity 0.5", a)
    assert model.plan.sparse_decode and a.sparsity == 0.5 and model.layers[0].attention.wqkv.threshold.any()
    set_level(gen, calib, "/sparsity 0", a)
    assert not model.plan.sparse_decode and a.sparsity == 0.0
    set_level(gen, calib, "/sparsity 1.5", a)  # refused: nothing changes
    assert not model.plan.sparse_decode and a.sparsity == 0.0
    # quantized weights decode through the kernels at 0 too (zero thresholds are exactly dense)
    quantize_model(model, INT8)
    model.set_plan(model.plan)
    set_level(gen, calib, "/sparsity 0", a)
    assert model.plan.quantized and model.plan.sparse_decode and a.sparsity == 0.0


@pytest.mark.slow
def test_shipped_calibration_on_held_out_text():
    """The default model's shipped file, uniform thresholds, on held-out text (tests/data/shakespeare.txt: passages
    of four works on the evaluation side of texts.split_works, shipped so that no test downloads): the thresholds
    drop the target share of each projection's (dense) input to within ±2%, and decoding with them sparse (every
    layer seeing sparsified upstream activations) stays within ±2% at 25%. At higher levels uniform thresholds drift
    above the target when decoding (upstream zeros shrink later inputs; down reaches 0.54 at 0.5); the default
    method (greedy, magnitude, aimed levels; weight-aware too) measures its target within ±0.01 model-wide when decoding at 0.25
    to 0.5 (0.666 at 0.65 on these 640 counted tokens; 0.655 on 2,048 of the evaluation side)."""
    from default_model import default_checkpoint
    ckpt = default_checkpoint()
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    tok = load_tokenizer(ckpt)
    ids = tok.encode(HELD_OUT.read_text(), bos=False)
    step = len(ids) // 4
    idx = torch.tensor([ids[i * step: i * step + 192] for i in range(4)])
    for s, sparse_from in ((0.25, None), (0.5, None), (0.65, None), (0.25, 32)):
        apply_thresholds(model, calib, s, "uniform", "magnitude")
        pp = per_projection(measure_sparsity(model, idx, sparse_from=sparse_from, start=32))
        for p in PROJECTIONS:
            assert abs(pp[p] - s) <= 0.02, (s, sparse_from, p, pp[p])
    for (s, tol), crit in itertools.product(((0.25, 0.01), (0.4, 0.01), (0.5, 0.01), (0.65, 0.02)), CRITERIA):
        apply_thresholds(model, calib, s, "greedy", crit)
        got = parameter_weighted(model, measure_sparsity(model, idx, sparse_from=32, start=32))
        assert abs(got - s) <= tol, (s, crit, got)


def test_aimed_greedy_measures_its_target_when_decoding(calibrated):
    """The default method's thresholds (greedy levels looked up at their aimed levels) drop the target share
    model-wide when every layer decodes sparse (after the dense first --skip positions), on the sequences they were
    aimed on; without the aimed table the lookup is the greedy levels themselves."""
    ckpt, _ = calibrated
    model = load_model(ckpt)
    tok = load_tokenizer(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    assert all(calib.aimed[c] is not None for c in calib.greedy) and calib.meta["aim_tokens"] == str(8 * 128)
    idx = torch.cat(calibration.aim_batches(calibration.token_batches(tok, TEXT, 1536, 128, 4, "cpu"), 8, 4))
    for s in (0.25, 0.5, 0.7):
        apply_thresholds(model, calib, s, "greedy", "weight-aware")
        got = parameter_weighted(model, measure_sparsity(model, idx, sparse_from=16, start=16))
        assert abs(got - s) <= 0.01, (s, got)
    calib.aimed = {c: None for c in calib.aimed}
    assert torch.equal(calib.levels(0.5, "greedy", "magnitude", aimed=True), calib.levels(0.5, "greedy", "magnitude"))


def test_calibration_without_aimed_tables_still_loads(calibrated, tmp_path):
    ckpt, _ = calibrated
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    calib.aimed = {c: None for c in calib.aimed}
    calibration.save_calibration(calib, tmp_path / CALIB_FILE)
    old = load_calibration(model, tmp_path / CALIB_FILE)
    assert all(v is None for v in old.aimed.values())
    apply_thresholds(model, old, 0.5, "greedy", "weight-aware")  # looks up the greedy levels themselves


def test_greedy_stability_compares_two_halves(tmp_path, monkeypatch, capsys):
    """scripts/greedy_stability.py: the text split at a line boundary, a greedy table per half, and the agreement
    figures (identical tables agree fully; the script's report has every criterion at every target)."""
    from scripts import greedy_stability as gs
    a, b = gs.halves("one\ntwo\nthree\nfour\n")
    assert a + "\n" + b == "one\ntwo\nthree\nfour\n" and not a.endswith("\n")
    lines = [f"line {i} " + "x" * (i % 97) for i in range(3000)]
    a, b = gs.halves("\n".join(lines), "interleaved")  # chunks of ~CHUNK characters dealt in turn
    la, lb = a.split("\n"), b.split("\n")
    assert sorted(la + lb, key=lambda s: int(s.split()[1])) == lines and not set(la) & set(lb)
    ia, ib = [int(s.split()[1]) for s in la], [int(s.split()[1]) for s in lb]
    assert ia[0] == 0 and min(ib) < 500 and max(ia) > 2500 and max(ib) > 2500  # both halves span the text
    assert abs(len(a) - len(b)) < 2 * gs.CHUNK
    with pytest.raises(UserError, match="too short"):
        gs.halves("short\ntext\n", "interleaved")
    t = torch.rand(3, 7)
    same = gs.compare(t, t.clone(), torch.full((7,), 0.05))
    assert same["max_abs"] == 0 and same["within_one_step"] == 1.0 and same["blocks_all_within"] == 3
    apart = gs.compare(t, t + 0.2, torch.full((7,), 0.05))
    assert apart["within_one_step"] == 0.0 and abs(apart["mean_abs"] - 0.2) < 1e-6
    ckpt = make_ckpt(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 2)
    out = tmp_path / "stability.json"
    monkeypatch.setattr(sys, "argv", ["greedy_stability.py", "--checkpoint", str(ckpt), "--text", str(text),
                                      "--tokens", "1536", "--seq-len", "128", "--skip", "16", "--batch", "4",
                                      "--criteria", "magnitude,weight-aware", "--out", str(out)])
    assert gs.main() == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {f"{c}@{t}" for c in ("magnitude", "weight-aware")
                                      for t in (0.4, 0.5, "all", "all-before-spread")}
    assert report["results"]["magnitude@all"]["blocks"] == 2 * (len(TARGETS) - 1)  # TINY: 2 layers
    before = report["results"]["magnitude@all-before-spread"]
    assert before["blocks"] == 2 * (len(TARGETS) - 1) and 0 <= before["blocks_within_one_grid_step"] <= before["blocks"]
    assert report["tie_kv"] is True and report["dtype"] == AUTO_CPU  # the defaults
    assert report["max_move"] == 0.1 and report["greedy_every"] == 1 and report["ties"] == calibration.TIES
    assert report["split"] == "middle" and report["alloc_seqs"] == calibration.ALLOC_SEQS
    # the calibration flags and their checks are calibrate.py's (cli.add_calibration_args, calibration_criteria)
    monkeypatch.setattr(sys, "argv", ["greedy_stability.py", "--checkpoint", str(ckpt), "--alloc-seqs", "0"])
    with pytest.raises(UserError, match="--alloc-seqs >= 1"):
        gs.main()
    assert all(0 <= r["within_one_step"] <= 1 for r in report["results"].values())
    assert "| magnitude, 0.5 |" in capsys.readouterr().out


class SquareProbe:
    """A stand-in BlockProbe for greedy_block: a block whose output error is sum(cost * level^2); remembers every
    candidate it scored."""

    def __init__(self, cost: torch.Tensor):
        self.cost, self.seen = cost, []

    def seq_errors(self, layer, levels, criterion):
        self.seen.append(levels.clone())
        return (self.cost * levels ** 2).sum().view(1)

    def error(self, layer, levels, criterion):
        return float(self.seq_errors(layer, levels, criterion).sum())

    def reset(self, layer):
        pass


def test_greedy_step_moves_a_projection_by_at_most_max_move():
    """A greedy candidate raises one projection's level by step / its parameter share, capped at max_move: k and v
    of a GQA block (a few percent of its parameters) then climb in steps like the others instead of jumping; the
    table still reaches every target. (TINY: a 0.05 step is 0.75 of k's level, 0.25 of gate's.)"""
    w = param_fractions(ModelArgs(**TINY))
    cost = torch.tensor([1.0, 0.1, 0.1, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # k and v cheapest

    grid = torch.tensor([0.2 * i for i in range(5)] + [0.99], dtype=torch.float64)
    for max_move, on_grid in ((0.2, True), (1.0, False)):
        probe = SquareProbe(cost)
        table = calibration.greedy_block(probe, 0, "magnitude", w, 0.05, uniform_floor=False, max_move=max_move)
        assert torch.allclose(table @ w, TARGETS, atol=1e-6)
        levels = torch.stack(probe.seen)  # every candidate scored
        assert bool((levels[..., None] - grid).abs().min(-1).values.max() < 1e-9) == on_grid


def test_greedy_ties_keep_levels_near_uniform():
    """With `ties`, a candidate within that many paired standard errors of the best counts as tied, and the tied
    candidate whose level lags the block's effective sparsity most is taken: where per-sequence errors cannot tell
    the projections apart, the levels climb together; where they can (every sequence agrees), the best still wins."""
    w = param_fractions(ModelArgs(**TINY))
    cost = torch.tensor([1.0, 0.1, 0.1, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # k and v cheapest
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    noise = 10 * signs[:, None] * torch.tensor([(-1.0) ** j for j in range(7)], dtype=torch.float64)  # [4, 7]

    class Probe:  # four sequences: the same mean error per level as above, or that plus noise (means unchanged)
        def __init__(self, noisy):
            self.noisy = noisy

        def seq_errors(self, layer, levels, criterion):
            per = cost * levels ** 2 * (1 + (noise if self.noisy else 0 * noise))  # [4, 7]
            return per.sum(-1)

        def error(self, layer, levels, criterion):
            return float(self.seq_errors(layer, levels, criterion).sum())

        def reset(self, layer):
            pass

    def spread(table):
        return (table.max(-1).values - table.min(-1).values)[1:]  # per target, the levels' range

    clear = calibration.greedy_block(Probe(False), 0, "magnitude", w, 0.05, uniform_floor=False, max_move=0.1,
                                     ties=1.0)
    plain = calibration.greedy_block(Probe(False), 0, "magnitude", w, 0.05, uniform_floor=False, max_move=0.1)
    assert torch.equal(clear, plain)  # no noise: no ties, the best candidate every time
    assert spread(plain).max() > 0.5  # k and v run far ahead
    noisy = calibration.greedy_block(Probe(True), 0, "magnitude", w, 0.05, uniform_floor=False, max_move=0.1,
                                     ties=1.0)
    assert torch.allclose(noisy @ w, TARGETS, atol=1e-6)
    assert spread(noisy).max() <= 0.2 + 1e-9  # every projection within two moves of the others


def test_default_criteria_make_the_default_tables_only(tmp_path):
    """calibrate.py makes greedy (and aimed) tables for the default criterion unless --criteria names more (each
    criterion's search is about half the time); the other criterion's uniform thresholds still work, its greedy
    ones are refused in one line that says what to do; a bad --criteria is one line too."""
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ckpt = make_ckpt(tmp_path / "one")
    path = run_calibrate(ckpt, text, "--criteria", DEFAULT_CRITERION)
    model = load_model(ckpt)
    calib = load_calibration(model, path)
    assert list(calib.greedy) == [DEFAULT_CRITERION] and calib.meta["criteria"] == DEFAULT_CRITERION
    other = next(c for c in CRITERIA if c != DEFAULT_CRITERION)
    apply_thresholds(model, calib, 0.5, "greedy", DEFAULT_CRITERION)
    apply_thresholds(model, calib, 0.5, "uniform", other)
    with pytest.raises(UserError, match="--criteria"):
        apply_thresholds(model, calib, 0.5, "greedy", other)
    for bad in ("", "magnitude,nope", "magnitude,magnitude"):
        with pytest.raises(UserError, match="--criteria"):
            calibrate.main(["--checkpoint", str(ckpt), "--criteria", bad])
    for flag, bad in (("--greedy-every", "0"), ("--ties", "-1"), ("--greedy-seqs", "0"), ("--alloc-seqs", "0")):
        with pytest.raises(UserError, match="--greedy-every >= 1"):
            calibrate.main(["--checkpoint", str(ckpt), flag, bad])
    with pytest.raises(UserError, match="--aim-seqs"):
        calibrate.main(["--checkpoint", str(ckpt), "--aim-seqs", "-1"])


def test_greedy_search_on_threads_gives_the_same_tables(calibrated):
    """Blocks searched by 3 threads (each its own probe, ops on one core) = one after another on one probe: a
    block's search sets only that block's thresholds and cache."""
    model, calib, inputs = greedy_inputs(calibrated[0])
    threads = torch.get_num_threads()
    one = calibration.greedy_tables(model, calib, inputs, 16, "magnitude", 0.05, True, 0.1, workers=1)
    three = calibration.greedy_tables(model, calib, inputs, 16, "magnitude", 0.05, True, 0.1, workers=3)
    assert torch.equal(one, three) and torch.get_num_threads() == threads
    e1, e3 = (calibration.block_errors(model, calib, inputs, 16, "magnitude", one, workers=n) for n in (1, 3))
    assert torch.equal(e1, e3)
    assert torch.allclose(one.double() @ param_fractions(model.args), TARGETS.expand(model.args.n_layer, -1), atol=2e-3)
    assert all((mod.threshold == 0).all() for _, _, mod, _ in model.sparse_modules())  # blocks left dense


def test_greedy_with_k_and_v_tied_raises_them_together():
    """moves=KV_TIED (calibrate.py --tie-kv): one candidate raises k and v together, by step / their joint share
    (capped at max_move), so their levels are equal at every target; each projection alone (TEAL's) lets the
    cheaper of the two run ahead. Both tables reach every target."""
    w = param_fractions(ModelArgs(**TINY))
    k, v = PROJECTIONS.index("k"), PROJECTIONS.index("v")
    cost = torch.tensor([1.0, 0.05, 0.3, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # k much cheaper than v

    probe = SquareProbe(cost)
    tied = calibration.greedy_block(probe, 0, "magnitude", w, 0.05, uniform_floor=False, max_move=0.1,
                                    moves=calibration.KV_TIED)
    alone = calibration.greedy_block(SquareProbe(cost), 0, "magnitude", w, 0.05, uniform_floor=False, max_move=0.1)
    for table in (tied, alone):
        assert torch.allclose(table @ w, TARGETS, atol=1e-6)
    assert torch.equal(tied[:, k], tied[:, v])
    assert all(bool(s[k] == s[v]) for s in probe.seen)  # no candidate moved one without the other
    assert (alone[:, k] - alone[:, v]).max() > 0.3
    assert set(calibration.KV_TIED) - set(calibration.ALONE) == {(k, v)} and len(calibration.KV_TIED) == 6


def test_auto_dtype_on_a_cpu_follows_its_matrix_units(monkeypatch):
    """calibrate.py's --dtype auto on a CPU: bfloat16 where the CPU reports AMX tiles, float32 where it does not or
    torch cannot tell."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fast_cpu_dtype() == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert fast_cpu_dtype() == torch.float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert fast_cpu_dtype() == torch.float32
    text = subprocess.run([sys.executable, str(ROOT / "calibrate.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    assert "matrix units (AMX)" in " ".join(text.split())  # --help says what auto means here


def test_calibrate_records_how_it_searched(calibrated, tmp_path):
    """The file's metadata says how the greedy search ran (k and v tied by default; --no-tie-kv: each alone, TEAL's)
    and in which dtype the model ran (--dtype auto on a CPU: bfloat16 where it has bf16 matrix units, else float32;
    an explicit --dtype wins)."""
    meta = load_calibration(load_model(calibrated[0]), calibrated[0] / CALIB_FILE).meta
    assert meta["tie_kv"] == "True" and meta["dtype"] == AUTO_CPU
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    ckpt = make_ckpt(tmp_path / "ckpt")
    explicit = "float32" if AUTO_CPU == "bfloat16" else "bfloat16"
    path = run_calibrate(ckpt, text, "--criteria", "magnitude", "--no-tie-kv", "--dtype", explicit, "--aim-seqs", "0",
                         "--blocks", "equal")
    meta = load_calibration(load_model(ckpt), path).meta
    assert meta["tie_kv"] == "False" and meta["dtype"] == explicit
