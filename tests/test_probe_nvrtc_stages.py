"""scripts/probe_nvrtc_stages.py: the launches it compares (each projection's default config beside its cp.async
stages, those that fit a CTA's shared memory), its refusals without a GPU or with bad flags, and (where NVRTC is
installed) that every launch compiles for sm_90. Its timings and outputs are checked on the GPU by the script itself
(against cuda_gemv_ref before timing)."""
import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from errors import UserError
from kernels import cuda_gemv, nvrtc
from model import ModelArgs
from scripts import probe_nvrtc_stages as probe

ROOT = Path(__file__).resolve().parent.parent
ALL = ("qkv", "o", "gate_up", "down")


def run(*args):
    return subprocess.run([sys.executable, "scripts/probe_nvrtc_stages.py", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_variants_beside_the_default_config():
    variants = probe.parse_variants("default,4x3,8x3,2x4")
    assert variants == [None, (4, 3), (8, 3), (2, 4)]
    cs, skipped = probe.cases(ModelArgs.from_name("llama-2-7b"), ALL, ("bf16", "int8"), variants, 132)
    for proj in ALL:
        for kind in ("bf16", "int8"):
            mine = [c for c in cs if c.proj == proj and c.weights == kind]
            default = cuda_gemv.default_config(mine[0].K, mine[0].sizes, 132, 9, kind == "int8")
            assert mine[0].config == default and default.stages == 0
            for c in mine[1:]:  # the same split and tail, the rows and stages asked
                assert (c.config.split, c.config.cluster) == (default.split, default.cluster) and c.config.stages
                assert cuda_gemv.shared_bytes(probe.spec_of(c, True)) <= cuda_gemv.STATIC_SMEM
    # 8 rows x 3 stages is 48 KB of stages alone: skipped everywhere, and said so
    assert not any(c.config.rows == 8 and c.config.stages == 3 for c in cs)
    assert len(skipped) == 8 and all("8x3" in line for line in skipped)


def test_int4_variants_are_steps_beside_int4s_config():
    """int4 weights: the default is int4_config (group 128), a variant's rows are steps of 16 rows a warp; 1x3 fits
    every Llama-2-7B launch, 2x3 (48 KB of stages alone) none."""
    cs, skipped = probe.cases(ModelArgs.from_name("llama-2-7b"), ALL, ("int4",), probe.parse_variants("default,1x3,2x3"),
                              132)
    for proj in ALL:
        mine = [c for c in cs if c.proj == proj]
        assert mine[0].config == cuda_gemv.int4_config(mine[0].K, mine[0].sizes, 132, 9, probe.GROUP)
        assert [c.config[1:] for c in mine[1:]] == [(1, mine[0].config.cluster, 0, 3)]
        assert probe.spec_of(mine[1], True).group == probe.GROUP
    assert len(skipped) == 4 and all("int4 2x3" in line for line in skipped)


def test_bad_variants_are_refused():
    for text in ("4x1", "x3", "fast", ","):
        with pytest.raises(UserError):
            probe.parse_variants(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    r = run("--projections", "qkv")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "needs an sm_90" in r.stderr


@pytest.mark.parametrize("flags", [["--model", "nope"], ["--projections", "qkv,lm_head"], ["--weights", "int2"],
                                   ["--variants", "4x1"], ["--sparsities", "1.5"]])
def test_refuses_bad_flags(flags):
    r = run(*flags)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stdout == ""


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
def test_every_launch_compiles_for_sm90():
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    cs, _ = probe.cases(ModelArgs.from_name("llama-2-7b"), ("qkv", "down"), ("bf16", "int8", "int4"),
                        probe.parse_variants("default,4x3,2x4,1x3"), 132)
    for case in cs:
        for sparse in (False, True):
            assert nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(probe.spec_of(case, sparse)), "sm_90")[:4] \
                == b"\x7fELF"
