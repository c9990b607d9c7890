"""Weight-only quantization of a checkpoint's sparse linears, round to nearest (RTN), no calibration data:
- int8: one symmetric scale per output channel, w ≈ q * scale with q in [-127, 127] (half the bytes of bf16);
- int4: eight weights to an int32 word, an asymmetric scale and offset per group of 128 inputs (64 or 32 where 128
  does not divide the input size) and output channel, w ≈ q * s + m with q in [0, 15] (a bit over a quarter).
The activation-sparse kernels read the quantized rows of the kept inputs and apply the scales in float32. The LM
head is quantized to int8 under both schemes (one scale per vocabulary entry) and streamed by the same kernel,
never thresholded; a head tied to the embedding gets its own int8 copy, since the embedding lookup keeps the 16-bit
table. Norms keep their dtype.

    python quantize.py --checkpoint CKPT [--mode int4]   ->  CKPT/model-int8.safetensors (model-int4...)
    python generate.py --checkpoint CKPT --quant int8 --sparsity 0.5

generate.py --quant int8 reads that file, or quantizes model.safetensors as it loads when the file is absent (the
same weights: RTN needs no calibration data). The file's metadata names the scheme and carries the source weights'
fingerprint, so calibration files made on the source checkpoint apply unchanged.
"""
import argparse
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from checkpoint import FORMAT, WEIGHTS, load_model, read_metadata, write_safetensors
from errors import UserError, run_cli
from model import SparseLinear, Transformer

# --quant name -> the scheme recorded in the file's metadata (files of an earlier scheme are refused: re-quantize)
SCHEMES = {"int8": "int8-rtn-channel-head", "int4": "int4-rtn-group-int8-head"}


def quant_file(scheme: str) -> str:
    return f"model-{scheme}.safetensors"


def rtn_int8(w: Tensor) -> tuple:
    """w [in, out] -> (q int8 [in, out], scale float32 [out]): per output channel, absmax / 127, rounded to nearest."""
    wf = w.float()
    scale = wf.abs().amax(0).clamp_min(1e-30) / 127
    return (wf / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def int4_group(K: int) -> int:
    """The scale group for int4 weights with K inputs: 128 inputs, or the largest of 64 and 32 that divides K."""
    group = next((g for g in (128, 64, 32) if K % g == 0), None)
    if group is None:
        raise UserError(f"int4 weights need an input size divisible by 32; got {K}")
    return group


def pack_int4(q: Tensor) -> Tensor:
    """q [K, N] in 0..15 -> int32 [K, N/8]: column 8c + i in bits 4i..4i+3 of word c."""
    K, N = q.shape
    words = (q.to(torch.int64).view(K, N // 8, 8) << torch.arange(0, 32, 4, device=q.device)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def rtn_int4(w: Tensor, group: int) -> tuple:
    """w [in, out] -> (q int32 [in, out/8] (pack_int4), scale float16 [2, in/group, out]): per group of `group`
    inputs and output channel, asymmetric round to nearest over [min(w, 0), max(w, 0)]: w ≈ q * scale[0] +
    scale[1] with q in 0..15 and scale[1] = -zero * scale[0] (the zero point an integer)."""
    K, N = w.shape
    if N % 8 or K % group:
        raise UserError(f"int4 weights need outputs divisible by 8 and inputs by the group {group}; got {K}x{N}")
    wg = w.float().reshape(K // group, group, N)
    lo, hi = wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0)  # [G, N]
    s = ((hi - lo) / 15).clamp_min(2 ** -14).half()
    if not s.isfinite().all():
        raise UserError("int4: a weight group's range does not fit a float16 scale")
    s = s.float()
    m = (-(-lo / s).round().clamp(0, 15) * s).half().float()
    q = ((wg - m[:, None]) / s[:, None]).round_().clamp_(0, 15).reshape(K, N)
    return pack_int4(q), torch.stack([s, m]).half()


def quantize_model(model: Transformer, scheme: str = "int8", progress: bool = False) -> Transformer:
    """Every sparse linear to `scheme` ("int8", or "int4" with scale groups of int4_group inputs) and the LM head to
    int8 (in place). CATS's row-major up projection has no quantized kernel."""
    if model.mlp != "teal":
        raise UserError(f"{scheme} weights serve the TEAL MLP; --mlp cats needs 16-bit weights")
    todo = [m for m in model.modules() if isinstance(m, SparseLinear) and m.scale is None]
    if not isinstance(model.output, SparseLinear):  # the 16-bit head, an nn.Linear [vocab, dim]
        todo.append(model.output)
    for m in tqdm(todo, desc=scheme, unit="linear", disable=not progress):
        if not isinstance(m, SparseLinear):  # in slices of the vocabulary (one scale per entry): no float32 copy
            q, scale = zip(*(rtn_int8(rows.t()) for rows in m.weight.split(8192)))  # of the whole table
            model.output = int8_head(model, torch.cat(q, dim=1), torch.cat(scale))
        elif scheme == "int4":
            m.set_int4(*rtn_int4(m.weight, int4_group(m.weight.shape[0])))
        else:
            m.set_int8(*rtn_int8(m.weight))
    return model


def int8_head(model: Transformer, q: Tensor, scale: Tensor) -> SparseLinear:
    """The LM head as an int8 SparseLinear: q [dim, vocab] input-major, its thresholds zero."""
    with torch.device("meta"):
        head = SparseLinear(model.args.dim, (model.args.vocab_size,), head=True)
    head.set_int8(q, scale)
    head.register_buffer("threshold", torch.zeros(head.threshold.shape, device=q.device), persistent=False)
    return head


def quant_structure(model: Transformer, scheme: str):
    """Make every sparse linear `scheme`-shaped (its integer weights and scale buffer) and the head int8-shaped, so
    that a quantized state dict loads."""
    for m in model.modules():
        if isinstance(m, SparseLinear):
            (K, N), device = m.weight.shape, m.weight.device
            if scheme == "int4":
                G = K // int4_group(K)
                m.set_int4(torch.empty(K, N // 8, dtype=torch.int32, device=device),
                           torch.empty(2, G, N, dtype=torch.float16, device=device))
            else:
                m.set_int8(torch.empty(K, N, dtype=torch.int8, device=device), torch.empty(N, device=device))
    a, device = model.args, model.tok_embeddings.weight.device
    model.output = int8_head(model, torch.empty(a.dim, a.vocab_size, dtype=torch.int8, device=device),
                             torch.empty(a.vocab_size, device=device))


def save_quantized(model: Transformer, ckpt: Path, source_meta: dict, scheme: str) -> Path:
    """CKPT/model-<scheme>.safetensors from a model quantized with `scheme` (the int8 head is stored even when the
    source ties it to the embedding)."""
    sd = model.state_dict()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    meta = {"format": FORMAT, "layout": "input-major", "dtype": source_meta.get("dtype", ""),
            "quantization": SCHEMES[scheme], "fingerprint": source_meta.get("fingerprint", "")}
    path = Path(ckpt) / quant_file(scheme)
    write_safetensors(path, shapes, sd.items(), meta)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="CKPT directory with model.safetensors")
    p.add_argument("--mode", choices=sorted(SCHEMES), default="int8",
                   help="int8: one scale per output channel; int4: asymmetric, a scale and offset per group of "
                        "128 inputs (64 or 32 where 128 does not divide) and output channel")
    a = p.parse_args()
    meta = read_metadata(a.checkpoint)
    model = load_model(a.checkpoint)
    quantize_model(model, a.mode, progress=True)
    path = save_quantized(model, a.checkpoint, meta, a.mode)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {SCHEMES[a.mode]}; source {WEIGHTS} is kept)")


if __name__ == "__main__":
    run_cli(main)
