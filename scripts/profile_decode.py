"""Where one decode step's time goes: every GPU kernel of a compiled step (no CUDA graphs, so the
profiler sees each launch), grouped by name, with time per step. Needs a CUDA GPU.

    python scripts/profile_decode.py [--config llama-2-7b] [--sparsity 0.5] [--layers N] [--quant int8|int4] [--no-nvrtc-sparse]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from cli import HelpFormatter, add_quant_arg, run_cli, sparsity_list
from engine import compile_step
from errors import UserError
from loading import random_model
from plan import decode_plan
from model import ModelArgs
from kernels.formats import quant_format
from quantization import quantize_model
from sparsity import capture_inputs, set_uniform_thresholds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="llama-2-7b", help="model config of the random-weight model")
    p.add_argument("--sparsity", type=float, default=0.5, help="uniform sparsity level of every projection")
    p.add_argument("--layers", type=int, default=0, help="layers of the model; 0: all of the config's layers")
    p.add_argument("--steps", type=int, default=10, help="profiled decode steps")
    p.add_argument("--nvrtc-sparse", action=argparse.BooleanOptionalAction, default=None,
                   help="sparse batch-1 16-bit projections on kernels/cuda_gemv.py (NVRTC; default: where dense "
                   "ones are, sm_90)")
    add_quant_arg(p)
    a = p.parse_args()
    args = ModelArgs.from_name(a.config)
    sparsity_list(str(a.sparsity), "--sparsity")
    if a.layers < 0 or a.steps < 1:
        raise UserError("--layers must be >= 0 and --steps >= 1")
    if not torch.cuda.is_available():
        raise UserError("profile_decode.py needs a CUDA GPU")
    if a.layers:
        args.n_layer = a.layers
    model = random_model(args, "cuda", torch.bfloat16)
    fmt = quant_format(a.quant)
    if fmt.quantized:
        quantize_model(model, fmt)
    model.set_plan(decode_plan(torch.device("cuda"), fmt, sparsity=a.sparsity,
                               nvrtc_sparse=a.nvrtc_sparse))
    prompt = torch.randint(0, args.vocab_size, (1, 128), device="cuda")
    set_uniform_thresholds(model, capture_inputs(model, prompt), a.sparsity)
    model.setup_caches(1, 384)
    model(prompt, torch.arange(128, device="cuda"), sparse_from=None)
    step = compile_step(lambda t, pos: model(t, pos).argmax(-1))
    tok = prompt[:, -1:]
    for i in range(3):
        tok = step(tok, torch.tensor([128 + i], device="cuda"))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(a.steps):
            tok = step(tok, torch.tensor([131 + i], device="cuda"))
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    rows = {}
    for e in events:
        r = rows.setdefault(e.name, [])
        r.append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    total = sum(sum(r) for r in rows.values()) / a.steps
    print(f"{a.config} ({args.n_layer} layers) sparsity {a.sparsity}: GPU busy {total:.0f} us per step")
    print(f"{'kernel':70s} {'per step':>8s} {'us/step':>9s} {'us each':>8s}")
    for name, us in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name[:70]:70s} {len(us) / a.steps:8.1f} {sum(us) / a.steps:9.1f} {sum(us) / len(us):8.2f}")
        for slot, t in launch_slots(us, a.steps, args.n_layer):
            print(f"  {slot:68s} {len(t) / a.steps:8.1f} {sum(t) / a.steps:9.1f} {sum(t) / len(t):8.2f}")


def launch_slots(times: list, steps: int, n_layer: int) -> list:
    """A kernel's launch times in step order, split by the launch's place in its layer: ("layer launch j", times)
    for each of the kernel's launches per layer, and ("after the layers", times) for one launch per step beyond
    them (the LM head); [] when the kernel runs once per layer or less."""
    per_step = len(times) // steps
    per_layer, extra = divmod(per_step, n_layer)
    if per_layer < 2 and not (per_layer and extra) or extra > 1 or len(times) != per_step * steps:
        return []
    in_step = [times[i * per_step:(i + 1) * per_step] for i in range(steps)]
    slots = [(f"layer launch {j}", [t for s in in_step for t in s[j:per_layer * n_layer:per_layer]])
             for j in range(per_layer)]
    return slots + ([("after the layers", [s[-1] for s in in_step])] if extra else [])

if __name__ == "__main__":
    run_cli(main)
