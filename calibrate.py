"""Calibrate TEAL activation-sparsity thresholds for a checkpoint -> CKPT/sparsity.safetensors.

    python calibrate.py [--checkpoint CKPT] [--text FILE ...] [--tokens N] [--seq-len L]

1. A dense pass over calibration text histograms, per layer and projection, |x| of the projection's input
   (q, k, v share the attention input; gate, up the MLP input) and the weight-aware score |x_i|·‖W[i,:]‖,
   plus |silu(gate)| for the CATS-style MLP, on bins of 1/256 of an octave, fine enough to set any sparsity level to
   well within ±0.5%. The quantile tables and the weights' column norms are stored.
2. Block-wise greedy allocation (TEAL), for --criteria (default: the default criterion): per block, starting from
   0, each step raises the block's effective sparsity (the parameter-weighted mean of its projections' levels) by
   --step through one projection, or k and v together (--tie-kv; their level up by --step / their parameter share,
   at most --max-move), the one whose
   increase adds the least L2 error per unit of sparsity to the block output on every --greedy-every-th of the
   later tokens of --greedy-seqs sequences (the block is fed its dense input); candidates within --ties standard
   errors of the best are tied, and the tied one whose level lags the block's most is raised (where the text
   cannot tell them apart, the levels stay near uniform instead of following noise). The table at model-level
   targets 0 ... 0.9 keeps, per block, whichever of the greedy and the uniform allocation has less error there.
   Then (--blocks spread) the blocks' own sparsities at each model target are chosen together, their mean the
   target: each grid step goes to the block whose output error (on --alloc-seqs sequences), relative to its
   output's energy, grows least (TEAL's --blocks equal puts every block at the target).
3. The greedy levels re-aimed: on --aim-seqs sequences run as decoding runs them (every layer sparsified after the
   first --skip positions), each projection's level moves by the share of inputs it missed, so that `--sparsity S`
   measures S when it decodes (the levels were quantiles of dense activations; sparsified layers upstream shrink
   the inputs of later ones, o's and down's above all).
Default text: the calibration side of the Shakespeare split (texts.py), disjoint by play from evaluation.
The model runs in --dtype (auto: bfloat16 on a GPU and on a CPU with bf16 matrix units (AMX), where it multiplies
about 5x faster than float32; float32 on other CPUs); histograms and errors accumulate in float32 or wider.
"""
import argparse
import sys
import time
from pathlib import Path

from calibration import AIM_SEQS, calibrate, save_calibration
from cli import (HelpFormatter, add_calibration_args, add_model_args, add_quant_arg, calibration_criteria,
                 load_from_args, run_cli)
from errors import UserError
from sparsity import CALIB_FILE
from texts import default_texts, read_texts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, fast_cpu=True)
    add_quant_arg(p)
    add_calibration_args(p, tokens=16384)
    p.add_argument("--aim-seqs", type=int, default=AIM_SEQS,
                   help="sequences the greedy levels are re-aimed on, in decode-like passes (0: not re-aimed)")
    p.add_argument("--out", type=Path, default=None, help=f"calibration file to write (default: CKPT/{CALIB_FILE})")
    a = p.parse_args(argv)
    criteria = calibration_criteria(a)
    if a.aim_seqs < 0:
        raise UserError("--aim-seqs takes 0 or more")
    ckpt, model, tok, device = load_from_args(a)
    text = read_texts(a.text or default_texts("calibration"))
    source = ",".join(f.name for f in a.text) if a.text else "shakespeare:calibration-split"
    t0 = time.time()
    calib = calibrate(model, tok, text, a.tokens, a.seq_len, a.skip, a.batch, a.greedy_seqs, a.step, source,
                      a.aim_seqs, max_move=a.max_move, criteria=criteria, spread=a.blocks == "spread",
                      alloc_seqs=a.alloc_seqs, greedy_every=a.greedy_every, ties=a.ties, tie_kv=a.tie_kv)
    out = a.out or ckpt / CALIB_FILE
    save_calibration(calib, out)
    print(f"wrote {out} ({calib.meta['tokens']} tokens, {time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
