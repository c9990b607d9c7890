"""Convert a Hugging Face Llama/Mistral directory into a CKPT directory.

    python scripts/convert_hf_checkpoint.py HF_DIR [--out CKPT] [--dtype bfloat16]
"""
import argparse
from pathlib import Path

import _path  # noqa: F401

from checkpoint import parse_dtype
from convert import convert_hf
from errors import run_cli


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: checkpoints/<name of HF_DIR>")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the source's)")
    a = p.parse_args()
    out = a.out or Path(_path.ROOT) / "checkpoints" / a.hf_dir.resolve().name
    args = convert_hf(a.hf_dir, out, parse_dtype(a.dtype) if a.dtype else None)
    print(f"wrote {out} ({args.arch}, {args.n_layer} layers, dim {args.dim})")


if __name__ == "__main__":
    run_cli(main)
