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

from calibration import ALLOC_SEQS, GREEDY_SEQS, TIE_KV, TIES, calibrate, save_calibration
from cli import HelpFormatter, add_model_args, add_quant_arg, load_from_args, run_cli
from errors import UserError
from sparsity import CALIB_FILE, CRITERIA, DEFAULT_CRITERION
from texts import default_texts, read_texts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, fast_cpu=True)
    add_quant_arg(p)
    p.add_argument("--text", nargs="+", type=Path, default=None, help="calibration text files (default: Shakespeare)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens for the activation statistics")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--skip", type=int, default=32, help="leading positions of each sequence left out (dense in decode)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--greedy-seqs", type=int, default=GREEDY_SEQS,
                   help="sequences the block-wise greedy search scores on")
    p.add_argument("--tie-kv", action=argparse.BooleanOptionalAction, default=TIE_KV,
                   help="k and v raised together by the greedy search (--no-tie-kv: each projection alone, TEAL's)")
    p.add_argument("--greedy-every", type=int, default=1,
                   help="the greedy search scores every N-th position of its sequences (keys and values at all)")
    p.add_argument("--ties", type=float, default=TIES,
                   help="greedy candidates within this many standard errors of the best are tied; of those, the one "
                   "whose level lags its block's most is raised (0: always the best)")
    p.add_argument("--step", type=float, default=0.05, help="effective-sparsity step of the greedy search")
    p.add_argument("--max-move", type=float, default=0.1,
                   help="largest level change of one projection in one greedy step (1: step / its parameter share)")
    p.add_argument("--aim-seqs", type=int, default=8,
                   help="sequences the greedy levels are re-aimed on, in decode-like passes (0: not re-aimed)")
    p.add_argument("--blocks", choices=("spread", "equal"), default="spread",
                   help="spread: each block's effective sparsity chosen for the least relative output error, their "
                   "mean the model's target; equal: every block at the target (TEAL's)")
    p.add_argument("--alloc-seqs", type=int, default=ALLOC_SEQS,
                   help="sequences the blocks' output errors are measured on for --blocks spread")
    p.add_argument("--criteria", default=DEFAULT_CRITERION,
                   help=f"comma-separated criteria to make greedy tables for, of {', '.join(CRITERIA)} (each takes "
                   "about half the time; uniform thresholds work for both either way)")
    p.add_argument("--out", type=Path, default=None, help=f"calibration file to write (default: CKPT/{CALIB_FILE})")
    a = p.parse_args(argv)
    criteria = tuple(c for c in CRITERIA if c in a.criteria.split(","))
    if not criteria or len(criteria) != len(a.criteria.split(",")):
        raise UserError(f"--criteria takes a comma-separated list of {', '.join(CRITERIA)}; got {a.criteria!r}")
    if a.seq_len <= a.skip or a.tokens < a.seq_len or not 0 < a.step <= 0.1 or a.aim_seqs < 0 or \
            not 0 < a.max_move <= 1 or a.alloc_seqs < 1 or a.greedy_seqs < 1 or a.greedy_every < 1 or a.ties < 0:
        raise UserError("need --seq-len > --skip, --tokens >= --seq-len, 0 < --step <= 0.1, --aim-seqs >= 0, "
                        "0 < --max-move <= 1, --alloc-seqs >= 1, --greedy-seqs >= 1, --greedy-every >= 1 and "
                        "--ties >= 0")
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
