"""scripts/trace_layer.py: the timeline summaries (synthetic records: the script itself needs an sm_90 GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import trace_layer

ROOT = Path(__file__).resolve().parent.parent


def records(starts, readies, ends, sms):
    return torch.tensor([list(r) for r in zip(starts, readies, ends, sms)], dtype=torch.int64)


def test_timeline_of_one_launch():
    # ns: three CTAs on two SMs, starting 100 apart, prologues 1000/2000/3000, ends at 10000/10500/12000
    s = trace_layer.timeline(records([5000, 5100, 5200], [6000, 7100, 8200], [15000, 15500, 17000], [3, 7, 3]))
    assert s["ctas"] == 3 and s["sms"] == 2
    assert s["first_start"] == pytest.approx(5.0) and s["start_spread"] == pytest.approx(0.2)
    assert s["prologue"] == pytest.approx(2.0) and s["stream"] == pytest.approx(8.8)
    assert (s["first_end"], s["last_end"]) == (pytest.approx(15.0), pytest.approx(17.0))


def test_layer_report_measures_from_the_first_start_with_gaps():
    a = records([1_000_000, 1_000_050], [1_001_000, 1_001_150], [1_010_000, 1_011_150], [0, 1])
    b = records([1_012_000, 1_012_100], [1_013_000, 1_014_100], [1_020_000, 1_020_500], [0, 1])
    lines = trace_layer.layer_report(["gate/up", "down"], [a, b], [2, 1])
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # two CTAs on two SMs and two tiles: either explains all of the spread; down's one tile explains none
    assert cells[0] == ["gate/up", "2", "", "0.05", "1.05", "9.50", "1.15", "11.15", "1.00", "1.00"]
    # down starts 0.85 µs after gate/up's last CTA ended; its end spread 0.50, last end 20.50 µs from the start
    assert cells[1] == ["down", "2", "0.85", "0.10", "1.50", "6.70", "0.50", "20.50", "1.00", "0.00"]


def test_explained_share_of_the_spread():
    values = torch.tensor([10.0, 12.0, 10.0, 12.0])
    assert trace_layer.explained(values, torch.tensor([0, 1, 0, 1])) == pytest.approx(1.0)
    assert trace_layer.explained(values, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)
    assert trace_layer.explained(torch.tensor([10.0, 11.0, 13.0, 14.0]), torch.tensor([0, 0, 1, 1])) == \
        pytest.approx(9 / 10)
    assert trace_layer.explained(torch.tensor([5.0, 5.0]), torch.tensor([0, 1])) == 0.0


def test_without_a_gpu_one_line():
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    r = subprocess.run([sys.executable, "scripts/trace_layer.py", "--sparsity", "0.5"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: trace_layer.py needs an sm_90 GPU"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,msg", [(["--sparsity", "0.4,0.5"], "one level"), (["--model", "nope"], "unknown model"),
                                      (["--sparsity", "1.5"], "must lie in")])
def test_bad_input_one_line(args, msg):
    r = subprocess.run([sys.executable, "scripts/trace_layer.py", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
