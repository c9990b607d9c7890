"""Convert a Hugging Face Llama/Mistral directory into a CKPT directory.

    python scripts/convert_hf_checkpoint.py HF_DIR [--out CKPT] [--dtype bfloat16]
"""
import argparse
from pathlib import Path

from cli import HelpFormatter, parse_dtype, run_cli
from convert import convert_hf
from paths import REPO


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("hf_dir", type=Path, help="Hugging Face model directory (config.json and weights)")
    p.add_argument("--out", type=Path, default=None, help="CKPT directory to write (default: checkpoints/<name of HF_DIR>)")
    p.add_argument("--dtype", default=None, help="stored dtype (default: the source's)")
    a = p.parse_args()
    out = a.out or REPO / "checkpoints" / a.hf_dir.resolve().name
    args = convert_hf(a.hf_dir, out, parse_dtype(a.dtype) if a.dtype else None)
    print(f"wrote {out} ({args.arch}, {args.n_layer} layers, dim {args.dim})")


if __name__ == "__main__":
    run_cli(main)
