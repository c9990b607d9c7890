"""checkpoint.py, the CKPT file format: config.json and model.safetensors written and read back (the kernel layout,
the metadata), a fingerprint that ignores the stored dtype but not the weights, and one clear error for each way a
checkpoint directory can be wrong."""
import json

import pytest
import torch
from safetensors import safe_open

from checkpoint import (FINGERPRINT_KEYS, FORMAT, WEIGHTS, fingerprint, read_config, read_metadata, read_staged,
                        save_checkpoint, state_dict_shapes)
from errors import UserError
from loading import random_tensors
from model import ModelArgs

TINY = dict(arch="llama", dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=300,
            max_seq_len=128)


def saved(path, dtype=torch.float32, seed=0, **over):
    args = ModelArgs(**{**TINY, **over})
    tensors = [(k, t.to(dtype)) for k, t in random_tensors(args, torch.float32, "cpu", seed)]
    save_checkpoint(path, args, iter(tensors), dtype)
    return args, dict(tensors)


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_round_trip(tmp_path, tied):
    args, tensors = saved(tmp_path, tie_embeddings=tied)
    assert read_config(tmp_path) == args
    assert json.loads((tmp_path / "config.json").read_text()) == args.to_dict()
    meta = read_metadata(tmp_path)
    assert meta["format"] == FORMAT and meta["layout"] == "input-major" and meta["dtype"] == "float32"
    assert meta["fingerprint"] == fingerprint(args, {k: tensors[k] for k in FINGERPRINT_KEYS})
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        assert list(f.keys()) == sorted(state_dict_shapes(args, torch.float32))  # no output.weight when tied
        assert ("output.weight" in f.keys()) != tied
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), tensors[k]), k
        wqkv = f.get_tensor("layers.0.attention.wqkv.weight")
    assert wqkv.shape == (64, 64 + 2 * 32)  # the kernel layout: [in, out]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_staged_read_equals_safetensors(tmp_path, dtype):
    """The GPU load's reader (read_staged: pread into a few buffers, copies out of them), run on the CPU with
    buffers of an odd size smaller than most tensors and fewer buffers than chunks: every tensor as safetensors
    reads it; a truncated file and a header pointing past the end are refused."""
    saved(tmp_path, dtype)
    path = tmp_path / WEIGHTS
    got = read_staged(path, torch.device("cpu"), stage_bytes=1000, n_stages=3)
    with safe_open(str(path), "pt") as f:
        assert sorted(got) == sorted(f.keys())
        for k in f.keys():
            want = f.get_tensor(k)
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="out of the file"):
        read_staged(tmp_path / "cut.safetensors", torch.device("cpu"))
    (tmp_path / "head.safetensors").write_bytes(data[:8])
    with pytest.raises(ValueError, match="header"):
        read_staged(tmp_path / "head.safetensors", torch.device("cpu"))


def test_fingerprint_ignores_dtype_but_not_weights(tmp_path):
    saved(tmp_path / "f32")
    saved(tmp_path / "bf16", torch.bfloat16)
    saved(tmp_path / "other", seed=1)
    f32, bf16, other = (read_metadata(tmp_path / d) for d in ("f32", "bf16", "other"))
    assert bf16["dtype"] == "bfloat16" and bf16["fingerprint"] == f32["fingerprint"]
    assert other["fingerprint"] != f32["fingerprint"]
    assert (tmp_path / "bf16" / WEIGHTS).stat().st_size < (tmp_path / "f32" / WEIGHTS).stat().st_size


def test_read_config_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_config(tmp_path / "missing")
    saved(tmp_path / "ckpt")
    with pytest.raises(UserError, match="is a file: --checkpoint takes the directory"):
        read_config(tmp_path / "ckpt" / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        read_config(empty)
    with pytest.raises(UserError, match=f"has no {WEIGHTS}"):
        read_metadata(empty)
    (empty / "config.json").write_text("{ not json")
    with pytest.raises(UserError, match="not a valid config"):
        read_config(empty)
    (empty / "config.json").write_text(json.dumps({"dim": 64}))
    with pytest.raises(UserError, match="missing n_layer"):
        read_config(empty)
    (empty / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_metadata(empty)


def test_random_tensors_vocab_zeros():
    """vocab_zeros: the embedding and LM head zero (sm90.py's full-vocabulary layers), every other tensor still drawn
    (same names and shapes, finite)."""
    args = ModelArgs(**TINY)
    drawn = dict(random_tensors(args, torch.float32, "cpu", 0))
    zeroed = dict(random_tensors(args, torch.float32, "cpu", 0, vocab_zeros=True))
    assert drawn.keys() == zeroed.keys()
    for k in ("tok_embeddings.weight", "output.weight"):
        assert zeroed[k].shape == drawn[k].shape and not zeroed[k].any() and drawn[k].any()
    assert all(zeroed[k].shape == drawn[k].shape and zeroed[k].isfinite().all() for k in drawn)
