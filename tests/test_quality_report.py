"""scripts/quality_report.py: methods compared at equal measured sparsity (interpolation along each method's own
points), and the report written end to end on the default model (with its quantized-weights rows)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from errors import UserError
from scripts import eval_ppl, quality_report
from scripts.quality_report import at_measured, equal_sparsity_table

ROOT = Path(__file__).resolve().parent.parent


def test_at_measured_interpolates_log_ppl_through_the_nearest_points():
    curve = lambda s: math.exp(2.0 + 3.0 * s + 9.0 * s * s)  # log PPL a parabola in the measured sparsity
    pts = [(s, curve(s)) for s in (0.52, 0.25, 0.41, 0.3)]  # any order
    assert at_measured(pts, 0.41) == pytest.approx(curve(0.41))
    for s in (0.465, 0.35, 0.27, 0.5):
        assert at_measured(pts, s) == pytest.approx(curve(s), rel=1e-9), s
    chord = math.exp((math.log(curve(0.41)) + math.log(curve(0.52))) / 2)
    assert at_measured(pts, 0.465) < chord  # the chord overstates a convex curve
    assert at_measured(pts[:2], 0.4) == pytest.approx(math.exp((math.log(curve(0.25)) * 0.12 + math.log(curve(0.52)) * 0.15) / 0.27))
    assert at_measured(pts, 0.6) is None and at_measured(pts, 0.2) is None and at_measured(pts[:1], 0.52) is None


def test_equal_sparsity_table_ratios_at_the_same_measured_sparsity():
    """A method that only measures sparser at the same target is not charged for it: here the default (greedy
    magnitude) has exactly uniform's curve, shifted along its targets, so its ratio is 1 at both measured levels."""
    dense = 20.0
    curve = [(0.3, 22.0), (0.45, 26.0), (0.55, 34.0)]
    results = [{"name": f"uniform magnitude {t}", "sparsity": s, "ppl": p} for t, (s, p) in zip((0.3, 0.45, 0.5), curve)]
    results += [{"name": f"greedy magnitude {t}", "sparsity": s, "ppl": p}
                for t, (s, p) in zip((0.35, 0.5, 0.55), curve)]
    lines = equal_sparsity_table(results, dense)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "method" not in line}
    assert rows["greedy magnitude"].count("| 1.00") == 2, rows
    assert any("ratio **1.00** (aim ≤ 0.6)" in line for line in lines), lines


@pytest.mark.slow
def test_report_written_on_the_default_model(tmp_path):
    out = tmp_path / "q.md"
    text = ROOT / "tests" / "data" / "shakespeare.txt"  # tests download nothing (conftest)
    r = subprocess.run([sys.executable, "scripts/quality_report.py", "--text", str(text), "--max-tokens", "48",
                        "--window", "64", "--stride", "32", "--out", str(out), "--weights", "int8,awq-g32",
                        "--awq-text", str(text), "--awq-tokens", "256"], capture_output=True, text=True,
                       cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    report = out.read_text()
    assert "## At equal measured sparsity" in report and "Held-out text: shakespeare.txt" in report
    rows = [line for line in report.splitlines() if line.startswith("| greedy weight-aware | ")]
    assert len(rows) == 7 + 1, rows  # one per target level, one at equal measured sparsity
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["results"]) == 7 * 4 + 3
    weights = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in report.split("## Quantized weights")[1]
               .splitlines() if line.startswith("| ") and "weights" not in line}
    assert list(weights) == ["float", "int8", "awq-g32"], weights
    assert [r["name"] for r in data["weights"]] == ["int8 dense", "int8 0.5", "awq-g32 dense", "awq-g32 0.5"]
    assert 0.9 < float(weights["int8"][2]) < 1.1 and 0.45 < float(weights["awq-g32"][6]) < 0.56, weights


@pytest.mark.parametrize("script,argv,what", [
    (quality_report, ["--max-tokens", "-1"], "--max-tokens >= 1"),
    (quality_report, ["--stride", "600"], "0 < --stride <= --window"),
    (quality_report, ["--weights", "int3"], "--weights takes a comma-separated list"),
    (quality_report, ["--awq-tokens", "10"], "--awq-tokens must be at least one sequence of 256"),
    (eval_ppl, ["--sparsity", "0.5", "--window", "0"], "0 < --stride <= --window"),
    (eval_ppl, ["--sparsity", "0.5", "--dense-prefix", "-1"], "--dense-prefix must be >= 0"),
])
def test_bad_arguments_are_refused_before_any_model_work(script, argv, what):
    with pytest.raises(UserError, match=what):
        script.main(argv)
