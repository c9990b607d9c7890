"""Build the decode step's kernel launches for the H100 (sm_90) on a machine without a GPU, and read what came out:
registers, stack frame (spills) and the instruction mix of each innermost loop, from the cuobjdump and nvdisasm
that ship with Triton. A change to a kernel's loop can then be read as instructions before device time is spent on
timing it (docs/perf-notes.md, session 8). tests/compile_checks.py builds the same launches to catch what only the
GPU compiler refuses.

    python scripts/sm90.py [--model llama-2-7b] [--quant int8|int4] [--dtype bfloat16] [--batch 1] [--dense]
                           [--sass KERNEL]
    python scripts/sm90.py --nvrtc [--model llama-2-7b] [--quant int8|int4] [--dense] [--rows R]

One layer of the model at its real shapes, launch configs as an H100 (132 SMs) gets them; the launches are
recorded (Triton's own binder specialises them as a launch would: aligned pointers, multiples of 16, ones as
constants), not run. Must run without TRITON_INTERPRET. `--nvrtc`: the batch-1 projections sm_90 runs on
kernels/cuda_gemv.py instead (built with libnvrtc), and how each stream loop waits for its weight loads (the
control bits of `nvdisasm -hex`: which scoreboards the loads set and the loop waits on).
"""
import argparse
import collections
import ctypes
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Optional

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from cli import HelpFormatter, run_cli
from errors import UserError
from loading import random_model
from model import CONFIGS, ModelArgs
from plan import decode_plan
from kernels import cuda_gemv, nvrtc
from kernels.formats import QUANT_FORMATS, quant_format
from quantization import quantize_model
from scripts.bench import projection_roles, projection_shapes

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HopperTarget:
    """Stands in for the CUDA driver (triton.runtime.driver.set_active): what Triton asks of it to bind and
    compile a launch, not to run one."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


@contextmanager
def recorded_launches():
    """Within: every Triton launch is recorded as (kernel, signature, constexprs, attrs, options) instead of compiled
    and run, through Triton's public pre-compile hook (knobs.runtime.jit_cache_hook: returning True skips the
    compilation, and a launch with no kernel does nothing). Needs HopperTarget active."""
    seen = []

    def record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit = fn.jit_function
        backend = jit.device_caches[0][3]
        opts = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion",
                                        "launch_cooperative_grid")}
        seen.append((jit, compile["signature"], compile["constants"], compile["configs"][0],
                     backend.parse_options(opts)))
        return True

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = previous


def plan_as_on_gpu(n_sm: int = 132):
    """The decode plan an sm_90 GPU of n_sm multiprocessors gets (generate.py's, libnvrtc found), on a CPU machine."""
    plan = decode_plan(torch.device("cpu"), sparsity=0.5, kernels=True, n_sm=n_sm, hopper_int4=True)
    return dataclasses.replace(plan, nvrtc_arch=90, nvrtc_sparse=True, nvrtc_int8=True)


def layer_model(name: str, dtype: torch.dtype, quant: Optional[str] = None, mlp: str = "teal"):
    """A random one-layer model of `name`'s shapes whose decode step makes the launches of a real one: the whole
    vocabulary when it is quantized (the quantized LM head is a kernel; zeros: launches do not depend on values),
    else cut down."""
    args = ModelArgs(**{**CONFIGS[name], "n_layer": 1, "max_seq_len": 256, **({} if quant else {"vocab_size": 64})})
    return random_model(args, "cpu", dtype, mlp=mlp, vocab_zeros=quant is not None)


def decode_step_launches(name: str, dtype: torch.dtype, quant: Optional[str] = None, mlp: str = "teal",
                         batches=(1,), sparse_froms=(0,), model=None) -> list:
    """The launches of one-layer decode steps of model `name`, its weights quantized with `quant` (quantize.py) or
    not. sparse_from 0: the sparse step; None: the dense one (cuBLAS projections, the attention kernel). `model`:
    layer_model(name, dtype, quant, mlp) made once by the caller for several calls (it is quantized in place).
    The Triton path, as sm_90 runs it without libnvrtc and other GPUs run it (with libnvrtc, sm_90's 16-bit and int8
    projections take kernels/cuda_gemv.py, whose builds tests/test_cuda_gemv.py checks)."""
    model = layer_model(name, dtype, quant, mlp) if model is None else model
    if quant:
        quantize_model(model, quant_format(quant))
    model.set_plan(dataclasses.replace(plan_as_on_gpu(), nvrtc_arch=0, nvrtc_sparse=False, nvrtc_int8=False))
    model.setup_caches(max(batches), model.args.max_seq_len)
    with recorded_launches() as seen:
        for B in batches:
            for sparse_from in sparse_froms:  # thresholds are data: any value makes the same launches
                model(torch.zeros(B, 1, dtype=torch.long), torch.tensor([100]), sparse_from=sparse_from)
    return seen


def distinct(launches) -> list:
    jobs = {}
    for fn, sig, consts, attrs, opts in launches:
        jobs.setdefault((fn.__name__, repr(sig), repr(consts), repr(attrs), repr(opts)), (fn, sig, consts, attrs, opts))
    return list(jobs.values())


def build(launch):
    fn, sig, consts, attrs, opts = launch
    source = GluonASTSource if getattr(fn, "is_gluon", lambda: False)() else ASTSource
    return triton.compile(source(fn, sig, consts, attrs), target=TARGET, options=opts.__dict__)


def build_all(launches) -> list:
    """[(launch, compiled kernel or None, error line or None)] for each distinct launch, built for sm_90 (ptxas
    included) in parallel."""
    def attempt(launch, tries=3):
        try:
            return launch, build(launch), None
        except Exception as e:  # noqa: BLE001  (reported with the launch that failed)
            while (e.__cause__ or e.__context__) is not None:  # a CompilationError points at the call site;
                e = e.__cause__ or e.__context__  # the innermost exception says why
            if isinstance(e, SystemError) and "recursion depth mismatch" in str(e) and tries > 1:
                # CPython's AST constructor (3.11) keeps its recursion depth where two threads' parses can race
                # (seen once in CI, session 47): the build itself is sound, so it is tried again
                return attempt(launch, tries - 1)
            return launch, None, f"{describe(launch)}: {type(e).__name__}: {str(e).strip()[:300]}"

    with ThreadPoolExecutor(os.cpu_count()) as pool:  # ptxas runs as a process of its own
        return list(pool.map(attempt, distinct(launches)))


def compile_for_hopper(launches) -> tuple:
    """Builds each distinct launch for sm_90; returns (count, error lines)."""
    built = build_all(launches)
    return len(built), [e for _, _, e in built if e]


def describe(launch) -> str:
    fn, sig, consts, attrs, opts = launch
    named = {fn.arg_names[k[0]]: v for k, v in consts.items()}
    shown = {k: v for k, v in named.items()  # the flags that are on, and the sizes that are not 1 (no asm text)
             if k.isupper() and v is not False and v is not None and (v is True or v != 1 or k in ("M", "BLOCK_M"))
             and not isinstance(v, str)}
    return f"{fn.__name__} num_warps={opts.num_warps} {shown}"


def inspect(cubin: bytes) -> tuple:
    """(resources, loops, SASS) of a kernel's cubin: {"REG", "STACK", "LOCAL", "SHARED": ...} from cuobjdump
    -res-usage (spilled registers live in the STACK frame), its innermost loops (see loops) and nvdisasm's text."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = (subprocess.run([os.path.join(TOOLS, tool), *flags, f.name], capture_output=True, text=True,
                                      check=True).stdout
                       for tool, flags in (("cuobjdump", ["-res-usage"]), ("nvdisasm", ["-c"])))
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage)}, loops(sass), sass


def innermost_loops(code: list, labels: dict) -> list:
    """[(first index, last index, label)] of the innermost loops of instruction texts `code` (labels: label -> the
    index of its first instruction): a backward branch to a label with no other such loop inside, not the
    branch-to-itself after the exit."""
    spans = []
    for i, ins in enumerate(code):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            spans.append((labels[m.group(1)], i, m.group(1)))
    return [(lo, hi, label) for lo, hi, label in spans
            if hi > lo and not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2, _ in spans)]


def control_bits(hex_sass: str) -> tuple:
    """The instructions of `nvdisasm -hex` output with their control bits (sm_70 and later: the high word's bits
    41-63): ([(opcode text, stall cycles, write scoreboard or None, read scoreboard or None, waited scoreboards)],
    {label: index of the instruction it marks})."""
    code, labels, lines = [], {}, hex_sass.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(code)
            continue
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?)\s*;\s*/\* 0x[0-9a-f]{16} \*/", line)
        if m and i + 1 < len(lines):
            c = int(re.search(r"0x([0-9a-f]{16})", lines[i + 1]).group(1), 16) >> 41
            wb, rb = c >> 5 & 7, c >> 8 & 7
            code.append((m.group(1), c & 15, None if wb == 7 else wb, None if rb == 7 else rb,
                         tuple(b for b in range(6) if c >> 11 >> b & 1)))
    return code, labels


def stream_waits(cubin: bytes) -> list:
    """Of each innermost loop (a backward branch with no other inside), how its global loads are waited for:
    {"label", "instructions", "stalls" (static stall cycles, a warp's issue time at the least), "loads" (scoreboard
    -> LDG count), "waits" (scoreboards the loop waits on)}. A loop whose wait is on its own loads' one scoreboard
    waits for all of them, those just issued included (docs/perf-notes.md, session 47)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", "-hex", f.name], capture_output=True,
                              text=True, check=True).stdout
    code, labels = control_bits(text)
    out = []
    for lo, hi, label in innermost_loops([b[0] for b in code], labels):
        body = code[lo:hi + 1]
        loads = collections.Counter(wb for ins, _, wb, _, _ in body if re.search(r"\bLDG\.", ins))
        out.append({"label": label, "instructions": len(body), "stalls": sum(b[1] for b in body),
                    "loads": dict(loads), "waits": sorted({w for b in body for w in b[4]})})
    return out


def loops(sass: str) -> list:
    """Innermost loops of nvdisasm's SASS (a backward branch to a label, with no other such loop inside; not the
    branch-to-itself after the exit): [(first label, instruction count, Counter of opcodes)]."""
    code, labels = [], {}  # instructions, and label -> index of its first instruction
    for line in sass.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(code)
        elif re.search(r"/\*[0-9a-f]{4}\*/", line):
            code.append(line.split("*/", 1)[1].strip().rstrip(" ;"))
    out = []
    for lo, hi, label in innermost_loops(code, labels):
        ops = collections.Counter(re.sub(r"^@!?U?P[T\d]+\s+", "", s).split()[0] for s in code[lo:hi + 1])
        out.append((label, hi + 1 - lo, ops))
    return out


def nvrtc_report(name: str, dtype: torch.dtype, quant: Optional[str], sparse: bool, rows: Optional[int]) -> int:
    """Each projection of `name` as kernels/cuda_gemv.py builds it for an sm_90 GPU of 132 SMs: registers, shared
    memory, and per stream loop its static stall cycles and how it waits for its loads (stream_waits)."""
    if nvrtc.find_nvrtc() is None:
        raise UserError("--nvrtc needs libnvrtc (the nvidia-cuda-nvrtc wheel torch's CUDA builds bring)")
    if quant not in (None, "int8", "int4"):
        raise UserError(f"--nvrtc takes 16-bit, int8 or int4 (RTN) weights, not --quant {quant}")
    lib = ctypes.CDLL(nvrtc.find_nvrtc())
    group = 128 if quant == "int4" else 0
    for proj, (K, sizes, _) in projection_shapes(ModelArgs(**CONFIGS[name])).items():
        r = projection_roles(proj)
        cfg = cuda_gemv.default_config(K, sizes, 132, 9, quant == "int8", group)
        cfg = cfg._replace(rows=rows or cfg.rows)
        spec = cuda_gemv.spec_of(K, sizes, dtype, sparse, r.norm, r.glu_in, r.residual, 1e-5, cfg, True,
                                 quant == "int8", group=group)
        cubin = nvrtc.compile_cubin(lib, cuda_gemv.kernel_source(spec), "sm_90")
        res, _, _ = inspect(cubin)
        print(f"{proj} {tuple(cfg)}: registers {res.get('REG')}, stack frame (spills) {res.get('STACK')} bytes, "
              f"shared {res.get('SHARED')} bytes")
        for w in stream_waits(cubin):
            shared = [sb for sb in w["loads"] if sb in w["waits"]]
            how = (f"{sum(w['loads'].values())} loads on scoreboard(s) {sorted(w['loads'])}"
                   + (f", waited on in the loop ({sorted(shared)}): each wait covers every load on it" if shared
                      else ""))
            print(f"  loop at {w['label']}: {w['instructions']} instructions, {w['stalls']} stall cycles; {how}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help=f"one of {', '.join(CONFIGS)}")
    p.add_argument("--quant", choices=sorted(QUANT_FORMATS), default=None,
                   help="quantized weights of the sparse linears (default: 16-bit, --dtype)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="activation (and 16-bit weight) dtype")
    p.add_argument("--batch", type=int, default=1, help="decode batch size, 1..8")
    p.add_argument("--dense", action="store_true", help="the dense step (generate.py --sparsity 0) instead")
    p.add_argument("--top", type=int, default=8, help="opcodes shown per loop")
    p.add_argument("--sass", metavar="KERNEL", help="also print the whole SASS of this kernel's launches "
                   "(e.g. _decode_attention_kernel)")
    p.add_argument("--nvrtc", action="store_true", help="instead: the batch-1 projections sm_90 runs on "
                   "kernels/cuda_gemv.py (NVRTC, default configs), with how each stream loop waits for its loads")
    p.add_argument("--rows", type=int, default=None, help="with --nvrtc: rows in flight per thread (int4: steps)")
    a = p.parse_args()
    if a.model not in CONFIGS:
        raise UserError(f"unknown model {a.model!r}; choose one of {', '.join(CONFIGS)}")
    if not 1 <= a.batch <= 8:
        raise UserError(f"--batch must lie in 1..8 (the kernels' batch sizes), got {a.batch}")
    if a.nvrtc:
        return nvrtc_report(a.model, DTYPES[a.dtype], a.quant, not a.dense, a.rows)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("unset TRITON_INTERPRET: the interpreter builds nothing")
    triton.runtime.driver.set_active(HopperTarget())
    built = build_all(decode_step_launches(a.model, DTYPES[a.dtype], a.quant, batches=(a.batch,),
                                           sparse_froms=(None if a.dense else 0,)))
    for launch, k, error in built:
        if error:
            print(error)
            continue
        r, found, sass = inspect(k.asm["cubin"])
        print(f"{describe(launch)}\n  registers {r.get('REG')}, stack frame (spills) {r.get('STACK')} bytes, "
              f"local {r.get('LOCAL')} bytes, shared {r.get('SHARED')} bytes")
        for label, n, ops in found:
            print(f"  loop at {label}: {n} instructions: "
                  + ", ".join(f"{op} {c}" for op, c in ops.most_common(a.top)))
        if launch[0].__name__ == a.sass:
            print(sass)
    return 1 if any(e for _, _, e in built) else 0

if __name__ == "__main__":
    sys.exit(run_cli(main))
