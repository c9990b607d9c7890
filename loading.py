"""Models from checkpoints: load_model builds the Transformer from a CKPT directory (checkpoint.py's file format),
optionally with quantized weights (quantization.py); random_model / random_tensors make random-weight models of a
config's shapes (for speed work and tests)."""
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError

from checkpoint import (FORMAT, WEIGHTS, read_config, read_metadata, read_safetensors_metadata, read_tensors,
                        state_dict_shapes)
from errors import UserError
from model import ModelArgs, Transformer
from kernels.formats import QuantFormat, format_of_scheme
from quantization import quant_file, quant_structure, quantize_model
from tp import TP, check_split, read_shard


def load_model(ckpt: Path, device: str = "cpu", dtype: Optional[torch.dtype] = None, mlp: str = "teal",
               quant: Optional[QuantFormat] = None, tp: Optional[TP] = None):
    """Build the model from CKPT with weights on `device` (in `dtype`, default: as stored). quant: the sparse linears
    in that format (kernels/formats.py), from CKPT/model-<name>.safetensors, or quantized here (quantization.py)
    when there is none. tp: this rank's slices only (tp.py), read as slices of the file."""
    args = read_config(ckpt)
    meta = read_metadata(ckpt)
    if meta.get("format") != FORMAT:
        raise UserError(f"{Path(ckpt) / WEIGHTS} was not written by our converter (format {meta.get('format')!r})")
    path = Path(ckpt) / WEIGHTS
    native = format_of_scheme(meta["quantization"]) if meta.get("quantization") else None  # e.g. converted AWQ
    if native is not None:
        if quant is not None and quant.name != native.name:
            raise UserError(f"{path} holds {native.name} weights ({native.scheme}); --quant {quant.name} does not apply")
        quant = None  # the weights are already in their format
    stored = Path(ckpt) / quant_file(quant) if quant else None
    if stored is not None and quant.calibrated and not stored.exists():
        raise UserError(f"{stored} does not exist: {quant.name} weights come from calibration data, "
                        f"run `python quantize.py --checkpoint {ckpt} --mode {quant.name}`")
    if stored is not None and stored.exists():
        qmeta = read_safetensors_metadata(stored)
        if quant.calibrated:  # awq.py's file may hold any of the format's scale groups (quantize.py --group)
            quant = file_variant(quant, qmeta.get("quantization", ""))
        if qmeta.get("quantization") != quant.scheme or qmeta.get("fingerprint") != meta.get("fingerprint"):
            raise UserError(f"{stored} does not hold {quant.name} weights of this checkpoint's {WEIGHTS} "
                            "(re-run quantize.py)")
        path = stored
    if tp is not None:
        check_split(args, tp.world, native or quant)
    with torch.device("meta"):
        model = Transformer(args, mlp, tp)
    if path == stored:
        quant_structure(model, quant)
    elif native is not None:
        quant_structure(model, native, head=False)
    tied = args.tie_embeddings and path != stored  # a quantized file holds the head's own int8 copy
    try:
        if tp is not None:  # a tied head is this rank's slice of the embedding, a tensor of its own
            sd = read_shard(path, args, tp, device, head_from="tok_embeddings.weight" if tied else None)
            tied = False
        else:
            sd = read_tensors(path, device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"could not read {path}: {e}") from None
    if dtype is not None:  # quantized weights and their scales stay as they are
        sd = {k: v if not v.is_floating_point() or k.endswith(".scale") else v.to(dtype) for k, v in sd.items()}
    if tied and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} does not match its config.json: {first}") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight
    materialize_buffers(model, device)
    if quant and path != stored:
        quantize_model(model, quant)
    elif native is not None:
        quantize_model(model, native)  # only the head is left: INT8, as under every quantized format
    model.fingerprint = meta.get("fingerprint", "")
    return model.eval().requires_grad_(False)


def file_variant(fmt: QuantFormat, scheme: str) -> QuantFormat:
    """The variant of `fmt` (same name, another scale group) that a quantized file's scheme names, else fmt."""
    try:
        found = format_of_scheme(scheme)
    except UserError:
        return fmt
    return found if found.name == fmt.name else fmt


def random_tensors(args: ModelArgs, dtype: torch.dtype, device="cpu", seed: int = 0, vocab_zeros: bool = False,
                   shapes: Optional[dict] = None):
    """(name, tensor) of a random-weight checkpoint, in file order: linears ~ N(0, 1/in_features),
    embeddings ~ N(0, 1), norm weights 1 (the benchmark protocol). Speed does not depend on the values.
    vocab_zeros: the embedding and LM head as zeros (a real vocabulary's take seconds to draw on a CPU).
    shapes: name -> (shape, dtype) to draw instead of the checkpoint's (one rank's slices)."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name, (shape, _) in (shapes or state_dict_shapes(args, dtype)).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype, device=device)
        elif vocab_zeros and name in ("tok_embeddings.weight", "output.weight"):
            t = torch.zeros(shape, dtype=dtype, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            if name.startswith("layers."):
                t /= shape[0] ** 0.5  # sparse linears are [in, out]
            elif name == "output.weight":
                t /= shape[1] ** 0.5
            t = t.to(dtype)
        yield name, t


def random_model(args: ModelArgs, device, dtype: torch.dtype, seed: int = 0, mlp: str = "teal",
                 vocab_zeros: bool = False, tp: Optional[TP] = None) -> Transformer:
    """A model with random weights built directly on `device` (what make_random_checkpoint.py saves); with tp, one
    rank's slices of such a model (other random values)."""
    if tp is not None:
        check_split(args, tp.world)
    with torch.device("meta"):
        model = Transformer(args, mlp, tp)
    tied = args.tie_embeddings and tp is None
    shapes = None if tp is None else {k: (tuple(v.shape), dtype) for k, v in model.state_dict().items()}
    sd = dict(random_tensors(args, dtype, device, seed, vocab_zeros, shapes))
    if tied:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    materialize_buffers(model, device)
    return model.eval().requires_grad_(False)


def materialize_buffers(model, device):
    """Give the buffers a model built on the meta device still lacks real zero tensors on `device`."""
    for mod in model.modules():  # buffers were created on meta: thresholds start at zero (dense)
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                mod.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False)
