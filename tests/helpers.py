"""Tiny Hugging Face models with random weights, saved and converted to CKPT for tests; a small model on the
reference path and its copy on the kernel path."""
import copy
from pathlib import Path

import torch

from convert import convert_hf
from kernels.formats import quant_format
from loading import random_model
from model import ModelArgs
from plan import decode_plan
from quantization import quantize_model
from sparsity import capture_inputs, set_uniform_thresholds
from tokenizer import byte_chars

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
VARIANTS = {
    "mha-untied": dict(tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope": dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-window": dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False),
}


def hf_model(variant: str, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    kw = {**BASE, **VARIANTS[variant], **overrides}
    if variant.startswith("mistral"):
        cfg, cls = MistralConfig(**kw), MistralForCausalLM
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():  # larger than init's 0.02 so that differences would show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)
    return model


def hf_checkpoint(variant: str, tmp: Path, **save_kw) -> tuple:
    """(hf model, HF dir, CKPT dir)."""
    model = hf_model(variant)
    hf_dir, ckpt = tmp / f"hf-{variant}", tmp / f"ckpt-{variant}"
    model.save_pretrained(hf_dir, **save_kw)
    convert_hf(hf_dir, ckpt)
    return model, hf_dir, ckpt


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]


def byte_level_vocab():
    """(tokens, token types, merges) of a small byte-level BPE vocabulary with ChatML specials."""
    tokens = SPECIALS + byte_chars() + [a + b for a, b in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


def permute_for_gguf(w, n_head: int):
    """llama.cpp's q/k row order (interleaved rope pairs)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, -1).swapaxes(1, 2).reshape(out, -1)


def write_gguf(path: Path, hf, qtype_of=lambda name: "F32", tokenizer=None, raw=None):
    """Write a llama GGUF from a HF model's weights. qtype_of(gguf tensor name) -> GGML type name.
    raw: {gguf name: (uint8 blocks, qtype name)} overrides the data of those tensors."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, types, merges = tokenizer or byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key in names:
            name = names[key]
        else:
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            name = f"blk.{i}.{per_layer[rest]}.weight"
        a = t.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            a = permute_for_gguf(a, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = permute_for_gguf(a, c.num_key_value_heads)
        qt = getattr(gguf.GGMLQuantizationType, qtype_of(name))
        if raw and name in raw:
            blocks, qname = raw[name]
            w.add_tensor(name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, qname))
        elif qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_and_kernel_models(n_layer: int = 1, max_seq_len: int = 128, window=None, quant=None,
                                **kernel_options):
    """A small fp32 GQA model with 50% thresholds (reference path) and a copy on the kernel path; quant: its sparse
    linears quantized (quantize.py, "int8" or "int4")."""
    args = ModelArgs(dim=128, n_layer=n_layer, n_head=4, n_kv_head=2, intermediate_size=192, vocab_size=101,
                     max_seq_len=max_seq_len, sliding_window=window)
    ref_model = random_model(args, "cpu", torch.float32, seed=0)
    if quant:
        quantize_model(ref_model, quant_format(quant))
    set_uniform_thresholds(ref_model, capture_inputs(ref_model, torch.randint(0, 101, (1, 48))), 0.5)
    model = copy.deepcopy(ref_model)
    model.set_plan(decode_plan(torch.device("cpu"), sparsity=0.5, kernels=True, **kernel_options))
    return ref_model, model
