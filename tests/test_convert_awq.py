"""AutoAWQ checkpoints (GEMM version) converted into INT4 without a detour through 16-bit weights: a tiny HF
directory in AutoAWQ's exact on-disk layout (qweight / qzeros int32 [in, out/8] and [in/g, out/8] with eight 4-bit
values per word in the order 0, 2, 4, 6, 1, 3, 5, 7; scales float16 [in/g, out]; w = (q - z) * s), checked against
a plain-PyTorch dequantization of those tensors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import calibrate
from checkpoint import read_metadata
from convert import convert_hf
from errors import UserError
from kernels.formats import FLOAT, INT4, INT8
from loading import load_model
from model import SparseLinear
from sparsity import (CALIB_FILE, DEFAULT_CRITERION, apply_thresholds, load_calibration, measure_sparsity,
                      parameter_weighted)
from tokenizer import byte_tokenizer_files

ROOT = Path(__file__).resolve().parent.parent

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
HF = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
          vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
PROJ = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
        "self_attn.o_proj": (128, 128), "mlp.gate_proj": (192, 128), "mlp.up_proj": (192, 128),
        "mlp.down_proj": (128, 192)}  # (out, in)


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """[R, N] values 0..15 -> int32 [R, N/8] as AutoAWQ's WQLinear_GEMM.from_linear packs them."""
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for c in range(q.shape[1] // 8):
        for i in range(8):
            words[:, c] |= q[:, 8 * c + ORDER[i]].long() << (4 * i)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def awq_dir(path, group=64, quant_config=None, seed=0):
    """An HF directory in AutoAWQ's layout -> {projection key: float32 weight [out, in] = (q - z) * s}."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    qc = quant_config or {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                          "version": "gemm"}
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **HF,
                                                  "quantization_config": qc}))
    sd, dequant = {}, {}
    sd["model.embed_tokens.weight"] = torch.randn(300, 128, generator=g).half()
    sd["lm_head.weight"] = (torch.randn(300, 128, generator=g) / 11).half()
    sd["model.norm.weight"] = torch.ones(128).half()
    for i in range(2):
        sd[f"model.layers.{i}.input_layernorm.weight"] = (1 + torch.rand(128, generator=g) / 4).half()
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = (1 + torch.rand(128, generator=g) / 4).half()
        for name, (n_out, n_in) in PROJ.items():
            q = torch.randint(0, 16, (n_in, n_out), generator=g)  # [in, out]: AutoAWQ's input-major intweight
            z = torch.randint(0, 16, (n_in // group, n_out), generator=g)
            s = (torch.rand(n_in // group, n_out, generator=g) * 0.02 + 0.005).half()
            key = f"model.layers.{i}.{name}"
            sd[key + ".qweight"], sd[key + ".qzeros"], sd[key + ".scales"] = awq_pack(q), awq_pack(z), s
            zr, sr = z.repeat_interleave(group, 0), s.float().repeat_interleave(group, 0)
            dequant[key] = ((q - zr).float() * sr).t()  # [out, in], as nn.Linear holds it
    save_file(sd, str(path / "model.safetensors"))
    return dequant


@pytest.mark.parametrize("group", [64, 32])
def test_awq_checkpoint_converts_to_int4(tmp_path, group):
    dequant = awq_dir(tmp_path / "hf", group)
    convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    meta = read_metadata(tmp_path / "ckpt")
    assert meta["quantization"] == f"int4-awq-g{group}-int8-head"
    model = load_model(tmp_path / "ckpt")
    att, ff = model.layers[1].attention, model.layers[1].feed_forward
    assert att.wqkv.fmt.code == INT4.code and att.wqkv.weight.dtype == torch.int32  # no 16-bit copy in the file
    assert att.wqkv.scale.shape == (2, 128 // group, 256) and isinstance(model.output, SparseLinear)
    pre = "model.layers.1."
    want = {att.wqkv: torch.cat([dequant[pre + p] for p in ("self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj")]),
            att.wo: dequant[pre + "self_attn.o_proj"], ff.w2: dequant[pre + "mlp.down_proj"],
            ff.w13: torch.cat([dequant[pre + "mlp.gate_proj"], dequant[pre + "mlp.up_proj"]])}
    for lin, w in want.items():
        got = lin.fmt.dequantize(lin.weight, lin.scale)  # [in, out]
        step = lin.scale[0].float().repeat_interleave(group, 0)
        # the offsets -z s are rounded to float16: within half an ulp of z s < 16 s, i.e. s / 128
        assert ((got - w.t()).abs() <= step / 128 + 1e-7).all()


def test_awq_logits_match_the_dequantized_model(tmp_path):
    """The converted model's logits (int4 reference path, int8 head) equal those of the same model holding the
    plain-PyTorch dequantization of the AWQ tensors in float32."""
    dequant = awq_dir(tmp_path / "hf", 64, seed=1)
    convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    awq = load_model(tmp_path / "ckpt", dtype=torch.float32)
    ref = load_model(tmp_path / "ckpt", dtype=torch.float32)
    for i, layer in enumerate(ref.layers):
        pre = f"model.layers.{i}."
        for lin, names in ((layer.attention.wqkv, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                           (layer.attention.wo, ("self_attn.o_proj",)),
                           (layer.feed_forward.w13, ("mlp.gate_proj", "mlp.up_proj")),
                           (layer.feed_forward.w2, ("mlp.down_proj",))):
            lin.fmt, lin.scale = FLOAT, None
            lin.weight = torch.nn.Parameter(torch.cat([dequant[pre + n] for n in names]).t().contiguous(),
                                            requires_grad=False)
    idx = torch.randint(0, 300, (1, 10))
    for m in (awq, ref):
        m.setup_caches(1, 16)
    with torch.no_grad():
        a, b = awq(idx, torch.arange(10)), ref(idx, torch.arange(10))
    assert ((a - b).norm() / b.norm()).item() < 3e-3


@pytest.mark.parametrize("change,what", [({"version": "gemv"}, "only GEMM"), ({"bits": 8}, "only 4"),
                                         ({"zero_point": False}, "zero points"), ({"group_size": 16}, "group size 16"),
                                         ({"quant_method": "gptq"}, "'gptq'-quantized")])
def test_unsupported_awq_variants_get_one_line(tmp_path, change, what):
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", **change}
    awq_dir(tmp_path / "hf", 64, quant_config=qc)
    with pytest.raises(UserError, match=what) as e:
        convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert "\n" not in str(e.value)


def test_quant_flag_of_another_format_is_refused(tmp_path):
    awq_dir(tmp_path / "hf", 64)
    convert_hf(tmp_path / "hf", tmp_path / "ckpt")
    with pytest.raises(UserError, match="holds int4 weights"):
        load_model(tmp_path / "ckpt", quant=INT8)
    assert load_model(tmp_path / "ckpt", quant=INT4).layers[0].attention.wqkv.fmt.group_size == 64


def test_converted_awq_checkpoint_calibrates(tmp_path):
    """calibrate.py on a converted AutoAWQ checkpoint (no float weights anywhere): statistics and column norms of
    the dequantized weights; its thresholds then measure about the level asked for."""
    awq_dir(tmp_path / "hf", 64, seed=2)
    ckpt = tmp_path / "ckpt"
    convert_hf(tmp_path / "hf", ckpt)
    for name, content in byte_tokenizer_files(300).items():
        (ckpt / name).write_text(json.dumps(content) + "\n")
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text())
    calibrate.main(["--checkpoint", str(ckpt), "--text", str(text), "--tokens", "512", "--seq-len", "64", "--skip",
                    "8", "--batch", "4", "--greedy-seqs", "2", "--aim-seqs", "4"])
    model = load_model(ckpt)
    calib = load_calibration(model, ckpt / CALIB_FILE)
    norms = calib.norms["down"]
    assert norms.shape == (2, 192) and torch.isfinite(norms).all() and (norms > 0).all()
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    apply_thresholds(model, calib, 0.5, "greedy", DEFAULT_CRITERION)
    got = parameter_weighted(model, measure_sparsity(model, idx, sparse_from=8, start=8))
    assert abs(got - 0.5) < 0.1, got
