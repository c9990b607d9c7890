"""Weight-only quantization of a model's sparse linears into a QuantFormat (kernels/formats.py: INT8, INT4, round
to nearest, no calibration data). The LM head is INT8 under every format (one scale per vocabulary entry); a head
tied to the embedding gets its own int8 copy. Norms keep their dtype. save_quantized writes
CKPT/model-<name>.safetensors, whose metadata names the format's scheme and carries the source weights'
fingerprint; loading.load_model reads it. The CLI is quantize.py.
"""
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import FORMAT, write_safetensors
from errors import UserError
from kernels.formats import INT8, QUANT_FORMATS, QuantFormat
from model import SparseLinear, Transformer

SCHEMES = {name: f.scheme for name, f in QUANT_FORMATS.items()}  # --quant name -> the metadata's scheme


def quant_file(fmt: QuantFormat) -> str:
    return f"model-{fmt.name}.safetensors"


def quantize_model(model: Transformer, fmt: QuantFormat, progress: bool = False) -> Transformer:
    """Every sparse linear to `fmt` and the LM head to INT8 (in place). CATS's row-major up projection has no
    quantized kernel."""
    if model.mlp != "teal":
        raise UserError(f"{fmt.name} weights serve the TEAL MLP; --mlp cats needs 16-bit weights")
    todo = [m for m in model.modules() if isinstance(m, SparseLinear) and not m.fmt.quantized]
    if not isinstance(model.output, SparseLinear):  # the 16-bit head, an nn.Linear [vocab, dim]
        todo.append(model.output)
    for m in tqdm(todo, desc=fmt.name, unit="linear", disable=not progress):
        if not isinstance(m, SparseLinear):  # in slices of the vocabulary (one scale per entry): no float32 copy
            q, scale = zip(*(INT8.quantize_weight(rows.t()) for rows in m.weight.split(8192)))  # of the whole table
            model.output = int8_head(model, torch.cat(q, dim=1), torch.cat(scale))
        else:
            m.set_quantized(fmt, *fmt.quantize_weight(m.weight))
    return model


def int8_head(model: Transformer, q: torch.Tensor, scale: torch.Tensor) -> SparseLinear:
    """The LM head as an INT8 SparseLinear: q [dim, vocab] input-major, its thresholds zero."""
    with torch.device("meta"):
        head = SparseLinear(model.args.dim, (model.head_rows,), head=True)
    head.set_quantized(INT8, q, scale)
    head.register_buffer("threshold", torch.zeros(head.threshold.shape, device=q.device), persistent=False)
    return head


def quant_structure(model: Transformer, fmt: QuantFormat, head: bool = True):
    """Make every sparse linear `fmt`-shaped (its stored weights and scale buffer) and, with `head`, the head
    INT8-shaped, so that a quantized state dict loads (a converted AWQ checkpoint keeps its source's float head)."""
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.set_quantized(fmt, *fmt.empty(m.in_features, m.out_features, m.weight.device))
            if fmt.calibrated:
                m.register_buffer("input_scale", torch.empty(m.in_features, device=m.weight.device))
    if head:
        a, device = model.args, model.tok_embeddings.weight.device
        model.output = int8_head(model, *INT8.empty(a.dim, model.head_rows, device))


def quantized_shapes(args, fmt: QuantFormat, dtype: torch.dtype) -> dict:
    """name -> (shape, dtype) of a checkpoint whose sparse linears hold `fmt` weights and the rest `dtype` floats
    (the head too), in file order."""
    with torch.device("meta"):
        model = Transformer(args)
    quant_structure(model, fmt, head=False)
    sd = model.state_dict()
    if args.tie_embeddings:
        sd.pop("output.weight")
    return {k: (tuple(v.shape), v.dtype if not v.is_floating_point() or k.endswith(".scale") else dtype)
            for k, v in sd.items()}


def save_quantized(model: Transformer, ckpt: Path, source_meta: dict, fmt: QuantFormat) -> Path:
    """CKPT/model-<name>.safetensors from a model quantized to `fmt` (the int8 head is stored even when the source
    ties it to the embedding)."""
    sd = model.state_dict()
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    meta = {"format": FORMAT, "layout": "input-major", "dtype": source_meta.get("dtype", ""),
            "quantization": fmt.scheme, "fingerprint": source_meta.get("fingerprint", "")}
    path = Path(ckpt) / quant_file(fmt)
    write_safetensors(path, shapes, sd.items(), meta)
    return path
