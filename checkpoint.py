"""The checkpoint directory (CKPT): config.json, model.safetensors, tokenizer files, special_tokens.json.

model.safetensors holds our parameter names in the kernel layout (sparse linears [in, out]); its
metadata records the format, the layout and a fingerprint of the weights that calibration files
are checked against. This module is the file format only: loading.py builds models from it.
"""
import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open

from errors import UserError
from model import ModelArgs, Transformer

FORMAT = "teal-ckpt-1"
WEIGHTS = "model.safetensors"

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
           torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


def save_checkpoint(out: Path, args: ModelArgs, tensors: Iterable, dtype: torch.dtype, extra: Optional[dict] = None,
                    shapes: Optional[dict] = None):
    """Write config.json and model.safetensors. tensors: (name, tensor) in the order of `shapes` (default: the
    float model's state_dict_shapes in `dtype`; a checkpoint of quantized weights passes its own, and names its
    format's scheme as `quantization` in `extra`)."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = shapes or state_dict_shapes(args, dtype)
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
    if ckpt.is_file():
        raise UserError(f"{ckpt} is a file: --checkpoint takes the directory that holds config.json")
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory {ckpt} does not exist")
    path = ckpt / "config.json"
    if not path.exists():
        raise UserError(f"{ckpt} has no config.json: convert a model into it with scripts/convert_hf_checkpoint.py")
    try:
        return ModelArgs.from_dict(json.loads(path.read_text()))
    except KeyError as e:
        raise UserError(f"{path} is not a valid config: it has no {e.args[0]!r}") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is not a valid config: {e}") from None


def read_metadata(ckpt: Path) -> dict:
    path = Path(ckpt) / WEIGHTS
    if not path.exists():
        raise UserError(f"{ckpt} has no {WEIGHTS}: convert a model into it with scripts/convert_hf_checkpoint.py")
    return read_safetensors_metadata(path)


def read_safetensors_metadata(path: Path) -> dict:
    """The __metadata__ of any safetensors file (a checkpoint's weights, a quantized copy, a calibration)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def read_tensors(path: Path, device) -> dict:
    """name -> tensor of a safetensors file, on `device` (to a GPU through read_staged). Raises SafetensorError,
    OSError or ValueError on a damaged file."""
    device = torch.device(device)
    if device.type == "cuda":
        return read_staged(path, device)
    with safe_open(str(path), "pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_staged(path: Path, device: torch.device, stage_bytes: int = 64 << 20, n_stages: int = 4) -> dict:
    """read_tensors through n_stages buffers of stage_bytes (pinned for a GPU): a few threads read the file into
    them with pread (no page faults on a mapping) while the copies out of them run asynchronously, so reading and
    copying overlap. A copy to the GPU straight from pageable memory ran at ~2.5 GB/s on the H200's host (5.5 s for
    a 7B model)."""
    cuda = device.type == "cuda"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > size - 8:
            raise ValueError("header larger than the file")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out, chunks = {}, []  # chunks: (destination bytes, file offset, length)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _TORCH_DTYPES or not 0 <= begin <= end <= size - 8 - n:
            raise ValueError(f"tensor {name}: dtype {info['dtype']} or offsets {begin}..{end} out of the file")
        t = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]], device=device)
        if t.numel() * t.element_size() != end - begin:
            raise ValueError(f"tensor {name}: shape {info['shape']} does not fill its {end - begin} bytes")
        flat = t.view(-1).view(torch.uint8)
        chunks += [(flat[o:o + stage_bytes], 8 + n + begin + o, min(stage_bytes, end - begin - o))
                   for o in range(0, end - begin, stage_bytes)]
        out[name] = t
    if not chunks:
        return out
    stages = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(min(n_stages, len(chunks)))]
    views = [s.numpy() for s in stages]
    fd = os.open(path, os.O_RDONLY)

    def fill(j: int, ready):  # chunk j into its stage, once the copy out of that stage (event `ready`) is done
        if ready is not None:
            ready.synchronize()
        _, offset, length = chunks[j]
        if os.preadv(fd, [views[j % len(stages)][:length]], offset) != length:
            raise ValueError("the file ends early")

    try:
        # the copies and their events on the target GPU's stream, whichever GPU is current
        with ThreadPoolExecutor(len(stages)) as pool, torch.cuda.device(device) if cuda else nullcontext():
            reads = {j: pool.submit(fill, j, None) for j in range(len(stages))}
            for j, (dst, _, length) in enumerate(chunks):
                reads.pop(j).result()
                dst.copy_(stages[j % len(stages)][:length], non_blocking=cuda)
                copied = None
                if cuda:
                    copied = torch.cuda.Event()
                    copied.record()
                if j + len(stages) < len(chunks):
                    reads[j + len(stages)] = pool.submit(fill, j + len(stages), copied)
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        os.close(fd)
    return out
