"""quantization.py (and the quantize.py CLI): RTN int8 with a scale per output channel and int4 with a scale and offset per group of inputs, the
model-<scheme>.safetensors files, and loading quantized weights (from that file, or quantized on load): the same
weights either way, logits close to the 16-bit model's. The formats themselves (rounding, packing, shapes):
tests/test_formats.py."""
import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import read_metadata, save_checkpoint
from errors import UserError
from kernels.formats import INT4, INT8, QUANT_FORMATS, rtn_int8
from loading import load_model, random_model, random_tensors
from model import ModelArgs, SparseLinear
from quantization import quant_file, quant_structure, quantize_model, save_quantized
from sparsity import capture_inputs, set_uniform_thresholds

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(arch="llama", dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300,
            max_seq_len=128)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture()
def ckpt(tmp_path):
    args = ModelArgs(**TINY)
    save_checkpoint(tmp_path, args, random_tensors(args, torch.float32, "cpu", 0), torch.float32)
    return tmp_path


def test_int8_file_and_quantize_on_load_agree(ckpt):
    """quantize.py's file and quantizing while loading give the same weights; both keep the source's fingerprint
    (so its calibration applies); logits stay close to the float32 model's."""
    ref = load_model(ckpt)
    on_load = load_model(ckpt, quant=INT8)
    assert not (ckpt / quant_file(INT8)).exists()
    path = save_quantized(quantize_model(load_model(ckpt), INT8), ckpt, read_metadata(ckpt), INT8)
    from_file = load_model(ckpt, quant=INT8)
    for a, b in zip(on_load.state_dict().items(), from_file.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    w = from_file.layers[0].attention.wqkv
    assert w.weight.dtype == torch.int8 and w.scale.dtype == torch.float32
    assert from_file.fingerprint == ref.fingerprint and path.stat().st_size < (ckpt / "model.safetensors").stat().st_size
    idx = torch.randint(0, 300, (1, 12))
    for m in (ref, from_file):
        m.setup_caches(1, 16)
    with torch.no_grad():
        assert rel_err(from_file(idx, torch.arange(12)), ref(idx, torch.arange(12))) < 3e-2


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_int8_lm_head(tmp_path, tied):
    """The LM head is quantized too: an int8 SparseLinear [dim, vocab] with one scale per vocabulary entry and zero
    thresholds (in slices of the vocabulary: the same as quantizing it whole). A head tied to the embedding gets
    its own int8 copy and the lookup keeps the float table; the file holds that copy and loads back the same."""
    args = ModelArgs(**{**TINY, "vocab_size": 8192 + 300, "tie_embeddings": tied})
    save_checkpoint(tmp_path, args, random_tensors(args, torch.float32, "cpu", 0), torch.float32)
    ref = load_model(tmp_path)
    on_load = load_model(tmp_path, quant=INT8)
    head = on_load.output
    assert isinstance(head, SparseLinear) and head.head and head.weight.dtype == torch.int8
    assert head.weight.shape == (64, 8192 + 300) and head.weight.is_contiguous() and not head.threshold.any()
    q, scale = rtn_int8(ref.output.weight.t())
    assert torch.equal(head.weight, q) and torch.equal(head.scale, scale)
    assert torch.equal(on_load.tok_embeddings.weight, ref.tok_embeddings.weight)  # the lookup stays float
    save_quantized(quantize_model(load_model(tmp_path), INT8), tmp_path, read_metadata(tmp_path), INT8)
    from_file = load_model(tmp_path, quant=INT8)
    for a, b in zip(on_load.state_dict().items(), from_file.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    assert torch.equal(from_file.tok_embeddings.weight, ref.tok_embeddings.weight)
    x = torch.randn(2, 3, 64)
    assert rel_err(from_file.output(x), ref.output(x)) < 1e-2
    idx = torch.randint(0, args.vocab_size, (1, 12))
    for m in (ref, from_file):
        m.setup_caches(1, 16)
    with torch.no_grad():
        assert rel_err(from_file(idx, torch.arange(12)), ref(idx, torch.arange(12))) < 3e-2


def test_int8_file_of_an_earlier_scheme_is_refused(ckpt, monkeypatch):
    """An int8 file without the quantized head (the scheme before it) asks for re-quantizing, not a wrong load."""
    earlier = dataclasses.replace(INT8, scheme="int8-rtn-channel")
    save_quantized(quantize_model(load_model(ckpt), INT8), ckpt, read_metadata(ckpt), earlier)
    monkeypatch.undo()
    with pytest.raises(UserError, match="re-run quantize.py"):
        load_model(ckpt, quant=INT8)


def test_int8_model_keeps_sparsity_semantics(ckpt):
    """Thresholds apply to the inputs as before: an int8 model at 50% equals its dense self with the same inputs
    zeroed, i.e. the reference path multiplies the sparsified input by q and then by the scale."""
    model = load_model(ckpt, quant=INT8)
    set_uniform_thresholds(model, capture_inputs(model, torch.randint(0, 300, (1, 20))), 0.5)
    lin = model.layers[1].feed_forward.w2
    x = torch.randn(1, 3, lin.weight.shape[0])
    keep = x.abs() > lin.threshold[0]
    y = lin(x, sparse=True)
    assert torch.allclose(y, ((x * keep) @ lin.weight.float()) * lin.scale, atol=1e-5)


@pytest.mark.slow
def test_bad_int8_inputs(ckpt, tmp_path):
    with pytest.raises(UserError, match="TEAL MLP"):
        load_model(ckpt, quant=INT8, mlp="cats")
    other = tmp_path / "other"
    args = ModelArgs(**TINY)
    save_checkpoint(other, args, random_tensors(args, torch.float32, "cpu", 1), torch.float32)
    save_quantized(quantize_model(load_model(other), INT8), ckpt, read_metadata(other), INT8)  # another model's int8 file
    with pytest.raises(UserError, match="re-run quantize.py"):
        load_model(ckpt, quant=INT8)
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--checkpoint", str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr


def test_quantize_cli_writes_the_file(ckpt):
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--checkpoint", str(ckpt)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (ckpt / quant_file(INT8)).exists() and "wrote" in r.stdout


@pytest.mark.parametrize("fmt", [f for f in QUANT_FORMATS.values() if not f.calibrated],
                         ids=[n for n, f in QUANT_FORMATS.items() if not f.calibrated])  # awq: tests/test_awq.py
def test_quant_structure_matches_quantized_state_dict(fmt):
    model = random_model(ModelArgs(**TINY), "cpu", torch.float32)
    q = quantize_model(copy.deepcopy(model), fmt)
    with torch.device("meta"):
        shell = type(model)(model.args)
    quant_structure(shell, fmt)
    assert {k: (v.shape, v.dtype) for k, v in shell.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in q.state_dict().items()}
    assert all(m.scale is not None for m in q.modules() if isinstance(m, SparseLinear))


def test_int4_file_and_quantize_on_load_agree(ckpt):
    """int4 as int8 above: the file and quantizing on load give the same weights (the head int8 in both), and
    logits stay near the float32 model's."""
    ref = load_model(ckpt)
    on_load = load_model(ckpt, quant=INT4)
    path = save_quantized(quantize_model(load_model(ckpt), INT4), ckpt, read_metadata(ckpt), INT4)
    assert path.name == quant_file(INT4)
    from_file = load_model(ckpt, quant=INT4)
    for a, b in zip(on_load.state_dict().items(), from_file.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    w = from_file.layers[0].feed_forward.w13
    assert w.weight.dtype == torch.int32 and w.weight.shape == (64, 2 * 96 // 8) and w.scale.shape == (2, 1, 192)
    assert from_file.output.weight.dtype == torch.int8
    idx = torch.randint(0, 300, (1, 12))
    for m in (ref, from_file):
        m.setup_caches(1, 16)
    with torch.no_grad():
        # (4-bit RTN moves a Gaussian weight by ~8% of its spread: 17% here over two layers and the head)
        assert rel_err(from_file(idx, torch.arange(12)), ref(idx, torch.arange(12))) < 0.3
    with pytest.raises(UserError, match="re-run quantize.py"):  # an int8 file is not taken for int4 weights
        (ckpt / quant_file(INT8)).write_bytes(path.read_bytes())
        load_model(ckpt, quant=INT8)
