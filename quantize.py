"""Weight-only quantization of a checkpoint's sparse linears, round to nearest (RTN), no calibration data:
- int8: one symmetric scale per output channel, w ≈ q * scale with q in [-127, 127] (half the bytes of bf16);
- int4: eight weights to an int32 word, an asymmetric scale and offset per group of 128 inputs (64 or 32 where 128
  does not divide the input size) and output channel, w ≈ q * s + m with q in [0, 15] (a bit over a quarter).
The activation-sparse kernels read the quantized rows of the kept inputs and apply the scales in float32. The LM
head is quantized to int8 under both schemes (one scale per vocabulary entry) and streamed by the same kernel,
never thresholded; a head tied to the embedding gets its own int8 copy, since the embedding lookup keeps the 16-bit
table. Norms keep their dtype.

    python quantize.py --checkpoint CKPT [--mode int4]   ->  CKPT/model-int8.safetensors (model-int4...)
    python generate.py --checkpoint CKPT --quant int8 --sparsity 0.5

generate.py --quant int8 reads that file, or quantizes model.safetensors as it loads when the file is absent (the
same weights: RTN needs no calibration data). The file's metadata names the scheme and carries the source weights'
fingerprint, so calibration files made on the source checkpoint apply unchanged.
"""
import argparse
from pathlib import Path

from checkpoint import WEIGHTS, read_metadata
from cli import HelpFormatter, run_cli
from loading import load_model
from kernels.formats import QUANT_FORMATS
from quantization import quantize_model, save_quantized


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="CKPT directory with model.safetensors")
    p.add_argument("--mode", choices=sorted(QUANT_FORMATS), default="int8",
                   help="int8: one scale per output channel; int4: asymmetric, a scale and offset per group of "
                        "128 inputs (64 or 32 where 128 does not divide) and output channel")
    a = p.parse_args()
    meta = read_metadata(a.checkpoint)
    model = load_model(a.checkpoint)
    fmt = QUANT_FORMATS[a.mode]
    quantize_model(model, fmt, progress=True)
    path = save_quantized(model, a.checkpoint, meta, fmt)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {fmt.scheme}; source {WEIGHTS} is kept)")


if __name__ == "__main__":
    run_cli(main)
