"""Convert a llama-architecture GGUF file (dequantized) into a CKPT directory.

    python scripts/convert_gguf.py MODEL.gguf [--out CKPT] [--dtype float32]
"""
import argparse
from pathlib import Path

import _path  # noqa: F401

from checkpoint import parse_dtype
from convert import convert_gguf
from errors import run_cli


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: checkpoints/<file stem>")
    p.add_argument("--dtype", default="float32", help="stored dtype of the dequantized weights")
    a = p.parse_args()
    out = a.out or Path(_path.ROOT) / "checkpoints" / a.gguf.stem
    args = convert_gguf(a.gguf, out, parse_dtype(a.dtype))
    print(f"wrote {out} ({args.n_layer} layers, dim {args.dim}, vocab {args.vocab_size})")


if __name__ == "__main__":
    run_cli(main)
