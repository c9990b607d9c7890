"""Probe for issue 19: kernels/cuda_gemv.py's stream (16-bit, int8 or int4 weights) through cp.async stages
(`Config.stages`) against its register ring (the default), per projection shape of a model: L2-cold launch µs (CUDA-graph replay over
weight copies, as bench.py times kernels), each launch checked first as scripts/gpu_check.py checks the kernel
(`cuda_gemv_case`). The ring's loads share one scoreboard, so a warp waits for the rows it has just issued
(docs/perf-notes.md, session 47; `scripts/sm90.py --nvrtc` shows it); commit groups wait on the oldest only.
Needs an sm_90 GPU and libnvrtc.

    python scripts/probe_nvrtc_stages.py [--model llama-2-7b] [--projections qkv,o,gate_up,down]
        [--weights bf16,int8,int4] [--variants default,4x3,2x4,4x4] [--sparsities 0,0.5] [--out DIR]

A variant RxS streams R rows a thread a group (int4: R steps of 16 rows a warp, e.g. 1x3), S stages (S - 1 groups in
flight); "default" is the default config (its rows through registers). int4 weights are RTN in scale groups of 128. Variants whose shared memory does not fit a CTA are skipped, and said so.
"""
import argparse
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from kernels import cuda_gemv
from model import ModelArgs
from scripts.bench import projection_list, projection_roles, projection_shapes
from scripts.gpu_check import checked_cuda_gemv_us, nvrtc_hopper, probe_weights

GROUP = 128  # int4's scale group (RTN, as --quant int4 stores it)


class Case(NamedTuple):
    proj: str
    K: int
    sizes: tuple
    weights: str  # bf16, int8, int4
    config: cuda_gemv.Config


def parse_variants(text: str) -> list:
    """"default,4x3" -> [None, (4, 3)]: None the default config, (rows, stages) otherwise."""
    out = []
    for v in (t for t in text.split(",") if t):
        m = re.fullmatch(r"(\d+)x(\d+)", v)
        if v != "default" and not (m and int(m.group(1)) > 0 and int(m.group(2)) >= 2):
            raise UserError(f"--variants takes 'default' or ROWSxSTAGES (stages >= 2), got {v!r}")
        out.append(None if v == "default" else (int(m.group(1)), int(m.group(2))))
    if not out:
        raise UserError("--variants is empty")
    return out


def spec_of(case: Case, sparse: bool) -> cuda_gemv.Spec:
    """The launch of a case as the decode step makes it (float32 thresholds, the projection's fused roles)."""
    r = projection_roles(case.proj)
    return cuda_gemv.spec_of(case.K, case.sizes, torch.bfloat16, sparse, r.norm, r.glu_in, r.residual, 1e-5,
                             case.config, True, case.weights == "int8", group=GROUP if case.weights == "int4" else 0)


def cases(args: ModelArgs, projections, weights, variants, n_sm: int) -> tuple:
    """(the cases, the skipped variants as lines): each projection, weight kind and variant whose shared memory
    fits a CTA (dense or sparse: the sparse launch's kept list is the larger)."""
    out, skipped = [], []
    for proj, (K, sizes, _) in projection_shapes(args).items():
        if proj not in projections:
            continue
        for kind in weights:
            base = cuda_gemv.default_config(K, sizes, n_sm, 9, kind == "int8", GROUP if kind == "int4" else 0)
            for v in variants:
                case = Case(proj, K, tuple(sizes), kind, base if v is None else base._replace(rows=v[0], stages=v[1]))
                if v and cuda_gemv.shared_bytes(spec_of(case, True)) > cuda_gemv.STATIC_SMEM:
                    skipped.append(f"{proj} {kind} {v[0]}x{v[1]}: "
                                   f"{cuda_gemv.shared_bytes(spec_of(case, True))} bytes of shared memory")
                    continue
                out.append(case)
    return out, skipped


def time_case(case: Case, s: float) -> dict:
    """One case at sparsity s: checked, then timed (gpu_check.checked_cuda_gemv_us)."""
    K, N = case.K, sum(case.sizes)
    w, scale = probe_weights(K, N, case.weights, GROUP)
    us = checked_cuda_gemv_us(spec_of(case, s > 0), w, scale, case.sizes, s, f"{case.proj} {tuple(case.config)}")
    return dict(proj=case.proj, weights=case.weights, K=K, N=N, s=s, config=list(case.config), us=us)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="config whose projection shapes to run")
    p.add_argument("--projections", default="qkv,o,gate_up,down", help="comma-separated, of: qkv, o, gate_up, down")
    p.add_argument("--weights", default="bf16,int8", help="comma-separated, of: bf16, int8, int4")
    p.add_argument("--variants", default="default,4x3,2x4,4x4", help="comma-separated: default, ROWSxSTAGES")
    p.add_argument("--sparsities", default="0,0.5", help="comma-separated sparsity levels")
    p.add_argument("--out", type=Path, default=None, help="directory for probe_nvrtc_stages.json (default: none)")
    a = p.parse_args()
    try:
        args = ModelArgs.from_name(a.model)
    except KeyError:
        raise UserError(f"unknown --model {a.model!r}") from None
    projections = projection_list(a.projections)
    weights = [q for q in a.weights.split(",") if q]
    if not weights or not set(weights) <= {"bf16", "int8", "int4"}:
        raise UserError(f"--weights takes bf16, int8, int4, got {a.weights!r}")
    variants = parse_variants(a.variants)
    levels = sparsity_list(a.sparsities, "--sparsities")
    n_sm, _ = nvrtc_hopper("probe_nvrtc_stages.py")
    todo, skipped = cases(args, projections, weights, variants, n_sm)
    print(f"{torch.cuda.get_device_name()}, {a.model}: launch µs, L2-cold", flush=True)
    for line in skipped:
        print(f"skipped {line}", flush=True)
    records = []
    for case in todo:
        for s in levels:
            rec = time_case(case, s)
            records.append(rec)
            print(f"{case.proj:8s} {rec['weights']} s={s:.2f} {tuple(case.config)}: {rec['us']:7.2f} µs", flush=True)
            torch.cuda.empty_cache()
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "probe_nvrtc_stages.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
