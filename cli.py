"""What the command-line tools share: running a main() with one-line errors (run_cli), the help formatter, and the
flags that choose a model, its weights' quantization, its sparsity settings and the device, with their parsing.
Libraries never import this module; CLIs (generate.py, calibrate.py, quantize.py, scripts/) do."""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from calibration import ALLOC_SEQS, GREEDY_SEQS, TIE_KV, TIES
from default_model import default_checkpoint
from errors import UserError
from loading import load_model
from paths import CACHE
from kernels.formats import QUANT_FORMATS, quant_format
from sparsity import CRITERIA, DEFAULT_CRITERION, METHODS
from tokenizer import load_tokenizer

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default after its help (unless the help already says
    what the default is, or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or not action.option_strings
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def run_cli(main):
    """Call main(); a UserError (or Ctrl-C) ends the process with one line on stderr, no traceback. torch.compile's
    caches live under .cache/compile (keep_compile_caches). A torchrun rank ends through end_rank."""
    keep_compile_caches()
    try:
        out = main()
    except UserError as e:
        if os.environ.get("RANK", "0") != "0":  # under torchrun every rank meets the same error: rank 0 says it,
            time.sleep(2)  # before torchrun stops the ranks on the first exit
        else:
            print(f"error: {e}", file=sys.stderr)
        end_rank(2)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        end_rank(130)
        sys.exit(130)
    end_rank(out if isinstance(out, int) else 0)
    return out


def end_rank(code: int):
    """Under torchrun, exit now without Python's finalization: gloo's worker threads may still be dropping a finished
    collective's tensors, which takes the GIL, and a thread that meets a finalizing interpreter aborts the process
    (std::terminate, SIGABRT) after all its work was done. Outside torchrun: nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a closed reader (`| head`) or a closed stream
            pass
    os._exit(code)


def keep_compile_caches():
    """torch.compile's caches (inductor's compiled graphs and kernels, Triton's builds) under .cache/compile, so that
    a later process reuses what an earlier one compiled for the same model shape, GPU and torch version; a location
    set in the environment wins. Called before anything compiles (both are read when first used)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "compile" / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "compile" / "triton"))


def sparsity_list(text: str, flag: str, up_to_one: bool = False) -> list:
    """A flag's comma-separated sparsity levels, each in [0, 1) (or [0, 1])."""
    try:
        levels = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not levels or not all(0 <= s < 1 or (up_to_one and s == 1) for s in levels):
        raise UserError(f"{flag} levels must lie in [0, 1{']' if up_to_one else ')'}, got {text!r}")
    return levels


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None


def add_model_args(p: argparse.ArgumentParser, fast_cpu: bool = False):
    """Flags shared by the CLIs that load a model; fast_cpu: --dtype auto on a CPU is fast_cpu_dtype() (calibration
    statistics) instead of float32 (evaluations); load_from_args reads it from the parsed flags."""
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="CKPT directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    cpu = "on CPU bfloat16 with bf16 matrix units (AMX), else float32" if fast_cpu else "float32 on CPU"
    p.add_argument("--dtype", default="auto", help=f"auto (bfloat16 on GPU, {cpu}), float16, bfloat16, float32")
    p.set_defaults(fast_cpu=fast_cpu)


def add_quant_arg(p: argparse.ArgumentParser):
    p.add_argument("--quant", choices=sorted(QUANT_FORMATS), default=None,
                   help="weight-only quantization of the sparse linears (quantize.py, RTN: int8 per output "
                        "channel, int4 per group of 128 inputs) and the LM head (int8) (default: none, 16-bit)")


def add_compile_args(p: argparse.ArgumentParser):
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step and record it as a CUDA graph (default: on for CUDA, off for "
                   "CPU)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: record sparse decode steps as a CUDA graph of their eager kernel launches instead of "
                   "compiling them: ready in about a second instead of 5-10 (dense steps still compile; default: on)")
    p.add_argument("--compile-prefill", action="store_true",
                   help="also compile the prefill (shapes vary: ~30 s more at start even with warm caches on a 7B "
                   "model, for a few ms less per prompt; default: it runs eagerly)")


def add_sparsity_args(p: argparse.ArgumentParser):
    p.add_argument("--sparsity-method", choices=METHODS, default="greedy",
                   help="uniform: every projection at the target; greedy: TEAL's block-wise allocation")
    p.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                   help="magnitude: |x_i| > t; weight-aware: |x_i|·‖W[i,:]‖ > t")
    p.add_argument("--mlp", choices=("teal", "cats"), default="teal",
                   help="cats: threshold |silu(gate)| and compute only the passing rows of up (ablation)")
    p.add_argument("--sparse-prefill-from", type=int, default=None, metavar="N",
                   help="sparsify the prompt too, except its first N tokens (default: dense prefill)")


def add_calibration_args(p: argparse.ArgumentParser, tokens: int, per: str = ""):
    """The calibration flags calibrate.py and scripts/greedy_stability.py share; tokens: --tokens' default; per:
    appended to the counts' help (", per half" where each half of a text is calibrated apart)."""
    p.add_argument("--text", nargs="+", type=Path, default=None, help="calibration text files (default: Shakespeare)")
    p.add_argument("--tokens", type=int, default=tokens, help=f"tokens for the activation statistics{per}")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--skip", type=int, default=32, help="leading positions of each sequence left out (dense in decode)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--greedy-seqs", type=int, default=GREEDY_SEQS,
                   help=f"sequences the block-wise greedy search scores on{per}")
    p.add_argument("--tie-kv", action=argparse.BooleanOptionalAction, default=TIE_KV,
                   help="k and v raised together by the greedy search (--no-tie-kv: each projection alone, TEAL's)")
    p.add_argument("--greedy-every", type=int, default=1,
                   help="the greedy search scores every N-th position of its sequences (keys and values at all)")
    p.add_argument("--ties", type=float, default=TIES,
                   help="greedy candidates within this many standard errors of the best are tied; of those, the one "
                   "whose level lags its block's most is raised (0: always the best)")
    p.add_argument("--step", type=float, default=0.05, help="effective-sparsity step of the greedy search")
    p.add_argument("--max-move", type=float, default=0.1,
                   help="largest level change of one projection in one greedy step (1: step / its parameter share)")
    p.add_argument("--blocks", choices=("spread", "equal"), default="spread",
                   help="spread: each block's effective sparsity chosen for the least relative output error, their "
                   "mean the model's target; equal: every block at the target (TEAL's)")
    p.add_argument("--alloc-seqs", type=int, default=ALLOC_SEQS,
                   help=f"sequences the blocks' output errors are measured on for --blocks spread{per}")
    p.add_argument("--criteria", default=DEFAULT_CRITERION,
                   help=f"comma-separated criteria to make greedy tables for, of {', '.join(CRITERIA)} (each takes "
                   "about half the time; uniform thresholds work for both either way)")


def calibration_criteria(a) -> tuple:
    """The criteria add_calibration_args' --criteria names, once its other flags are checked to be in range."""
    criteria = tuple(c for c in CRITERIA if c in a.criteria.split(","))
    if not criteria or len(criteria) != len(a.criteria.split(",")):
        raise UserError(f"--criteria takes a comma-separated list of {', '.join(CRITERIA)}; got {a.criteria!r}")
    if a.seq_len <= a.skip or a.tokens < a.seq_len or not 0 < a.step <= 0.1 or not 0 < a.max_move <= 1 or \
            a.alloc_seqs < 1 or a.greedy_seqs < 1 or a.greedy_every < 1 or a.ties < 0:
        raise UserError("need --seq-len > --skip, --tokens >= --seq-len, 0 < --step <= 0.1, 0 < --max-move <= 1, "
                        "--alloc-seqs >= 1, --greedy-seqs >= 1, --greedy-every >= 1 and --ties >= 0")
    return criteria


def fast_cpu_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it in matrix units (AMX: ~5x float32's speed), else float32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.bfloat16 if amx is not None and amx() else torch.float32


def load_from_args(args, mlp: str = "teal", tp=None):
    """(CKPT, model, tokenizer, device) from the add_model_args (and add_quant_arg) flags; tp: this rank's slices of
    the model (tp.py), on its device."""
    device = tp.device if tp is not None else pick_device(args.device)
    cpu = fast_cpu_dtype() if getattr(args, "fast_cpu", False) else torch.float32
    auto = torch.bfloat16 if device.type == "cuda" else cpu
    dtype = auto if args.dtype == "auto" else parse_dtype(args.dtype)
    ckpt = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    model = load_model(ckpt, device, dtype, mlp=mlp, quant=quant_format(args.quant) if getattr(args, "quant", None) else None,
                       tp=tp)
    return ckpt, model, load_tokenizer(ckpt), device
