"""Where one decode step's time goes: every GPU kernel of a compiled step (no CUDA graphs, so the
profiler sees each launch), grouped by name, with time per step. Needs a CUDA GPU.

    python scripts/profile_decode.py [--config llama-2-7b] [--sparsity 0.5] [--layers N]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from loading import random_model
from plan import decode_plan
from model import ModelArgs
from sparsity import capture_inputs, set_uniform_thresholds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="llama-2-7b", help="model config of the random-weight model")
    p.add_argument("--sparsity", type=float, default=0.5, help="uniform sparsity level of every projection")
    p.add_argument("--layers", type=int, default=0, help="layers of the model; 0: all of the config's layers")
    p.add_argument("--steps", type=int, default=10, help="profiled decode steps")
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
    model.set_plan(decode_plan(torch.device("cuda"), sparsity=a.sparsity))
    prompt = torch.randint(0, args.vocab_size, (1, 128), device="cuda")
    set_uniform_thresholds(model, capture_inputs(model, prompt), a.sparsity)
    model.setup_caches(1, 384)
    model(prompt, torch.arange(128, device="cuda"), sparse_from=None)
    step = torch.compile(lambda t, pos: model(t, pos).argmax(-1), fullgraph=True)
    tok = prompt[:, -1:]
    for i in range(3):
        tok = step(tok, torch.tensor([128 + i], device="cuda"))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(a.steps):
            tok = step(tok, torch.tensor([131 + i], device="cuda"))
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name, [0, 0.0])
            r[0] += 1
            r[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(r[1] for r in rows.values()) / a.steps
    print(f"{a.config} ({args.n_layer} layers) sparsity {a.sparsity}: GPU busy {total:.0f} us per step")
    print(f"{'kernel':70s} {'per step':>8s} {'us/step':>9s} {'us each':>8s}")
    for name, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:70]:70s} {n / a.steps:8.1f} {us / a.steps:9.1f} {us / n:8.2f}")


if __name__ == "__main__":
    run_cli(main)
