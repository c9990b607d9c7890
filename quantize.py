"""Weight-only int8 quantization of a checkpoint's sparse linears: round to nearest (RTN), one symmetric scale per
output channel, w ≈ q * scale with q in [-127, 127]. The activation-sparse kernels read the int8 rows (half the bytes
of bf16) and apply the scales to their sums. The LM head is quantized the same way (one scale per vocabulary entry)
and streamed by the same kernel, never thresholded; a head tied to the embedding gets its own int8 copy, since the
embedding lookup keeps the 16-bit table. Norms keep their dtype.

    python quantize.py --checkpoint CKPT        ->  CKPT/model-int8.safetensors
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
SCHEMES = {"int8": "int8-rtn-channel-head"}


def quant_file(scheme: str) -> str:
    return f"model-{scheme}.safetensors"


def rtn_int8(w: Tensor) -> tuple:
    """w [in, out] -> (q int8 [in, out], scale float32 [out]): per output channel, absmax / 127, rounded to nearest."""
    wf = w.float()
    scale = wf.abs().amax(0).clamp_min(1e-30) / 127
    return (wf / scale).round_().clamp_(-127, 127).to(torch.int8), scale


def quantize_model(model: Transformer, progress: bool = False) -> Transformer:
    """Every sparse linear and the LM head to int8 (in place). CATS's row-major up projection has no int8 kernel."""
    if model.mlp != "teal":
        raise UserError("int8 weights serve the TEAL MLP; --mlp cats needs 16-bit weights")
    todo = [m for m in model.modules() if isinstance(m, SparseLinear) and m.scale is None]
    if not isinstance(model.output, SparseLinear):  # the 16-bit head, an nn.Linear [vocab, dim]
        todo.append(model.output)
    for m in tqdm(todo, desc="int8", unit="linear", disable=not progress):
        if isinstance(m, SparseLinear):
            m.set_int8(*rtn_int8(m.weight))
        else:  # in slices of the vocabulary (one scale per entry): no float32 copy of the whole table
            q, scale = zip(*(rtn_int8(rows.t()) for rows in m.weight.split(8192)))
            model.output = int8_head(model, torch.cat(q, dim=1), torch.cat(scale))
    return model


def int8_head(model: Transformer, q: Tensor, scale: Tensor) -> SparseLinear:
    """The LM head as an int8 SparseLinear: q [dim, vocab] input-major, its thresholds zero."""
    with torch.device("meta"):
        head = SparseLinear(model.args.dim, (model.args.vocab_size,), head=True)
    head.set_int8(q, scale)
    head.register_buffer("threshold", torch.zeros(head.threshold.shape, device=q.device), persistent=False)
    return head


def int8_structure(model: Transformer):
    """Make every sparse linear and the head int8-shaped (int8 weights, a scale buffer) so that a quantized state
    dict loads."""
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.set_int8(torch.empty(m.weight.shape, dtype=torch.int8, device=m.weight.device),
                       torch.empty(m.weight.shape[1], device=m.weight.device))
    a, device = model.args, model.tok_embeddings.weight.device
    model.output = int8_head(model, torch.empty(a.dim, a.vocab_size, dtype=torch.int8, device=device),
                             torch.empty(a.vocab_size, device=device))


def save_int8(model: Transformer, ckpt: Path, source_meta: dict) -> Path:
    """CKPT/model-int8.safetensors from a quantized model (the int8 head is stored even when the source ties it to
    the embedding)."""
    sd = model.state_dict()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    meta = {"format": FORMAT, "layout": "input-major", "dtype": source_meta.get("dtype", ""),
            "quantization": SCHEMES["int8"], "fingerprint": source_meta.get("fingerprint", "")}
    path = Path(ckpt) / quant_file("int8")
    write_safetensors(path, shapes, sd.items(), meta)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="CKPT directory with model.safetensors")
    p.add_argument("--mode", choices=sorted(SCHEMES), default="int8")
    a = p.parse_args()
    meta = read_metadata(a.checkpoint)
    model = load_model(a.checkpoint)
    quantize_model(model, progress=True)
    path = save_int8(model, a.checkpoint, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {SCHEMES[a.mode]}; source {WEIGHTS} is kept)")


if __name__ == "__main__":
    run_cli(main)
