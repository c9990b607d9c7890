"""Hugging Face directories and GGUF files -> CKPT (see checkpoint.py). The CLIs live in scripts/."""
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open
from tqdm import tqdm

from checkpoint import save_checkpoint, state_dict_shapes
from errors import UserError
from kernels.formats import FLOAT, QuantFormat, from_awq, int4_variant
from model import ModelArgs
from quantization import quantized_shapes
from tokenizer import tokenizer_files_from_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "original/tokenizer.model")


FUSED = {"attention.wqkv": ("q", "k", "v"), "attention.wo": ("o",), "feed_forward.w13": ("gate", "up"),
         "feed_forward.w2": ("down",)}  # our sparse linears and the source projections each joins, in order


def convert_tensors(args: ModelArgs, get: Callable[[str], torch.Tensor], names: dict, shapes: Optional[dict] = None,
                    fmt: QuantFormat = FLOAT):
    """(name, tensor) of our checkpoint in the order of `shapes` (default: the float model's). `get(key)` fetches a
    source tensor [out, in]; `names` maps our roles to source keys with {i} for the layer. With a quantized `fmt`
    (AWQ), the sparse linears come from the source's AutoAWQ tensors (<projection>.qweight, .qzeros, .scales),
    repacked as `fmt` (kernels/formats.from_awq), never as 16-bit weights."""
    shapes = shapes or state_dict_shapes(args, torch.float32)
    awq = {}  # (words, scale) of the linear being written: its weight and its scale are two entries
    for name in tqdm(shapes, desc="converting", unit="tensor"):
        parts = name.split(".")
        if parts[0] != "layers":
            yield name, get(names[name])
            continue
        i, role = int(parts[1]), ".".join(parts[2:])
        module, field = role.rsplit(".", 1)
        keys = [names[p].format(i=i) for p in FUSED.get(module, ())]
        if not keys:
            w = get(names[role].format(i=i))
        elif fmt.quantized:
            if module not in awq:
                awq = {module: [from_awq(*(get(k.removesuffix(".weight") + s) for s in AWQ_TENSORS)) for k in keys]}
            w = torch.cat([q if field == "weight" else scale for q, scale in awq[module]], dim=1 if field == "weight" else 2)
        else:
            w = torch.cat([get(k) for k in keys], dim=0).t()
        yield name, w.contiguous()


AWQ_TENSORS = (".qweight", ".qzeros", ".scales")


def awq_format(hf_cfg: dict) -> QuantFormat:
    """The format of a quantized HF config's weights: AutoAWQ's GEMM layout (4 bits, zero points, groups of 128, 64
    or 32) as INT4; anything else one clear error naming what is unsupported. FLOAT for an unquantized config."""
    q = hf_cfg.get("quantization_config")
    if not q:
        return FLOAT
    method = q.get("quant_method")
    if method != "awq":
        raise UserError(f"{method!r}-quantized checkpoints are not supported (AWQ GEMM is; or convert 16-bit weights)")
    version = str(q.get("version", "gemm")).lower()
    bits, group, zero = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size")), q.get("zero_point")
    unsupported = [what for what, bad in ((f"version {version!r} (only GEMM)", version != "gemm"),
                                          (f"{bits} bits (only 4)", bits != 4),
                                          ("no zero points (only zero_point: true)", zero is False),
                                          (f"group size {group} (only 128, 64, 32)", group not in (128, 64, 32)))
                   if bad]
    if unsupported:
        raise UserError("unsupported AWQ checkpoint: " + "; ".join(unsupported))
    return int4_variant(group, "awq")


HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
    "attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


class _HFWeights:
    """Lazy access to a HF directory's tensors: (sharded) safetensors, or .bin via weights-only torch.load."""

    def __init__(self, hf_dir: Path):
        files = sorted(hf_dir.glob("*.safetensors"))
        self.where, self.handles = {}, {}
        if files:
            for f in files:
                h = safe_open(str(f), "pt")
                self.handles[f] = h
                self.where.update({k: (f, h) for k in h.keys()})
            return
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise UserError(f"{hf_dir} has no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # corrupt or not a weights-only pickle
                raise UserError(f"could not load {f}: {e}") from None
            self.where.update({k: (f, sd) for k in sd})

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise UserError(f"the checkpoint has no tensor {key!r}")
        _, h = self.where[key]
        return h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]


def convert_hf(hf_dir: Path, out: Path, dtype: Optional[torch.dtype] = None) -> ModelArgs:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise UserError(f"{hf_dir} has no config.json: is it a Hugging Face model directory?")
    try:
        hf_cfg = json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{hf_dir / 'config.json'} is not valid JSON: {e}") from None
    args = ModelArgs.from_hf_config(hf_cfg)
    fmt = awq_format(hf_cfg)
    get = _HFWeights(hf_dir)
    if dtype is None:
        dtype = get(HF_NAMES["tok_embeddings.weight"]).dtype
    if fmt.quantized:  # the sparse linears stay 4-bit in model.safetensors; the rest in `dtype`
        shapes = quantized_shapes(args, fmt, dtype)
        save_checkpoint(Path(out), args, convert_tensors(args, get, HF_NAMES, shapes, fmt), dtype,
                        {"source": "hf-awq", "quantization": fmt.scheme}, shapes)
    else:
        save_checkpoint(Path(out), args, convert_tensors(args, get, HF_NAMES), dtype, {"source": "hf"})
    copy_tokenizer_files(hf_dir, Path(out))
    return args


def copy_tokenizer_files(src: Path, out: Path):
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, out / name)


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight", "attention_norm.weight": "blk.{i}.attn_norm.weight",
    "ffn_norm.weight": "blk.{i}.ffn_norm.weight",
}


def gguf_metadata(reader) -> dict:
    """GGUF key/value metadata as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # an exotic field type we never need
            continue
    return out


def gguf_args(kv: dict, has_output: bool, rope_freqs: Optional[list]) -> ModelArgs:
    arch = kv.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported (llama)")
    p = lambda key, default=None: kv.get(f"llama.{key}", default)  # noqa: E731
    n_head = p("attention.head_count")
    dim = p("embedding_length")
    n_vocab = p("vocab_size") or len(kv.get("tokenizer.ggml.tokens", []))
    return ModelArgs(
        arch="llama", dim=dim, n_layer=p("block_count"), n_head=n_head,
        n_kv_head=p("attention.head_count_kv", n_head), head_dim=p("attention.key_length", dim // n_head),
        intermediate_size=p("feed_forward_length"), vocab_size=n_vocab,
        rope_base=float(p("rope.freq_base", 10000.0)), rope_freq_factors=rope_freqs,
        norm_eps=float(p("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output, max_seq_len=p("context_length", 4096),
    )


def convert_gguf(path: Path, out: Path, dtype: torch.dtype = torch.float32) -> ModelArgs:
    """Dequantize a llama-architecture GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K...) into CKPT."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, ... on a bad file
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    kv = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        rope_freqs = [float(v) for v in dequantize(tensors["rope_freqs.weight"].data,
                                                    tensors["rope_freqs.weight"].tensor_type).reshape(-1)]
    args = gguf_args(kv, "output.weight" in tensors, rope_freqs)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"the GGUF file has no tensor {name!r}")
        t = tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        # llama.cpp stores q and k rows interleaved for its rope; undo it (back to the HF half-split layout)
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, args.n_head)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, args.n_kv_head)
        return w

    out = Path(out)
    save_checkpoint(out, args, convert_tensors(args, get, GGUF_NAMES), dtype, {"source": "gguf"})
    for name, content in tokenizer_files_from_gguf(kv).items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False) + "\n")
    return args


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    out_features = w.shape[0]
    return w.reshape(n_head, out_features // n_head // 2, 2, -1).transpose(1, 2).reshape(out_features, -1)
