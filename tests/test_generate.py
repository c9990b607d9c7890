"""generate.py end to end through subprocesses: tiny generation, chat loop, and every bad input ending in one
clear stderr line with a non-zero exit."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
from cli import keep_compile_caches, run_cli
from checkpoint import save_checkpoint
from loading import random_tensors
from model import ModelArgs
from paths import CACHE
from tokenizer import byte_tokenizer_files
from tests.test_tokenizer import LLAMA2

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(arch="llama", dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300,
            max_seq_len=128)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    args = ModelArgs(**TINY)
    save_checkpoint(out, args, random_tensors(args, torch.float32, "cpu", 0), torch.float32)
    for name, content in byte_tokenizer_files(args.vocab_size).items():
        (out / name).write_text(json.dumps(content) + "\n")
    return out


def run(*argv, stdin=None):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, argv)], capture_output=True,
                          text=True, input=stdin, env=env, cwd=ROOT, timeout=300)


def assert_clean_error(r, needle):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr and needle in lines[0], r.stderr


def test_tiny_generation_reports_figures(tiny_ckpt):
    r = run("--checkpoint", tiny_ckpt, "--prompt", "hello", "--max-new-tokens", "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    for word in ("time to first token", "tok/s", "GB/s of weights read", "peak memory"):
        assert word in r.stderr
    assert "compiled" not in r.stderr  # no compilation on a CPU unless asked


def test_compile_caches_kept_under_the_repository_cache(monkeypatch):
    """Every CLI (run_cli) points torch's and Triton's compile caches at .cache/compile, unless the environment
    already names a place."""
    monkeypatch.setattr(os, "environ", {"TRITON_CACHE_DIR": "/elsewhere"})
    keep_compile_caches()
    assert os.environ == {"TORCHINDUCTOR_CACHE_DIR": str(CACHE / "compile" / "inductor"),
                          "TRITON_CACHE_DIR": "/elsewhere"}


@pytest.mark.slow
def test_compilation_happens_before_the_first_sample(tiny_ckpt):
    """With --compile the graphs are built by a warm-up, timed on its own line: every sample's figures are the
    compiled step's."""
    r = run("--checkpoint", tiny_ckpt, "--prompt", "hello", "--max-new-tokens", "6", "--device", "cpu", "--compile",
            "--num-samples", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    compiled = [i for i, line in enumerate(lines) if re.match(r"\[compiled in [0-9.]+ s", line)]
    samples = [i for i, line in enumerate(lines) if line.startswith("[sample ")]
    assert len(compiled) == 1 and len(samples) == 2 and compiled[0] < samples[0], r.stderr


@pytest.mark.slow
def test_interactive_chat_loop(tiny_ckpt, tmp_path):
    assert_clean_error(run("--checkpoint", tiny_ckpt, "--interactive", stdin="hi\n"), "chat template")
    for f in tiny_ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = run("--checkpoint", tmp_path, "--interactive", "--max-new-tokens", "4",
            stdin="hi\n/help\n/nonsense\nthere\n/reset\nagain\n\n")
    assert r.returncode == 0, r.stderr
    assert "/help lists the commands" in r.stderr.splitlines()[0]
    for needle in ("/sparsity S", "/reset", "Ctrl-C stops a reply", "unknown command /nonsense"):
        assert needle in r.stderr
    turns = [tuple(map(int, m)) for m in re.findall(r"\[prefilled (\d+) of (\d+) tokens", r.stderr)]
    assert len(turns) == 3, r.stderr
    (p1, n1), (p2, n2), (p3, n3) = turns
    assert p1 == n1 and n2 > n1 + 4  # the first turn prefills everything; the second holds the first and its reply
    # ... and prefills only what follows the cached part: the first turn at least (this random model's replies are
    # placeholder tokens whose text encodes to other ids, so its reply is prefilled again; real replies round-trip)
    assert p2 <= n2 - n1
    assert p3 == n3  # after /reset: a new conversation


def test_bad_checkpoint_flag_as_a_process():
    assert_clean_error(run("--checkpoint", "/nonexistent/ckpt"), "does not exist")


@pytest.mark.parametrize("argv,needle", [
    (["--sparsity", "1.0"], "--sparsity"),
    (["--sparsity", "-0.1"], "--sparsity"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--top-p", "0"], "--top-p"),
])
def test_bad_flags(tiny_ckpt, argv, needle, monkeypatch, capsys):
    """generate.py's main() as its __main__ runs it (run_cli), in this process: one line, exit status 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: generate.main(["--checkpoint", str(tiny_ckpt), *argv]))
    assert e.value.code == 2
    assert_clean_error(subprocess.CompletedProcess([], 2, "", capsys.readouterr().err), needle)


@pytest.mark.slow
def test_prompt_longer_than_context(tiny_ckpt):
    assert_clean_error(run("--checkpoint", tiny_ckpt, "--prompt", "x" * 200, "--max-new-tokens", "4"), "context")


@pytest.mark.slow
def test_corrupt_checkpoint(tiny_ckpt, tmp_path):
    for f in tiny_ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_clean_error(run("--checkpoint", tmp_path), "safetensors")
    (tmp_path / "config.json").write_text("{not json")
    assert_clean_error(run("--checkpoint", tmp_path), "config")


@pytest.mark.slow
def test_unknown_architecture(tiny_ckpt, tmp_path):
    for f in tiny_ckpt.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["arch"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("--checkpoint", tmp_path), "gpt_neox")


@pytest.mark.slow
def test_missing_weights(tiny_ckpt, tmp_path):
    (tmp_path / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    assert_clean_error(run("--checkpoint", tmp_path), "model.safetensors")


def test_dense_decode_path_ignores_thresholds():
    """A plan at level 0 (what generate.py uses at --sparsity 0) decodes dense whatever the thresholds; moving it
    to a sparse level decodes sparse, as a fresh model's default plan does."""
    from engine import Generator
    from loading import random_model
    from plan import REFERENCE
    from sparsity import capture_inputs, set_uniform_thresholds
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=50, max_seq_len=64)
    model = random_model(args, "cpu", torch.float32, seed=0)
    prompt = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    model.set_plan(model.plan.at_level(0.0))
    gen = Generator(model)
    gen.setup(1, 32)
    dense, _ = gen.generate(prompt, 12)
    set_uniform_thresholds(model, capture_inputs(model, prompt), 0.6)
    assert torch.equal(gen.generate(prompt, 12)[0], dense)
    model.set_plan(model.plan.at_level(0.6))
    sparse, _ = gen.generate(prompt, 12)
    assert not torch.equal(sparse, dense)
    model.set_plan(REFERENCE)  # a fresh model's plan: sparse decode
    assert torch.equal(gen.generate(prompt, 12)[0], sparse)
