"""Is the block-wise greedy allocation stable? Calibrates on each half of the calibration text (split at a line
boundary) and compares the two greedy tables, per (block, projection) level, at model targets: how far apart the
halves' levels are, and the share within one greedy step of that projection (the search raises a projection's level
by step / its parameter share at a time).

    python scripts/greedy_stability.py [--checkpoint CKPT] [--tokens 4096] [--greedy-seqs 8] [--greedy-every 1]
        [--ties Z] [--no-tie-kv] [--dtype float32] [--no-uniform-floor] [--split interleaved] [--alloc-seqs 8]

--split middle (the default) gives each half different works of the text (a shift of content as well as fewer
tokens); --split interleaved deals chunks of ~CHUNK characters to the halves in turn, so both halves sample the same
works and what differs is only which tokens each saw (the "enough tokens" question alone).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from calibration import calibrate
from cli import (HelpFormatter, add_calibration_args, add_model_args, calibration_criteria, load_from_args, run_cli,
                 sparsity_list)
from errors import UserError
from sparsity import PROJECTIONS, TARGETS, param_fractions
from texts import default_texts, read_texts


CHUNK = 16384  # characters per interleaved chunk: several calibration sequences' worth


def halves(text: str, split: str = "middle") -> tuple:
    """Two disjoint halves of the text: split at the line boundary nearest its middle, or ("interleaved") chunks of
    ~CHUNK characters cut at line boundaries, dealt to the halves in turn."""
    if split == "middle":
        cut = text.find("\n", len(text) // 2)
        if cut < 0:
            raise UserError("the calibration text has no line break past its middle to split it at")
        return text[:cut], text[cut + 1:]
    parts, start = ([], []), 0
    while start < len(text):
        cut = text.find("\n", start + CHUNK)
        end = len(text) if cut < 0 else cut
        parts[len(parts[0]) > len(parts[1])].append(text[start:end])
        start = end + 1
    if not parts[1]:
        raise UserError(f"the calibration text is too short to interleave in chunks of {CHUNK} characters")
    return "\n".join(parts[0]), "\n".join(parts[1])


def compare(a: torch.Tensor, b: torch.Tensor, one_step: torch.Tensor) -> dict:
    """Two greedy tables' levels at one target [L, 7] -> agreement figures."""
    d = (a - b).abs()
    within = d <= one_step[None, :] + 1e-6
    return {"mean_abs": d.mean().item(), "max_abs": d.max().item(), "within_one_step": within.float().mean().item(),
            "blocks_all_within": int(within.all(dim=1).sum()), "blocks": a.shape[0],
            "mean_by_projection": {p: (a[:, j].mean().item(), b[:, j].mean().item())
                                   for j, p in enumerate(PROJECTIONS)}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, fast_cpu=True)
    add_calibration_args(p, tokens=4096, per=", per half")
    p.add_argument("--uniform-floor", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the uniform allocation at a target where it has less error (calibrate.py does)")
    p.add_argument("--split", choices=("middle", "interleaved"), default="middle",
                   help="the halves: the text's two halves, or its chunks dealt in turn (see above)")
    p.add_argument("--targets", default="0.4,0.5", help="comma-separated model targets compared")
    p.add_argument("--out", type=Path, default=None, help="JSON file of the comparison (default: none)")
    a = p.parse_args()
    criteria = calibration_criteria(a)
    targets = sparsity_list(a.targets, "--targets")
    idx = [int(torch.argmin((TARGETS - t).abs())) for t in targets]
    _, model, tok, _ = load_from_args(a)
    text = read_texts(a.text or default_texts("calibration"))
    tables, traces = [], []
    for i, half in enumerate(halves(text, a.split)):
        traces.append({})
        t0 = time.time()
        calib = calibrate(model, tok, half, a.tokens, a.seq_len, a.skip, a.batch, a.greedy_seqs, a.step,
                          f"half {i}", aim_seqs=0, uniform_floor=a.uniform_floor, max_move=a.max_move,
                          criteria=criteria, spread=a.blocks == "spread", alloc_seqs=a.alloc_seqs,
                          greedy_every=a.greedy_every, ties=a.ties,
                          tie_kv=a.tie_kv, trace=traces[-1])
        tables.append(calib.greedy)
        print(f"half {i}: calibrated in {time.time() - t0:.0f} s", file=sys.stderr)
    share = param_fractions(model.args)
    if a.tie_kv:  # k and v move together: by step / their joint share
        kv = [PROJECTIONS.index("k"), PROJECTIONS.index("v")]
        share[kv] = share[kv].sum()
    one_step = (a.step / share).clamp(max=min(a.max_move, 1.0)).float()
    report = {"greedy_seqs": a.greedy_seqs, "greedy_every": a.greedy_every, "ties": a.ties, "tie_kv": a.tie_kv,
              "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "tokens": a.tokens,
              "step": a.step, "max_move": a.max_move, "uniform_floor": a.uniform_floor, "blocks": a.blocks,
              "split": a.split, "alloc_seqs": a.alloc_seqs,
              "results": {}}
    print(f"greedy on {a.greedy_seqs} sequences of {a.seq_len} per half (every {a.greedy_every}th position scored, "
          f"ties {a.ties}), uniform floor {a.uniform_floor}; one step "
          f"per projection: " + ", ".join(f"{p} {s:.3f}" for p, s in zip(PROJECTIONS, one_step.tolist())))
    print("| criterion, target | mean abs difference | largest | pairs within one step | blocks all within |")
    print("|---|---|---|---|---|")
    for c in criteria:
        for t, ti in zip(targets, idx):
            r = compare(tables[0][c][:, ti].float(), tables[1][c][:, ti].float(), one_step)
            report["results"][f"{c}@{t}"] = r
            print(f"| {c}, {t} | {r['mean_abs']:.3f} | {r['max_abs']:.2f} | {100 * r['within_one_step']:.1f}% | "
                  f"{r['blocks_all_within']}/{r['blocks']} |")
        # every target but 0 at once: a (block, target) pair counts as a "block" (less noisy than two targets)
        r = compare(*(t[c][:, 1:].float().reshape(-1, len(PROJECTIONS)) for t in tables), one_step)
        r.pop("mean_by_projection")
        report["results"][f"{c}@all"] = r
        print(f"| {c}, every target | {r['mean_abs']:.3f} | {r['max_abs']:.2f} | {100 * r['within_one_step']:.1f}% | "
              f"{r['blocks_all_within']}/{r['blocks']} (block, target) pairs |")
        if a.blocks == "spread":  # the two searches apart: the greedy paths at equal block sparsity, the spread
            r = compare(*(t[c]["unspread"][:, 1:].float().reshape(-1, len(PROJECTIONS)) for t in traces), one_step)
            r.pop("mean_by_projection")
            grid = float(TARGETS[1] - TARGETS[0])
            gap = (traces[0][c]["blocks"] - traces[1][c]["blocks"])[:, 1:].abs()
            r["blocks_within_one_grid_step"] = int((gap <= grid + 1e-6).sum())
            report["results"][f"{c}@all-before-spread"] = r
            print(f"| {c}, every target, before the spread | {r['mean_abs']:.3f} | {r['max_abs']:.2f} | "
                  f"{100 * r['within_one_step']:.1f}% | {r['blocks_all_within']}/{r['blocks']} (block, target) "
                  f"pairs; block sparsities within one grid step ({grid:.2f}): "
                  f"{r['blocks_within_one_grid_step']}/{gap.numel()} |")
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
