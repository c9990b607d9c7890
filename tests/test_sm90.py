"""scripts/sm90.py: the decode step's launches built for sm_90 on the CPU, and what it reports of them."""
import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import run_cli
from kernels import cuda_gemv, nvrtc
from scripts import sm90 as sm90_script

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # sm_90 builds of every launch in subprocesses


def sm90(*args, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sm90.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_reports_registers_and_loops_of_every_launch():
    r = sm90("--model", "llama-2-7b", "--quant", "int8", interpret=False)
    assert r.returncode == 0, r.stderr
    kernels = re.findall(r"^(_\w+_kernel) num_warps=\d+ ", r.stdout, re.M)
    # int8 batch 1: q/k/v partials, attention, o, gate/up partials, down from them, the LM head
    assert kernels.count("_sparse_gemv_kernel") == 5 and kernels.count("_decode_attention_kernel") == 1, r.stdout
    regs = [int(n) for n in re.findall(r"registers (\d+), stack frame \(spills\) 0 bytes", r.stdout)]
    assert len(regs) == 6 and all(0 < n <= 255 for n in regs), r.stdout
    # every GEMV streams its weight rows in a loop of FMAs; int8 rows are widened by the magic number (no I2F)
    loops = re.findall(r"loop at \.L_x_\d+: (\d+) instructions: (.*)", r.stdout)
    fma_loops = [ops for n, ops in loops if "FFMA" in ops]
    assert len(fma_loops) >= 8 and not any("I2F" in ops for ops in fma_loops), r.stdout


def test_bad_input_is_one_line():
    """As its __main__ runs it, in a subprocess once (the interpreter refused before anything is built)."""
    r = sm90(interpret=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unset TRITON_INTERPRET"), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args,message", [(("--model", "llama-9"), "unknown model 'llama-9'"),
                                          (("--batch", "9"), "--batch must lie")], ids=["model", "batch"])
def test_bad_flags_are_one_line(args, message, monkeypatch, capsys):
    """The flag refusals, its main() run through run_cli in this process."""
    monkeypatch.setattr(sys, "argv", ["sm90.py", *args])
    with pytest.raises(SystemExit) as e:
        run_cli(sm90_script.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err


def test_int4_on_hopper_takes_the_gluon_stream_without_conversions():
    """int4 weights on sm_90: q/k/v, o, gate/up and down launch the tensor-core Gluon kernel (kernels/gluon_mma.py,
    512-column tiles, 256 for Llama-2's gate/up; o and down with the residual added), whose stream loops build
    without spills and without a shared-memory round trip (no LDS, no barrier: the layout conversions of the Triton
    int4 loop, docs/perf-notes.md sessions 16 and 18; the mma operands are made in registers, session 19); the int8
    LM head stays on the Triton kernel. (kernels/gluon_gemv.py serves the shapes it does not take: compile_checks.)"""
    r = sm90("--model", "llama-2-7b", "--quant", "int4", "--top", "60", interpret=False)
    assert r.returncode == 0, r.stderr
    blocks = re.split(r"^(?=_\w+_kernel num_warps)", r.stdout, flags=re.M)
    gluon = [b for b in blocks if b.startswith("_int4_gemv_kernel")]
    mma = [b for b in blocks if b.startswith("_mma_kernel")]
    assert not gluon and sum(b.startswith("_sparse_gemv_kernel") for b in blocks) == 1, r.stdout
    assert sorted(re.search(r"'WB': \d", b) is not None for b in mma) == [False, True, True, True], r.stdout  # WB=1
    assert sum("'RESIDUAL': True" in b for b in mma) == 2 and sum("'X_PARTS': 5" in b for b in mma) == 1, r.stdout
    for b, loop_op in [(b, "FFMA") for b in gluon] + [(b, "HMMA") for b in mma]:
        assert "stack frame (spills) 0 bytes" in b, b
        streams = [ops for ops in re.findall(r"loop at \.L_x_\d+: \d+ instructions: (.*)", b) if loop_op in ops]
        assert streams and not any("LDS" in ops or "BAR" in ops for ops in streams), b



def test_sass_of_one_kernel_is_printed_in_order():
    """--sass KERNEL: that kernel's whole SASS after its report (addresses ascending), for reading instruction order
    (docs/perf-notes.md, session 27: where a prefetch landed among the loads); no other kernel's."""
    r = sm90("--model", "llama-2-7b", "--sass", "_decode_attention_kernel", interpret=False)
    assert r.returncode == 0, r.stderr
    head, sass = r.stdout.split("_decode_attention_kernel num_warps", 1)
    sass = re.split(r"\n_\w+_kernel num_warps", sass)[0]  # up to the next launch's report
    addrs = [int(a, 16) for a in re.findall(r"/\*([0-9a-f]{4})\*/", sass)]
    assert len(addrs) > 100 and addrs == sorted(addrs), sass[:2000]
    assert "LDG.E.128" in sass and "EXIT" in sass
    assert not re.findall(r"/\*[0-9a-f]{4}\*/", head), head[:2000]  # kernels before it: reports only


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
def test_nvrtc_report_shows_how_stream_loops_wait(capsys):
    """--nvrtc: each projection's NVRTC launch for sm_90 and its stream loop; the register ring's loads share a
    scoreboard the loop waits on (every wait covers the loads just issued, perf-notes session 47), 16-bit, int8 and
    int4 weights alike."""
    assert sm90_script.nvrtc_report("llama-2-7b", torch.bfloat16, "int8", True, None) == 0
    ring = capsys.readouterr().out
    assert re.findall(r"^(\w+) \(", ring, re.M) == ["qkv", "o", "gate_up", "down"], ring
    assert len(re.findall(r"loads on scoreboard\(s\) \[[\d, ]+\], waited on in the loop", ring)) == 4, ring
    for quant, rows in ((None, 4), ("int4", None)):
        assert sm90_script.nvrtc_report("llama-2-7b", torch.bfloat16, quant, True, rows) == 0
        out = capsys.readouterr().out
        assert re.findall(r"^(\w+) \(", out, re.M) == ["qkv", "o", "gate_up", "down"], out
        assert len(re.findall(r"loads on scoreboard\(s\) \[[\d, ]+\]", out)) >= 4, out


@pytest.mark.skipif(nvrtc.find_nvrtc() is None, reason="no libnvrtc under the Python paths (CUDA wheels)")
def test_int4_stream_widens_a_pair_in_one_lop3():
    """int4's NVRTC stream: each widened pair `(p & mask) | off2` is one LOP3, the offset held in a register ptxas
    cannot fold (with both as immediates it takes two: 64 instructions more a step, perf-notes session 50); bf16
    and fp16, sparse and dense."""
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    K, sizes = 4096, (4096, 4096, 4096)
    for dtype, sparse in ((torch.bfloat16, True), (torch.float16, False)):
        spec = cuda_gemv.spec_of(K, sizes, dtype, sparse, True, False, False, 1e-5,
                                 cuda_gemv.default_config(K, sizes, 132, 9, group=128), True, group=128)
        _, loops, _ = sm90_script.inspect(nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(spec), "sm_90"))
        (ops,) = [ops for _, _, ops in loops if any(op.startswith("HMMA") for op in ops)]
        mmas = sum(n for op, n in ops.items() if op.startswith("HMMA"))
        assert mmas == 32 and ops["LOP3.LUT"] <= 4 * mmas + 8, ops  # 2 steps x 16 mmas, 4 widened pairs an mma


def test_control_bits_are_read_from_the_high_word():
    """nvdisasm -hex's second word carries stall cycles (bits 41-44), the write / read scoreboards (46-48, 49-51;
    7: none) and the wait mask (52-57)."""
    hi = (3 | 5 << 5 | 7 << 8 | 0b100001 << 11) << 41
    text = (".L_x_1:\n        /*0010*/    LDG.E R2, desc[UR4][R4.64] ;    /* 0x0000000004027981 */\n"
            f"                                                 /* 0x{hi:016x} */\n")
    assert sm90_script.control_bits(text) == ([("LDG.E R2, desc[UR4][R4.64]", 3, 5, None, (0, 5))], {".L_x_1": 0})


def test_a_build_lost_to_the_ast_race_is_tried_again(monkeypatch):
    """build_all's threads can race in CPython's AST constructor ('recursion depth mismatch', a SystemError under
    Triton's CompilationError): such a build is tried again; any other error is reported once, with its launch."""
    calls = []

    def build(launch):
        calls.append(launch)
        if launch == "raced" and len(calls) > 1:
            return "kernel"
        try:
            raise SystemError("AST constructor recursion depth mismatch (before=36, after=210)" if launch == "raced"
                              else "something else")
        except SystemError as e:
            raise RuntimeError("compilation failed") from e

    monkeypatch.setattr(sm90_script, "build", build)
    monkeypatch.setattr(sm90_script, "distinct", lambda launches: launches)
    monkeypatch.setattr(sm90_script, "describe", lambda launch: launch)
    assert sm90_script.build_all(["raced"]) == [("raced", "kernel", None)] and calls == ["raced"] * 2
    calls.clear()
    (launch, kernel, error), = sm90_script.build_all(["broken"])
    assert kernel is None and error == "broken: SystemError: something else" and calls == ["broken"]
