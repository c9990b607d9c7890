"""Weight-only quantization of a checkpoint's sparse linears (kernels/formats.py):
- int8: round to nearest, one symmetric scale per output channel (half the bytes of bf16);
- int4: round to nearest, eight weights to an int32 word, an asymmetric scale and offset per group of 128 inputs (64
  or 32 where 128 does not divide the input size) and output channel (a bit over a quarter);
- awq: int4 after an activation-aware scale search on calibration text, rounded with GPTQ's error feedback, group
  scales refitted to the codes (awq.py); the scales fold into the norms and the v and up projections, and each
  linear keeps its input scales so the checkpoint's sparsity calibration applies. Groups of 128 inputs, or --group
  64 / 32 (`--quant awq` loads whichever the file holds). --sparse-level S also fits each linear to its inputs as
  the checkpoint's calibration thresholds them at S (default 0: dense inputs only; over three calibration draws it
  did not pay, docs/quality-notes.md).
The LM head is int8 under every scheme; norms keep their dtype.

    python quantize.py [--checkpoint CKPT] [--mode int8|int4|awq] [--group 32]   ->  CKPT/model-<mode>.safetensors
    python generate.py --checkpoint CKPT --quant int8 --sparsity 0.5

generate.py --quant int8 (or int4) reads that file, or quantizes model.safetensors as it loads when the file is
absent (the same weights: RTN needs no calibration data); awq weights come from their file only. The file's metadata
names the scheme and carries the source weights' fingerprint, so calibration files made on the source checkpoint
apply unchanged.
"""
import argparse
from pathlib import Path

from awq import awq_on_text
from checkpoint import WEIGHTS, read_metadata
from cli import HelpFormatter, add_model_args, parse_dtype, pick_device, run_cli
from default_model import default_checkpoint
from loading import load_model
from errors import UserError
from kernels.formats import QUANT_FORMATS, awq_variant
from quantization import quantize_model, save_quantized
from sparsity import CALIB_FILE, load_calibration
from texts import default_texts, read_texts
from tokenizer import load_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--mode", choices=sorted(QUANT_FORMATS), default="int8",
                   help="int8: one scale per output channel; int4: a scale and offset per group of 128 inputs and "
                        "output channel; awq: int4 after an activation-aware scale search on calibration text")
    p.add_argument("--text", nargs="+", type=Path, default=None,
                   help="awq: calibration text files (default: the Shakespeare calibration side)")
    p.add_argument("--tokens", type=int, default=4096, help="awq: calibration tokens")
    p.add_argument("--seq-len", type=int, default=256, help="awq: tokens per calibration sequence")
    p.add_argument("--group", type=int, default=128, help="awq: inputs per scale group (128, 64 or 32)")
    p.add_argument("--sparse-level", type=float, default=0.0,
                   help="awq: also fit each linear to its inputs as the checkpoint's calibration thresholds them at "
                        "this sparsity (0: dense inputs only)")
    a = p.parse_args(argv)
    if a.tokens < a.seq_len or a.seq_len < 2:
        raise UserError("need --tokens >= --seq-len >= 2")
    if not 0 <= a.sparse_level < 1:
        raise UserError(f"--sparse-level must be in [0, 1); got {a.sparse_level}")
    if a.group != 128 and a.mode != "awq":
        raise UserError(f"--group applies to --mode awq; {a.mode} weights use groups of 128 (int4) or none (int8)")
    fmt = awq_variant(a.group) if a.mode == "awq" else QUANT_FORMATS[a.mode]
    device = pick_device(a.device)
    ckpt = a.checkpoint if a.checkpoint is not None else default_checkpoint()
    model = load_model(ckpt, device, None if a.dtype == "auto" else parse_dtype(a.dtype))  # as stored by default
    meta = read_metadata(ckpt)
    if fmt.calibrated:
        tok = load_tokenizer(ckpt)
        text = read_texts(a.text if a.text else default_texts("calibration"))
        calib = None
        if a.sparse_level > 0 and (ckpt / CALIB_FILE).exists():
            calib = load_calibration(model, ckpt / CALIB_FILE)
        elif a.sparse_level > 0:
            print(f"awq: no {CALIB_FILE} in {ckpt}: fitted to dense inputs only (run calibrate.py first to fit the "
                  f"weights to sparse ones too)")
        report = awq_on_text(model, tok, text, fmt, a.tokens, a.seq_len, calib=calib, level=a.sparse_level)
        errs = [e for _, e in report.values()]
        print(f"awq: {len(report)} linear groups, output error {sum(errs) / len(errs):.2e} on average "
              f"(relative, squared)")
    else:
        quantize_model(model, fmt, progress=True)
    path = save_quantized(model.to("cpu"), ckpt, meta, fmt)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {fmt.scheme}; source {WEIGHTS} is kept)")


if __name__ == "__main__":
    run_cli(main)
