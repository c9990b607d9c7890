"""scripts/bench.py's outputs (the timing itself needs a GPU): tables and JSON from records, and --merge; the GPU
scripts' one-line refusals of bad input."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cli import run_cli
from kernels import configs
from model import ModelArgs
from plan import DecodePlan
from scripts import bench, bench_server, profile_decode, profile_phases, tune_gemv
from scripts.bench import (e2e_key, fixed_us_per_layer, gpu_slug, previous_records, projection_roles,
                           projection_shapes, weight_copies, write_outputs)

GPU = "NVIDIA Test GPU 80GB"


def e2e(model, s, tok_s):
    return {"model": model, "quant": "none", "dtype": "bfloat16", "sparsity": s, "tok_s": tok_s,
            "roofline_frac": 0.6, "measured_sparsity": s, "gb_s": 1800.0, "per_projection": {"q": s, "down": s},
            "decode_path": "sparse kernels" if s else "dense (cuBLAS projections)", "read_gb_s": 3000.0}


def kernel(model, proj, s, us):
    return {"model": model, "projection": proj, "K": 64, "N": 128, "sparsity": s, "measured": s, "us": us,
            "matmul_us": 10.0, "roofline_us": (1 - s) * 8.0, "config": [128, 64, 2, 4, 1, 0], "gb_s": 1.0}


def test_projection_roles_follow_the_layer():
    """A layer's launches in order: the block's first (q/k/v, gate/up) normalise their input and hand partials on,
    the others add the residual; down alone reads gate/up's gated outputs."""
    shapes = projection_shapes(ModelArgs.from_name("llama-2-7b"))
    names = list(shapes)
    assert names == ["qkv", "o", "gate_up", "down"]
    roles = [projection_roles(p) for p in names]
    assert [r.norm for r in roles] == [True, False, True, False]
    assert all(r.residual != r.norm and r.partials == r.norm for r in roles)
    assert [r.glu_in for r in roles] == [False] + [shapes[prev][2] for prev in names[:-1]]


def test_merge_keeps_other_models(tmp_path):
    slug = gpu_slug(GPU)
    assert slug == "nvidia-test-gpu-80gb"
    write_outputs(tmp_path, GPU, 3e12, [e2e("a", 0.0, 100.0), e2e("a", 0.5, 150.0), e2e("b", 0.5, 120.0)],
                  [kernel("a", "qkv", 0.0, 11.0), kernel("b", "qkv", 0.0, 12.0)], [], "first")
    # a rerun of model a's end-to-end only: b's rows and every kernel row stay
    kept = previous_records(tmp_path, GPU, "", {("a", "none", 1, 128)}, e2e_key)
    assert [(r["model"], r["tok_s"]) for r in kept] == [("b", 120.0)]
    kernels = previous_records(tmp_path, GPU, "-kernels", set())
    assert len(kernels) == 2
    runs = [{"cmd": "python scripts/bench.py --models b", "date": "2026-11-23"},
            {"cmd": "python scripts/bench.py --models a --merge", "date": "2026-11-24"}]
    kept = [dict(r, **runs[0]) for r in kept]
    rerun = [dict(e2e("a", 0.0, 101.0), **runs[1]), dict(e2e("a", 0.5, 155.0), **runs[1])]
    write_outputs(tmp_path, GPU, 3e12, kept + rerun, kernels, [], "second", merged=True)
    rows = json.loads((tmp_path / f"{slug}.json").read_text())
    assert sorted((r["model"], r["sparsity"], r["tok_s"]) for r in rows) == [
        ("a", 0.0, 101.0), ("a", 0.5, 155.0), ("b", 0.5, 120.0)]
    for r in rows:  # the record keys
        assert {"model", "quant", "dtype", "sparsity", "tok_s", "roofline_frac"} <= set(r)
    md = (tmp_path / f"{slug}.md").read_text()
    assert "| a | bf16 | 128 | 0.50 | 0.500 | 155.0 |" in md and "| b | bf16 | 128 | 0.50 | 0.500 | 120.0 |" in md
    assert "--merge" in md and "| a | qkv | 64×128 | 10.0 | 11.0 (1.38×) |" in md
    # a merged file says which command produced which models' rows
    assert "- `python scripts/bench.py --models b` on 2026-11-23: b" in md
    assert "- `python scripts/bench.py --models a --merge` on 2026-11-24: a" in md
    assert "- an earlier run (command not recorded): a, b" in md  # the kernel rows carry no command
    # a kernels-only run without --merge does not wipe the end-to-end records
    write_outputs(tmp_path, GPU, 3e12, [], [kernel("a", "qkv", 0.0, 9.0)], [], "third")
    assert json.loads((tmp_path / f"{slug}.json").read_text()) == rows
    assert previous_records(tmp_path / "missing", GPU, "", set(), e2e_key) == []
    # an int8 run of model a (`--quant int8 --merge`) keeps a's bf16 rows, and is kept by a later bf16 run of a
    assert len(previous_records(tmp_path, GPU, "", {("a", "int8", 1, 128)}, e2e_key)) == 3
    write_outputs(tmp_path, GPU, 3e12, rows + [dict(e2e("a", 0.5, 300.0), quant="int8")], [], [], "fourth")
    assert sorted(r["tok_s"] for r in previous_records(tmp_path, GPU, "", {("a", "none", 1, 128)}, e2e_key)) == [120.0, 300.0]
    assert "| a | int8 | 128 | 0.50 | 0.500 | 300.0 |" in (tmp_path / f"{slug}.md").read_text()
    # a tensor-parallel run (`torchrun --nproc-per-node 2 ... --merge`) is its own row, kept by one-GPU reruns
    rows = json.loads((tmp_path / f"{slug}.json").read_text())
    write_outputs(tmp_path, GPU, 3e12, rows + [dict(e2e("a", 0.5, 500.0), quant="int8", tp=2, all_reduce_us=7.25)],
                  [], [], "fifth")
    assert len(previous_records(tmp_path, GPU, "", {("a", "int8", 1, 128)}, e2e_key)) == 4
    assert "| a (TP 2, all-reduce 7.2 µs) | int8 | 128 | 0.50 | 0.500 | 500.0 |" in (tmp_path / f"{slug}.md").read_text()
    # a long-prompt run (`--prompt-len 3840 --merge`) is its own row too, kept by 128-token reruns and keeping them
    rows = json.loads((tmp_path / f"{slug}.json").read_text())
    write_outputs(tmp_path, GPU, 3e12, rows + [dict(e2e("a", 0.5, 140.0), prompt_len=3840)], [], [], "sixth")
    assert len(previous_records(tmp_path, GPU, "", {("a", "none", 1, 128)}, e2e_key)) == 4
    assert [r["tok_s"] for r in previous_records(tmp_path, GPU, "", {("a", "none", 1, 3840)}, e2e_key)
            if r["model"] == "a" and r["quant"] == "none"] == [101.0, 155.0]
    assert "| a | bf16 | 3840 | 0.50 | 0.500 | 140.0 |" in (tmp_path / f"{slug}.md").read_text()


def test_weight_copies_outgrow_l2():
    l2 = 50 * 2 ** 20
    assert weight_copies(180 * 2 ** 20, l2) == 4  # a big weight: 4 copies are 14x the L2
    assert weight_copies(32 * 2 ** 20, l2) == 7  # Llama-2's o: 4 copies would be 2.6x the L2
    assert weight_copies(1000, l2) * 1000 >= 4 * l2


def test_fixed_time_per_layer(tmp_path):
    # 4000 us per token, of which 6.4 GB at 3200 GB/s take 2000: 2000 us over 32 layers
    r = dict(e2e("llama-2-7b", 0.5, 250.0), bytes_per_token=6.4e9, read_gb_s=3200.0)
    assert abs(fixed_us_per_layer(r) - 62.5) < 1e-9
    # on 2 GPUs the bytes read at twice the bandwidth: 4000 - 1000 us over 32 layers
    assert abs(fixed_us_per_layer(dict(r, tp=2)) - 93.75) < 1e-9
    assert fixed_us_per_layer(e2e("a", 0.5, 150.0)) is None  # an unknown model, no byte count
    write_outputs(tmp_path, GPU, 3.2e12, [r, e2e("a", 0.5, 150.0)], [], [], "run")
    md = (tmp_path / f"{gpu_slug(GPU)}.md").read_text()
    assert "| llama-2-7b | bf16 | 128 | 0.50 | 0.500 | 250.0 | 1800 | 60.0% | 62.5 |" in md
    assert "| a | bf16 | 128 | 0.50 | 0.500 | 150.0 | 1800 | 60.0% | – |" in md


def test_gpu_script_rejects_bad_input_in_one_line_as_a_process():
    """A bad model name ends a GPU script with one line on stderr and exit status 2, before any GPU work (so also
    here, without a GPU), not with a traceback."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench.py"), "--models", "llama-2-7b,mistral-7b"],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown model config 'mistral-7b'" in r.stderr, \
        r.stderr


@pytest.mark.parametrize("script,args,message", [
    (bench, ["--sparsities", "0,0.5,half"], "--sparsities takes comma-separated numbers"),
    (bench, ["--sparsities", "0.5,1.5"], "--sparsities levels must lie in [0, 1)"),
    (bench, ["--prompt-len", "3900"], "--prompt-len must be in [1, 3840] for llama-2-7b"),
    (tune_gemv, ["--models", "llama-9"], "unknown model config 'llama-9'"),
    (profile_decode, ["--config", "llama-9"], "unknown model config 'llama-9'"),
    (profile_phases, ["--sparsities", "x"], "--sparsities takes comma-separated numbers"),
    (profile_phases, ["--quant", "int4"], "--quant profiles the NVRTC projections: add --nvrtc"),
    (profile_phases, ["--nvrtc-attention"], "--nvrtc-attention follows the NVRTC projections: add --nvrtc"),
    (profile_phases, ["--attention-pdl", "3"], "--attention-pdl applies to the NVRTC attention"),
    (bench_server, ["--model", "llama-9"], "unknown model config 'llama-9'"),
], ids=["bench-level", "bench-range", "bench-prompt", "tune_gemv", "profile_decode", "profile_phases", "profile_phases-quant",
        "profile_phases-attention", "profile_phases-pdl", "bench_server"])
def test_gpu_scripts_reject_bad_input_in_one_line(script, args, message, monkeypatch, capsys):
    """The same for every GPU script, its main() run as its __main__ runs it (run_cli) in this process."""
    monkeypatch.setattr(sys, "argv", [script.__file__, *args])
    with pytest.raises(SystemExit) as e:
        run_cli(script.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_tune_gemv_candidates_launch_on_the_formats_weights(quant):
    """Every config tune_gemv.py sweeps is one the launch accepts for the format: int4 steps within a scale group,
    whole words per tile; gate/up tiles of at most 256 int4 columns (registers); 4 warps."""
    from kernels.formats import quant_format
    fmt = quant_format(quant)
    for K, sizes, glu in [(4096, (4096, 4096, 4096), False), (4096, (11008, 11008), True), (11008, (4096,), False),
                          (576, (576, 192, 192), False)]:
        group = fmt.group(K)
        cands = tune_gemv.candidates(K, sizes, glu, 132, fmt)
        assert cands and len(set(cands)) == len(cands)
        for c in cands:
            assert all(s % c.block_n == 0 for s in (sizes[:1] if glu else sizes)) and c.num_warps == 4
            assert 1 <= c.split_k <= max(1, K // (2 * c.block_k) + 1)
            if group:
                assert group % c.block_k == 0 and c.block_n % 8 == 0 and not (glu and c.block_n > 256)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_tune_gemv_step_launches_match_the_reference(quant):
    """tune_gemv.py times each projection's launch as the decode step makes it (q/k/v and gate/up into split-K
    partials, down from gate/up's partials, o and down with the residual): in the interpreter, on a small model's
    shapes, what the consumer makes of each launch's output matches the reference at 50% on those inputs, and the
    poisoned output buffers are written."""
    from kernels.formats import quant_format
    fmt = quant_format(quant)
    args = ModelArgs(dim=128, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=256, vocab_size=64)
    torch.manual_seed(0)
    for proj, (K, sizes, glu) in projection_shapes(args).items():
        cfg = configs.default_config(1, K, sizes, glu, 4, fmt, group=fmt.group(K))
        # float16: the interpreter truncates bf16 casts (GPUs round), which skews the GLU of down's input
        step = tune_gemv.StepLaunch(proj, K, sizes, glu, cfg, fmt, 4, torch.float16, "cpu")
        w = (torch.randn(K, sum(sizes)) / K ** 0.5).to(torch.float16)
        wq, scale = fmt.quantize_weight(w) if fmt.quantized else (w, None)
        w_ref = fmt.dequantize(wq, scale) if fmt.quantized else wq.float()
        a = step.x.abs().float().flatten().sort().values  # a threshold in the gap at the median: no input sits on it
        step.t.fill_(float(a[K // 2 - 1] + a[K // 2]) / 2)
        step(wq, scale)
        y, ref = step.result().float(), step.reference(w_ref)
        assert not y.isnan().any() and ((y - ref).norm() / ref.norm()) < 1.2e-2, proj
        assert step.xin.dim() == (4 if proj == "down" else 2) and step.out.dim() == (4 if step.deferred else 2)
        assert not step.counters.any()


def test_anchors_table_for_this_gpu_only(tmp_path):
    anchors = {gpu_slug(GPU): {"date": "2026-01-01", "model": "a", "rows": [
        {"engine": "upstream", "weights": "bf16", "tok_s": {"0.00": 90.0}},
        {"engine": "fork", "weights": "fp16", "tok_s": {"0.00": 95.0, "0.50": 120.5}}]},
        "other-gpu": {"date": "2026-01-01", "model": "a", "rows": [{"engine": "x", "weights": "y", "tok_s": {"0.9": 1.0}}]}}
    (tmp_path / "anchors.json").write_text(json.dumps(anchors))
    write_outputs(tmp_path, GPU, 3e12, [e2e("a", 0.5, 150.0)], [], [], "run")
    md = (tmp_path / f"{gpu_slug(GPU)}.md").read_text()
    assert "| upstream | bf16 | 90.0 | – |" in md and "| fork | fp16 | 95.0 | 120.5 |" in md
    assert "s=0.9" not in md and md.index("## Anchors") < md.index("## End to end")
    (tmp_path / "anchors.json").unlink()
    write_outputs(tmp_path, GPU, 3e12, [e2e("a", 0.5, 150.0)], [], [], "run")
    assert "Anchors" not in (tmp_path / f"{gpu_slug(GPU)}.md").read_text()


def test_repo_anchors_parse():
    from paths import REPO
    f = REPO / "docs" / "bench" / "anchors.json"
    for slug, a in json.loads(f.read_text()).items():
        assert bench.anchor_lines(f.parent, slug)[0].startswith("## Anchors")


def test_attention_table_has_the_nvrtc_kernel_where_measured(tmp_path):
    """The attention table's NVRTC column: the kernel's time where the run measured it (sm_90), a dash elsewhere
    (older records have no such key)."""
    rows = [{"model": "a", "context": 384, "cache": 384, "us": 6.5, "torch_us": 44.5, "nvrtc_us": 5.25,
             "cache_bytes": 6275072},
            {"model": "b", "context": 2048, "cache": 2048, "us": 15.6, "torch_us": 57.1, "cache_bytes": 33538048}]
    write_outputs(tmp_path, GPU, 3e12, [], [], rows, "run")
    md = (tmp_path / f"{gpu_slug(GPU)}.md").read_text()
    assert "| a | 384 | 384 | 6.5 | 44.5 | 965 | 5.2 |" in md and "| b | 2048 | 2048 | 15.6 | 57.1 | 2150 | – |" in md


def test_decode_path_names_what_the_step_runs():
    """A record names the NVRTC projections where the first q/k/v takes kernels/cuda_gemv.py (not int4 weights:
    Gluon's or Triton's kernels), and the NVRTC attention and its PDL trigger only after them."""
    from loading import random_model
    from quantization import quantize_model
    from kernels.formats import INT4, INT8
    args = ModelArgs(dim=128, n_layer=1, n_head=2, n_kv_head=1, intermediate_size=192, vocab_size=101, max_seq_len=64)
    nvrtc = replace(DecodePlan(kernels=True, nvrtc_arch=90, nvrtc_sparse=True, nvrtc_int8=True, nvrtc_attention=True),
                    n_sm=132)
    paths = {}
    for name, fmt in (("bf16", None), ("int8", INT8), ("int4", INT4)):
        model = random_model(args, "cpu", torch.float32, seed=0).to(torch.bfloat16)
        if fmt is not None:
            quantize_model(model, fmt)
        model.setup_caches(1, 64)
        for plan in (nvrtc, replace(nvrtc, attention_pdl=3), replace(nvrtc, nvrtc_attention=False),
                     replace(nvrtc, sparse_decode=False), replace(nvrtc, nvrtc_arch=0)):
            model.set_plan(plan)
            paths.setdefault(name, []).append(bench.decode_path(model.plan, model.layers[0].attention))
    assert paths["bf16"] == ["NVRTC kernels, NVRTC attention", "NVRTC kernels, NVRTC attention (PDL 3)", "NVRTC kernels",
                             "dense (NVRTC projections), NVRTC attention", "sparse kernels"]
    # quantized weights decode on the sparse route at every level (set_plan keeps sparse_decode on for them)
    assert paths["int8"] == paths["bf16"][:3] + ["NVRTC kernels, NVRTC attention", "sparse kernels"]
    assert paths["int4"] == ["sparse kernels"] * 5
