"""Probe for issue 19: is kernels/cuda_gemv.py's int4 mode slow because of its bytes' layout or because of its loop?
For each projection shape of a model, L2-cold launch µs (CUDA-graph replay over weight copies, as bench.py times
kernels) of: int4 weights on N columns (`int4_config`), int8 weights on the same N (`default_config`), and int8
weights on N / 2 columns (every segment halved) — the same bytes per row, the same 128-byte row piece a CTA reads
and the same column tiles as int4's on N — with int8's own config and with int4's split and tail. If int8 on N / 2
is as slow as int4, the layout is the cause; if it runs like int8 on N, the int4 loop is (docs/perf-notes.md,
sessions 44–46). Inputs as the decode step gives them: q/k/v and gate/up normalise theirs, o and down add the
residual, down gates gate/up's outputs. Each launch is checked first as scripts/gpu_check.py checks the kernel
(`cuda_gemv_case`). Needs an sm_90 GPU and libnvrtc.

    python scripts/probe_int4_layout.py [--model llama-2-7b] [--projections qkv,gate_up,down]
        [--sparsities 0,0.5] [--out DIR]
"""
import argparse
import json
from pathlib import Path
from typing import NamedTuple

import torch

from cli import HelpFormatter, run_cli, sparsity_list
from errors import UserError
from kernels import cuda_gemv
from kernels.formats import INT8, int4_variant
from model import ModelArgs
from scripts.bench import projection_list, projection_roles, projection_shapes
from scripts.gpu_check import checked_cuda_gemv_us, nvrtc_hopper

GROUP = 128  # int4's scale group (RTN, as --quant int4 stores it)


class Case(NamedTuple):
    label: str  # "int4", "int8", "int8 N/2", "int8 N/2, int4's split"
    proj: str
    K: int
    sizes: tuple
    int4: bool
    config: cuda_gemv.Config


def cases(args: ModelArgs, projections, n_sm: int, major: int) -> list:
    """The launches compared for each projection; a projection whose halved segments are not whole 128-column tiles
    (int8's wide tiles, 128 bytes a row piece as int4's 256 columns) gets no N / 2 cases."""
    out = []
    for proj, (K, sizes, _) in projection_shapes(args).items():
        if proj not in projections:
            continue
        c4 = cuda_gemv.int4_config(K, sizes, n_sm, major, GROUP)
        out += [Case("int4", proj, K, tuple(sizes), True, c4),
                Case("int8", proj, K, tuple(sizes), False, cuda_gemv.default_config(K, sizes, n_sm, major, True))]
        half = tuple(s // 2 for s in sizes)
        if all(s % (2 * cuda_gemv.COLS) == 0 for s in half):
            c8 = cuda_gemv.default_config(K, half, n_sm, major, True)
            out.append(Case("int8 N/2", proj, K, half, False, c8))
            same = cuda_gemv.Config(c4.split, c8.rows, c4.cluster)
            if same != c8:
                out.append(Case("int8 N/2, int4's split", proj, K, half, False, same))
    return out


def spec_of(case: Case, sparse: bool) -> cuda_gemv.Spec:
    """The launch of a case as the decode step makes it (norm on q/k/v and gate/up, residual on o and down, down
    gating gate/up's outputs; float32 thresholds)."""
    r = projection_roles(case.proj)
    return cuda_gemv.spec_of(case.K, case.sizes, torch.bfloat16, sparse, r.norm, r.glu_in, r.residual, 1e-5,
                             case.config, True, int8=not case.int4, group=GROUP if case.int4 else 0)


def time_case(case: Case, s: float) -> dict:
    """One case at sparsity s: checked, then timed (gpu_check.checked_cuda_gemv_us)."""
    K, N = case.K, sum(case.sizes)
    w32 = torch.randn(K, N, device="cuda") / K ** 0.5
    w, scale = int4_variant(GROUP).quantize_weight(w32) if case.int4 else INT8.quantize_weight(w32.to(torch.bfloat16))
    del w32
    us = checked_cuda_gemv_us(spec_of(case, s > 0), w, scale, case.sizes, s, f"{case.label} {case.proj}")
    mb = (w.numel() * w.element_size() + scale.numel() * scale.element_size()) / 1e6
    return dict(label=case.label, proj=case.proj, K=K, N=N, sizes=list(case.sizes), s=s, config=list(case.config),
                mb=mb, us=us)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="config whose projection shapes to run")
    p.add_argument("--projections", default="qkv,gate_up,down", help="comma-separated, of: qkv, o, gate_up, down")
    p.add_argument("--sparsities", default="0,0.5", help="comma-separated sparsity levels")
    p.add_argument("--out", type=Path, default=None, help="directory for probe_int4_layout.json (default: none)")
    a = p.parse_args()
    try:
        args = ModelArgs.from_name(a.model)
    except KeyError:
        raise UserError(f"unknown --model {a.model!r}") from None
    projections = projection_list(a.projections)
    levels = sparsity_list(a.sparsities, "--sparsities")
    n_sm, _ = nvrtc_hopper("probe_int4_layout.py")
    print(f"{torch.cuda.get_device_name()}, {a.model}: launch µs, L2-cold", flush=True)
    records = []
    for case in cases(args, projections, n_sm, 9):
        for s in levels:
            rec = time_case(case, s)
            records.append(rec)
            print(f"{case.proj:8s} s={s:.2f} {case.label:24s} N={rec['N']:6d} {tuple(case.config)}: "
                  f"{rec['us']:7.2f} µs for {rec['mb']:.1f} MB", flush=True)
            torch.cuda.empty_cache()
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "probe_int4_layout.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
