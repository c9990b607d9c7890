"""scripts/gpu_check.py's CPU-side logic: moving the thresholds into gaps between the reference decode's inputs."""
import torch

from loading import random_model
from model import ModelArgs
from scripts import gpu_check as gc
from sparsity import capture_inputs, input_hooks, set_uniform_thresholds


def decode_inputs(model, prompt, tokens) -> dict:
    """{module: |a| of every decode step, flattened} over the teacher-forced decode."""
    seen = {}

    def grab(mod, a):
        if a.shape[1] == 1:
            seen.setdefault(mod, []).append(a.float().abs().flatten())

    with input_hooks(model, grab):
        gc.decode_logits(model, prompt, tokens)
    return {m: torch.cat(v) for m, v in seen.items()}


@torch.no_grad()
def test_thresholds_move_into_wider_gaps_and_keep_every_mask():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=101)
    model = random_model(args, "cpu", torch.float32, seed=1)
    set_uniform_thresholds(model, capture_inputs(model, torch.randint(0, 101, (1, 24))), 0.5)
    model.setup_caches(1, 64)
    prompt, tokens = torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 40))
    inputs = decode_inputs(model, prompt, tokens)
    old = {m: m.threshold.flatten()[0].item() for m in inputs}
    # the margin the plain gap around each threshold would give
    plain = float("inf")
    for m, a in inputs.items():
        v = a.sort().values
        i = int(torch.searchsorted(v, torch.tensor(old[m]), right=True))
        plain = min(plain, ((v[i] - v[i - 1]) / (v[i] + v[i - 1])).item())

    margin, logits = gc.move_thresholds_into_gaps(model, prompt, tokens, window=0.05)
    assert margin > plain > 0
    after = decode_inputs(model, prompt, tokens)
    first = next(iter(inputs))  # its inputs do not depend on any threshold: its sparsity moved by <= window / 2
    new = first.threshold.flatten()[0].item()
    assert new != old[first]
    assert abs((inputs[first] > new).float().mean() - (inputs[first] > old[first]).float().mean()) <= 0.025
    for m, a in after.items():  # every threshold sits mid-gap in the final decode: no input within margin * t
        t = m.threshold.flatten()[0].item()
        assert ((a - t).abs() >= margin * t * (1 - 1e-4)).all()  # (margin is rounded in fp32)
    again = gc.decode_logits(model, prompt, tokens)
    assert all(torch.equal(a, b) for a, b in zip(logits, again))  # the logits of the decode with them all moved


def test_int8_kernel_check_runs_and_catches_a_wrong_scale(monkeypatch):
    """check_quant_kernels (which runs on the GPU) on small shapes in Triton's interpreter: it passes on the kernels
    as they are, and reports a launch whose output is off (the scales doubled). The bound is looser than the GPU's:
    the interpreter truncates bf16 casts where GPUs round (norm, GLU and output: ~2% against float64)."""
    shapes = {"o": (72, (37,), False, True, False), "gate_up": (90, (33, 33), True, False, False),
              "head": (200, (600,), False, False, True)}
    check = dict(levels=(0.0,), device="cpu", bound=5e-2)
    assert gc.check_quant_kernels(4, shapes, **check) == []
    launch = gc.sparse_gemv.launch
    monkeypatch.setattr(gc.sparse_gemv, "launch", lambda *a, scale, **k: launch(*a, scale=scale * 2, **k))
    assert len(gc.check_quant_kernels(4, shapes, **check)) == 2 * len(shapes)


def test_int4_kernel_check_runs_and_catches_a_wrong_scale(monkeypatch):
    """The same with int4 weights (their LM head is int8: head shapes are skipped)."""
    shapes = {"o": (64, (40,), False, True, False), "gate_up": (96, (40, 40), True, False, False),
              "head": (200, (600,), False, False, True)}
    check = dict(levels=(0.0,), device="cpu", bound=5e-2, quant="int4")
    assert gc.check_quant_kernels(4, shapes, **check) == []
    launch = gc.sparse_gemv.launch
    monkeypatch.setattr(gc.sparse_gemv, "launch", lambda *a, scale, **k: launch(*a, scale=scale * 2, **k))
    assert len(gc.check_quant_kernels(4, shapes, **check)) == 2 * 2  # two shapes, batch 1 and 3
