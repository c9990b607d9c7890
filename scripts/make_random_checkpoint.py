"""Write a CKPT with random weights of a real model's shapes (for speed work: speed does not depend on the
weight values) and a byte-level tokenizer.

    python scripts/make_random_checkpoint.py --config llama-2-7b [--out DIR] [--dtype bfloat16] [--device cuda]
"""
import argparse
import json
from pathlib import Path

import torch

from checkpoint import save_checkpoint
from cli import HelpFormatter, parse_dtype, run_cli
from errors import UserError
from loading import random_tensors
from model import CONFIGS, ModelArgs
from paths import REPO
from tokenizer import byte_tokenizer_files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help=f"one of: {', '.join(CONFIGS)}")
    p.add_argument("--out", type=Path, default=None, help="CKPT directory to write (default: checkpoints/random-<config>)")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype of the weights")
    p.add_argument("--device", default="cpu", help="where to draw the numbers (cuda is much faster)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    a = p.parse_args()
    args = ModelArgs.from_name(a.config)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    out = a.out or REPO / "checkpoints" / f"random-{a.config}"
    dtype = parse_dtype(a.dtype)
    save_checkpoint(out, args, random_tensors(args, dtype, a.device, a.seed), dtype, {"source": f"random:{a.config}"})
    for name, content in byte_tokenizer_files(args.vocab_size).items():
        (out / name).write_text(json.dumps(content) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
