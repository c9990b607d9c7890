"""Convert a llama-architecture GGUF file (dequantized) into a CKPT directory.

    python scripts/convert_gguf.py MODEL.gguf [--out CKPT] [--dtype float32]
"""
import argparse
from pathlib import Path

from cli import HelpFormatter, parse_dtype, run_cli
from convert import convert_gguf
from paths import REPO


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("gguf", type=Path, help="the GGUF file (llama architecture)")
    p.add_argument("--out", type=Path, default=None, help="CKPT directory to write (default: checkpoints/<file stem>)")
    p.add_argument("--dtype", default="float32", help="stored dtype of the dequantized weights")
    a = p.parse_args()
    out = a.out or REPO / "checkpoints" / a.gguf.stem
    args = convert_gguf(a.gguf, out, parse_dtype(a.dtype))
    print(f"wrote {out} ({args.n_layer} layers, dim {args.dim}, vocab {args.vocab_size})")


if __name__ == "__main__":
    run_cli(main)
