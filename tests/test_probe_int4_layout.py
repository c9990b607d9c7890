"""scripts/probe_int4_layout.py: the launches it compares (int8 on N / 2 matches int4 on N in bytes per row, row
piece and column tiles), its refusals without a GPU or with bad flags, and (where NVRTC is installed) that every
launch compiles for sm_90. Its timings and outputs are checked on the GPU by the script itself (error against
cuda_gemv_ref before timing)."""
import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cuda_gemv, nvrtc
from model import ModelArgs
from scripts import probe_int4_layout as probe

ROOT = Path(__file__).resolve().parent.parent
ALL = ("qkv", "o", "gate_up", "down")


def run(*args):
    return subprocess.run([sys.executable, "scripts/probe_int4_layout.py", *args], capture_output=True, text=True,
                          cwd=ROOT)


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3-8b", "mistral-7b-v0.1"])
def test_half_width_int8_reads_what_int4_reads(model):
    cs = probe.cases(ModelArgs.from_name(model), ALL, 132, 9)
    assert {c.proj for c in cs} == set(ALL)
    for proj in ALL:
        by = {c.label: c for c in cs if c.proj == proj}
        i4, i8, half = by["int4"], by["int8"], by["int8 N/2"]
        assert i4.int4 and not i8.int4 and not half.int4 and i4.sizes == i8.sizes
        assert [2 * s for s in half.sizes] == list(i4.sizes) and half.K == i4.K
        bytes_per_row = lambda c: sum(c.sizes) // (2 if c.int4 else 1)  # noqa: E731
        assert bytes_per_row(half) == bytes_per_row(i4) == bytes_per_row(i8) // 2
        tile4, tile8 = cuda_gemv.tile_cols(i4.sizes, False, probe.GROUP), cuda_gemv.tile_cols(half.sizes, True)
        assert tile4 // 2 == tile8 == 128  # a row piece of 128 bytes each, as many column tiles
        assert sum(i4.sizes) // tile4 == sum(half.sizes) // tile8
        same = by.get("int8 N/2, int4's split", half)
        assert (same.config.split, same.config.cluster) == (i4.config.split, i4.config.cluster)
        for c in by.values():
            assert cuda_gemv.supported(c.K, c.sizes, torch.bfloat16, probe.GROUP if c.int4 else 0)


def test_only_the_projections_asked():
    cs = probe.cases(ModelArgs.from_name("llama-2-7b"), ("qkv",), 132, 9)
    assert {c.proj for c in cs} == {"qkv"} and len(cs) >= 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    r = run("--projections", "qkv")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "needs an sm_90" in r.stderr


@pytest.mark.parametrize("flags", [["--model", "nope"], ["--projections", "qkv,lm_head"], ["--projections", ","],
                                   ["--sparsities", "1.5"], ["--sparsities", "half"]])
def test_refuses_bad_flags(flags):
    r = run(*flags)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stdout == ""


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
def test_every_launch_compiles_for_sm90():
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    for case in probe.cases(ModelArgs.from_name("llama-2-7b"), ("qkv", "down"), 132, 9):
        for sparse in (False, True):
            cubin = nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(probe.spec_of(case, sparse)), "sm_90")
            assert cubin[:4] == b"\x7fELF"
