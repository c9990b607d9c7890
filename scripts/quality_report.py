"""docs/quality.md: perplexity, KL and top-1 agreement against dense, and measured sparsity per projection
for every threshold setting on held-out text (one pass: the dense logits of each window are computed once).

    python scripts/quality_report.py [--checkpoint CKPT] [--text FILE ...] [--max-tokens 8192] [--out docs/quality.md]

Default: the embedded SmolLM2-135M-Instruct, its shipped calibration, the evaluation side of the
Shakespeare split. Rows: target sparsity 25/35/40/45/50/55/65% x {uniform, greedy} x {magnitude, weight-aware},
and the CATS-style MLP (|silu(gate)| threshold, attention uniform-magnitude) at 25/40/50%. Methods are then
compared at equal *measured* model-wide sparsity (40% and 50%): each method's perplexity is interpolated along its
own (measured sparsity, PPL) points, since a method that measures sparser than its target would otherwise look
worse for sparsifying more, not for choosing worse. Last, the quantized weights (--weights: int8 and RTN int4 as
`--quant` makes them, AWQ int4 with groups of 128 and 32 made here as `quantize.py --mode awq` makes them), each
dense and at 50% with the default method, against the float model at the same setting.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from awq import awq_on_text
from cli import HelpFormatter, add_model_args, load_from_args, run_cli
from errors import UserError
from kernels.formats import QUANT_FORMATS, awq_variant
from loading import load_model
from paths import REPO
from scripts.eval_ppl import Setting, check_windows, evaluate, load_eval_text
from sparsity import CALIB_FILE, CRITERIA, DEFAULT_CRITERION, METHODS, PROJECTIONS, apply_thresholds, load_calibration
from texts import default_texts, read_texts

LEVELS = (0.25, 0.35, 0.4, 0.45, 0.5, 0.55, 0.65)
CATS_LEVELS = (0.25, 0.4, 0.5)
COMPARE_AT = {0.4: 0.7, 0.5: 0.6}  # measured sparsity -> the largest loss ratio to uniform-magnitude aimed for
BASELINE, DEFAULT = "uniform magnitude", f"greedy {DEFAULT_CRITERION}"  # TEAL's released setting; ours
WEIGHTS = ("int8", "int4", "awq-g128", "awq-g32")  # --weights: the quantized rows
WEIGHTS_AT = 0.5  # the sparse level of the quantized rows
AWQ_SEQ = 256  # tokens per AWQ calibration sequence (quantize.py's --seq-len default)


def at_measured(points: list, s: float) -> Optional[float]:
    """PPL at measured sparsity s from one method's (measured sparsity, PPL) points: log PPL through the three points
    nearest s (a parabola: log PPL bends upwards with sparsity, so a chord between two points 0.05 apart overstates
    it between them, more for the flatter-then-steeper uniform curves); through two when there are only two; None
    outside the points' range."""
    pts = sorted(set(points))
    if len(pts) < 2 or not pts[0][0] <= s <= pts[-1][0]:
        return None
    near = sorted(pts, key=lambda p: abs(p[0] - s))[:3]
    out = 0.0
    for i, (si, pi) in enumerate(near):  # Lagrange's form
        w = 1.0
        for j, (sj, _) in enumerate(near):
            if j != i:
                w *= (s - sj) / (si - sj)
        out += w * math.log(pi)
    return math.exp(out)


def equal_sparsity_table(results: list, dense: float) -> list:
    """Markdown lines: each method's PPL, its increase over dense and that increase's ratio to uniform-magnitude's,
    at each measured sparsity of COMPARE_AT."""
    curves = {}
    for r in results:
        method = r["name"].rsplit(" ", 1)[0]
        curves.setdefault(method, []).append((r["sparsity"], r["ppl"]))
    at = {m: {s: at_measured(pts, s) for s in COMPARE_AT} for m, pts in curves.items()}
    head = "| method | " + " | ".join(f"PPL at {s:.2f} | ΔPPL | ratio" for s in COMPARE_AT) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(COMPARE_AT)]
    for m in curves:
        cells = []
        for s in COMPARE_AT:
            p, base = at[m][s], at.get(BASELINE, {}).get(s)
            if p is None:
                cells.append("– | – | –")
                continue
            ratio = f"{(p - dense) / (base - dense):.2f}" if base is not None and base > dense else "–"
            cells.append(f"{p:.3f} | {p - dense:+.3f} | {ratio}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for s, aim in COMPARE_AT.items():
        p, base = at.get(DEFAULT, {}).get(s), at.get(BASELINE, {}).get(s)
        if p is not None and base is not None and base > dense:
            lines.append(f"At {s:.0%} measured: {DEFAULT} loses {p - dense:.3f} PPL, {BASELINE} (TEAL's released "
                         f"setting) {base - dense:.3f}: ratio **{(p - dense) / (base - dense):.2f}** (aim ≤ {aim}).")
    return lines


def no_thresholds(model):
    for *_, mod, _ in model.sparse_modules():
        mod.threshold.zero_()


def weight_names(flag: str) -> list:
    names = [w for w in flag.split(",") if w]
    if any(w not in WEIGHTS for w in names):
        raise UserError(f"--weights takes a comma-separated list of {', '.join(WEIGHTS)}; got {flag!r}")
    return names


def weight_models(a, ckpt, tok, device, dtype) -> dict:
    """{name: the model in that weight format} for the names in --weights (WEIGHTS)."""
    out = {}
    for w in weight_names(a.weights):
        if w.startswith("awq-"):
            model = load_model(ckpt, device, dtype)
            text = read_texts(a.awq_text or default_texts("calibration"))
            awq_on_text(model, tok, text, awq_variant(int(w[len("awq-g"):])), a.awq_tokens, AWQ_SEQ)
            out[w] = model
        else:
            out[w] = load_model(ckpt, device, dtype, quant=QUANT_FORMATS[w])
    return out


def weights_table(results: list, float_at: dict, dense: float) -> list:
    """Markdown lines: each weight format's perplexity dense and at WEIGHTS_AT, against the float model's."""
    lines = ["| weights | dense PPL | × float | KL | top-1 | "
             f"PPL at {WEIGHTS_AT:.0%} ({DEFAULT}) | measured | × float at {WEIGHTS_AT:.0%} |",
             "|---|---|---|---|---|---|---|---|",
             f"| float | {dense:.3f} | 1.000 | 0 | 1 | {float_at['ppl']:.3f} | {float_at['sparsity']:.3f} | 1.000 |"]
    by = {r["name"]: r for r in results}
    for w in dict.fromkeys(r["name"].split()[0] for r in results):
        d, s = by[f"{w} dense"], by[f"{w} {WEIGHTS_AT}"]
        lines.append(f"| {w} | {d['ppl']:.3f} | {d['ppl'] / dense:.3f} | {d['kl']:.4f} | {d['top1']:.3f} | "
                     f"{s['ppl']:.3f} | {s['sparsity']:.3f} | {s['ppl'] / float_at['ppl']:.3f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--text", nargs="+", type=Path, default=None,
                   help="held-out text files (default: the evaluation side of the Shakespeare split)")
    p.add_argument("--max-tokens", type=int, default=8192, help="scored tokens")
    p.add_argument("--window", type=int, default=512, help="tokens per sliding window")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "quality.md",
                   help="the Markdown report (and its .json beside it)")
    p.add_argument("--weights", default=",".join(WEIGHTS),
                   help=f"quantized weights to score dense and at {WEIGHTS_AT:.0%}, of {', '.join(WEIGHTS)} ('' for none)")
    p.add_argument("--awq-text", nargs="+", type=Path, default=None,
                   help="AWQ's calibration text (default: the calibration side of the Shakespeare split)")
    p.add_argument("--awq-tokens", type=int, default=4096, help="AWQ's calibration tokens (quantize.py's default)")
    a = p.parse_args(argv)
    check_windows(a)
    if any(w.startswith("awq-") for w in weight_names(a.weights)) and a.awq_tokens < AWQ_SEQ:
        raise UserError(f"--awq-tokens must be at least one sequence of {AWQ_SEQ}, got {a.awq_tokens}")
    if a.dtype == "auto":
        a.dtype = "float32"
    ckpt, model, tok, device = load_from_args(a)
    cats_model = load_from_args(a, mlp="cats")[1]
    calib = load_calibration(model, ckpt / CALIB_FILE)
    settings = []
    for s in LEVELS:
        for method in METHODS:
            for crit in (CRITERIA if method == "uniform" else calib.greedy):  # (greedy: the criteria calibrated)
                settings.append(Setting(f"{method} {crit} {s}", model,
                                        lambda m, s=s, me=method, c=crit: apply_thresholds(m, calib, s, me, c)))
    for s in CATS_LEVELS:
        settings.append(Setting(f"cats {s}", cats_model,
                                lambda m, s=s: apply_thresholds(m, calib, s, "uniform", "magnitude")))
    quantized = weight_models(a, ckpt, tok, device, model.tok_embeddings.weight.dtype)
    n_sparse = len(settings)
    for w, m in quantized.items():
        settings.append(Setting(f"{w} dense", m, no_thresholds))
        settings.append(Setting(f"{w} {WEIGHTS_AT}", m,
                                lambda m: apply_thresholds(m, calib, WEIGHTS_AT, "greedy", DEFAULT_CRITERION)))
    ids = load_eval_text(tok, a.text)
    held_out = (", ".join(f.name for f in a.text) if a.text
                else "the evaluation side of the Shakespeare split (disjoint by play)")
    t0 = time.time()
    results = evaluate(model, ids, settings, a.window, a.stride, a.max_tokens)
    results, weight_results = results[:n_sparse], results[n_sparse:]
    dense = results[0]["dense_ppl"]
    lines = ["# Sparse quality report", "",
             f"`python scripts/quality_report.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')} "
             f"({device}, {a.dtype}, {time.time() - t0:.0f} s). Model: `{ckpt.name}`; calibration: "
             f"{calib.meta.get('text')} ({calib.meta.get('tokens')} tokens, greedy step {calib.meta.get('step')}). "
             f"Held-out text: {held_out}, "
             f"{results[0]['tokens']} scored tokens, windows of {a.window} with stride {a.stride}; every token "
             "sparsified. KL is KL(dense ‖ sparse) per token in nats; top-1 is agreement of the argmax with dense; "
             "sparsity is what the thresholds measured on this text (parameter-weighted model-wide, and per projection).",
             "", f"Dense perplexity: **{dense:.3f}**", "",
             "| setting | target | PPL | ΔPPL | KL | top-1 | measured | " + " | ".join(PROJECTIONS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PROJECTIONS)]
    for r in results:
        *name, level = r["name"].split()
        pp = " | ".join(f"{r['per_projection'].get(q, 0):.2f}" for q in PROJECTIONS)
        lines.append(f"| {' '.join(name)} | {float(level):.2f} | {r['ppl']:.3f} | {r['ppl'] - dense:+.3f} | {r['kl']:.4f} | "
                     f"{r['top1']:.3f} | {r['sparsity']:.3f} | {pp} |")
    lines += ["", "## At equal measured sparsity", "",
              "Each method's perplexity at the same *measured* model-wide sparsity (log PPL interpolated through its three "
              "rows nearest it); ratio: its perplexity increase over uniform-magnitude's at that sparsity.", ""]
    lines += equal_sparsity_table(results, dense) + [""]
    lines += ["In the CATS rows, gate and down stay dense and their columns show the fraction of up rows skipped "
              "(`up`) and the resulting zeros in down's input (`down`); attention uses uniform-magnitude "
              "thresholds at the same level.", ""]
    if weight_results:
        float_at = next(r for r in results if r["name"] == f"{DEFAULT} {WEIGHTS_AT}")
        lines += ["## Quantized weights", "",
                  f"Each weight format dense and at {WEIGHTS_AT:.0%} ({DEFAULT}, the float model's calibration: AWQ's "
                  "per-channel input scales divide its thresholds), against the float model at the same setting; "
                  "KL and top-1 against the float model dense. int8 and int4 (round to nearest, groups of 128) as "
                  "`--quant` makes them; AWQ as `quantize.py --mode awq [--group 32]` makes them "
                  f"({a.awq_tokens} calibration tokens).", ""]
        lines += weights_table(weight_results, float_at, dense) + [""]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines))
    (a.out.with_suffix(".json")).write_text(json.dumps({"dense_ppl": dense, "results": results,
                                                           "weights": weight_results}, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
