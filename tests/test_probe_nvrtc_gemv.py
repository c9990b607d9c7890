"""scripts/probe_nvrtc_gemv.py: its kernel source per variant, its refusals without a GPU or with bad flags, and (where
NVRTC is installed) that every variant compiles for sm_90. Its timings and outputs are checked on the GPU by the
script itself (poisoned output, error against x·W in float32)."""
import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import probe_nvrtc_gemv as probe

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "scripts/probe_nvrtc_gemv.py", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_kernel_source_per_variant():
    clustered = probe.kernel_source(8, 16, True)
    assert "#define SPLIT 8\n#define ROWS 16\n#define CLUSTER 1\n" in clustered
    assert "__cluster_dims__(1, 8, 1) gemv(" in clustered and "CLUSTER_ATTR" not in clustered
    plain = probe.kernel_source(2, 8, False)
    assert "#define CLUSTER 0" in plain and "__cluster_dims__" not in plain and "CLUSTER_ATTR" not in plain


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    r = run()
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in r.stderr


@pytest.mark.parametrize("flags", [["--splits", "9"], ["--rows", "0"], ["--splits", "two"], ["--model", "nope"]])
def test_refuses_bad_flags(flags):
    r = run(*flags)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stdout == ""


@pytest.mark.skipif(probe.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
def test_every_variant_compiles_for_sm90():
    nvrtc = ctypes.CDLL(probe.find_nvrtc())
    for split in (1, 2, 8):
        for cluster in (False, True) if split > 1 else (False,):
            cubin = probe.compile_cubin(nvrtc, probe.kernel_source(split, 8, cluster), "sm_90")
            assert cubin[:4] == b"\x7fELF"
