"""Quality of a sparsity setting on held-out text: sliding-window perplexity, KL divergence and top-1
agreement against the dense model, and the measured sparsity (parameter-weighted, per projection).

    python scripts/eval_ppl.py [--checkpoint CKPT] --sparsity 0.5 [--at-measured] [--sparsity-method greedy]
                               [--criterion weight-aware] [--mlp teal|cats] [--text FILE ...]
                               [--max-tokens N] [--window W] [--stride S] [--json]

--at-measured: --sparsity is the model-wide sparsity to *measure* on the text, not the target: the target that
measures it (within 0.001, on the same scored tokens) is solved for first (secant steps, a sparse pass each: about
three), so that two methods can be compared at equal measured sparsity.

Default text: the evaluation side of the Shakespeare split (texts.py), disjoint by play from calibration.
Every token of a window is sparsified (--dense-prefix N keeps the first N of each window dense); each
window scores its last --stride tokens (the first window scores all of them).
"""
import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from cli import HelpFormatter, add_model_args, add_quant_arg, add_sparsity_args, load_from_args, run_cli
from errors import UserError
from sparsity import (CALIB_FILE, TARGETS, SparsityCounter, apply_thresholds, ensure_cache, load_calibration,
                      parameter_weighted, per_projection)
from texts import default_texts, read_texts


@dataclass
class Setting:
    """One sparse configuration to score: the model that runs it and how to set its thresholds."""
    name: str
    model: object
    apply: Callable
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0
    counter: SparsityCounter = None

    def __post_init__(self):
        self.counter = SparsityCounter(self.model)

    def result(self, dense_nll: float) -> dict:
        stats = self.counter.stats()
        return {"name": self.name, "ppl": math.exp(self.nll / self.count), "dense_ppl": math.exp(dense_nll / self.count),
                "kl": self.kl / self.count, "top1": self.agree / self.count,
                "sparsity": parameter_weighted(self.model, stats) if stats else 0.0,
                "per_projection": per_projection(stats), "tokens": self.count}


def windows(n: int, window: int, stride: int, max_tokens: int) -> list:
    """(begin, end, first scored position) of sliding windows over n tokens, scoring at most max_tokens in all (the
    last window is cut short)."""
    out, scored, begin = [], 0, 0
    while scored < max_tokens:
        end = min(begin + window, n)
        first = 0 if begin == 0 else window - stride
        end = min(end, begin + max(first, 1) + max_tokens - scored)  # score max_tokens, not a window more
        if end - begin < 2 or first >= end - begin:
            break
        out.append((begin, end, first))
        scored += end - begin - max(first, 1)
        if end == n:
            break
        begin += stride
    return out


def check_windows(a):
    """One line for window flags that score nothing (eval_ppl.py and quality_report.py)."""
    if not 0 < a.stride <= a.window or a.max_tokens < 1:
        raise UserError("need 0 < --stride <= --window and --max-tokens >= 1")


@torch.no_grad()
def evaluate(dense_model, ids: list, settings: list, window: int, stride: int, max_tokens: int,
             dense_prefix: int = 0, progress: bool = True) -> list:
    dev = dense_model.tok_embeddings.weight.device
    spans = windows(len(ids), window, stride, max_tokens)
    if not spans:
        raise UserError(f"the evaluation text has {len(ids)} tokens: too few to score")
    for m in {id(s.model): s.model for s in settings}.values():
        ensure_cache(m, 1, window)
    ensure_cache(dense_model, 1, window)
    dense_nll = 0.0
    for begin, end, first in tqdm(spans, desc="evaluating", unit="window", disable=not progress):
        idx = torch.tensor([ids[begin:end]], device=dev)
        pos = torch.arange(end - begin, device=dev)
        start = max(first, 1) - 1  # logits at t predict token t+1
        target = idx[0, start + 1:]
        logp_d = torch.log_softmax(dense_model(idx, pos, sparse_from=None)[0, start:-1].float(), -1)
        dense_nll += -logp_d.gather(-1, target[:, None]).sum().item()
        for s in settings:
            s.apply(s.model)
            with s.counter.counting(max(start, dense_prefix)):
                logits = s.model(idx, pos, sparse_from=dense_prefix)[0, start:-1].float()
            logp_s = torch.log_softmax(logits, -1)
            s.nll += -logp_s.gather(-1, target[:, None]).sum().item()
            s.kl += (logp_d.exp() * (logp_d - logp_s)).sum().item()
            s.agree += (logp_s.argmax(-1) == logp_d.argmax(-1)).sum().item()
            s.count += target.numel()
    return [s.result(dense_nll) for s in settings]


@torch.no_grad()
def solve_target(model, ids: list, apply_at: Callable, s: float, window: int, stride: int, tokens: int,
                 dense_prefix: int = 0, tol: float = 0.001) -> float:
    """The target level whose thresholds (apply_at(model, level)) measure model-wide sparsity s on the `tokens`
    scored tokens of ids (windows and counted positions as in evaluate, so the evaluation then measures s): secant
    steps from the level s (the first with slope one: measured sparsity follows the level about one for one),
    kept inside the bracket found so far (bisection where a step leaves it). Each step is one sparse pass."""
    spans = windows(len(ids), window, stride, tokens)
    ensure_cache(model, 1, window)
    dev = model.tok_embeddings.weight.device

    def miss(level: float) -> float:  # measured sparsity - s
        apply_at(model, level)
        counter = SparsityCounter(model)
        for begin, end, first in spans:
            with counter.counting(max(max(first, 1) - 1, dense_prefix)):
                model(torch.tensor([ids[begin:end]], device=dev), torch.arange(end - begin, device=dev),
                      sparse_from=dense_prefix)
        return parameter_weighted(model, counter.stats()) - s

    top = float(TARGETS[-1])  # the greedy tables' last target
    lo, hi = 0.0, top  # levels measuring below / above s
    x0, f0 = s, miss(s)
    x1 = min(max(x0 - f0, 0.0), top)
    f1 = f0 if x1 == x0 else miss(x1)
    for _ in range(20):
        if abs(f1) <= tol:
            return x1
        for x, f in ((x0, f0), (x1, f1)):
            lo, hi = (max(lo, x), hi) if f < 0 else (lo, min(hi, x))
        if x1 >= top and f1 < 0:
            raise UserError(f"no level up to {top} measures sparsity {s} on this text")
        x2 = x1 - f1 * (x1 - x0) / (f1 - f0) if f1 != f0 else (lo + hi) / 2
        if not lo < x2 < hi:
            x2 = (lo + hi) / 2
        x0, f0, x1 = x1, f1, x2
        f1 = miss(x1)
    return x1


def load_eval_text(tok, files) -> list:
    return tok.encode(read_texts(files or default_texts("evaluation")), bos=None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    add_quant_arg(p)
    p.add_argument("--sparsity", type=float, required=True, help="model-wide activation sparsity in [0, 1)")
    p.add_argument("--at-measured", action="store_true",
                   help="--sparsity is the sparsity to measure on the text: find the target level that gives it")
    add_sparsity_args(p)
    p.add_argument("--text", nargs="+", type=Path, default=None,
                   help="evaluation text files (default: the evaluation side of the Shakespeare split)")
    p.add_argument("--max-tokens", type=int, default=16384, help="scored tokens")
    p.add_argument("--window", type=int, default=512, help="tokens per sliding window")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts (each window scores its "
                   "last STRIDE tokens)")
    p.add_argument("--dense-prefix", type=int, default=0, help="leading tokens of each window kept dense")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    if not 0 <= a.sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1), got {a.sparsity}")
    check_windows(a)
    if a.dense_prefix < 0:
        raise UserError(f"--dense-prefix must be >= 0, got {a.dense_prefix}")
    ckpt, model, tok, device = load_from_args(a)
    sparse_model = model
    if a.mlp == "cats":
        sparse_model = load_from_args(a, mlp="cats")[1]
    calib = load_calibration(model, ckpt / CALIB_FILE) if a.sparsity > 0 else None
    ids = load_eval_text(tok, a.text)
    level = a.sparsity
    if a.at_measured and calib:
        level = solve_target(sparse_model, ids, lambda m, t: apply_thresholds(m, calib, t, a.sparsity_method,
                                                                              a.criterion), a.sparsity, a.window, a.stride,
                             a.max_tokens, a.dense_prefix)
        print(f"target {level:.4f} measures {a.sparsity} on this text", file=sys.stderr)
    apply = (lambda m: apply_thresholds(m, calib, level, a.sparsity_method, a.criterion)) if calib else (lambda m: None)
    setting = Setting(f"{a.mlp} {a.sparsity_method} {a.criterion} {level:.4g}", sparse_model, apply)
    r = evaluate(model, ids, [setting], a.window, a.stride, a.max_tokens, a.dense_prefix)[0]
    print(f"{r['name']}: ppl {r['ppl']:.3f} (dense {r['dense_ppl']:.3f}) | KL {r['kl']:.4f} | top-1 {r['top1']:.3f} | "
          f"measured sparsity {r['sparsity']:.3f} over {r['tokens']} tokens", file=sys.stderr)
    if a.json:
        print(json.dumps({"target": level, "ppl": r["ppl"], "kl": r["kl"], "top1": r["top1"], "sparsity": r["sparsity"],
                          "dense_ppl": r["dense_ppl"], "per_projection": r["per_projection"], "tokens": r["tokens"]}))


if __name__ == "__main__":
    run_cli(main)
