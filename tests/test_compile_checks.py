"""tests/compile_checks.py, run in a subprocess without Triton's interpreter (tracing needs compiled Triton
functions): the decode step traces whole, kernels write only their outputs, every launch builds for sm_90."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_decode_step_traces_whole_and_kernels_write_only_outputs():
    """tests/compile_checks.py, in a process without the interpreter: the decode step traces with fullgraph
    through the kernel ops, torch.compile's analysis finds every launch writing only its outputs and
    workspaces (an input it could not rule out would be cloned on every call: a weight, a full copy per token),
    and every launch of real-shape decode steps compiles to an sm_90 cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tests" / "compile_checks.py")], capture_output=True, text=True,
                       env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "assuming every input is mutated" not in r.stderr, r.stderr
    assert re.search(r"sm_90 builds of the decode step's launches: \d+ distinct, 0 failed", r.stdout), r.stdout
