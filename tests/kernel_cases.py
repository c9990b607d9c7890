"""Shared cases and helpers of the kernel tests (tests/test_sparse_gemv.py, test_sparse_mlp.py,
test_decode_attention.py, test_gate_up_rows.py): odd sizes, thresholds, poisoned outputs, launch configs, and the
sweep grids whose every combination but a few quick ones is marked slow."""
import itertools

import pytest
import torch

from kernels import configs
from kernels.formats import FLOAT, INT8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the GLU epilogue rounds four times where the reference rounds (and the interpreter truncates)
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
C = configs.Config


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def thresholds_for(x, n_seg, sparsity, per_channel):
    """[n_seg, K] float32 thresholds giving about `sparsity` zeros on x, different per segment."""
    K = x.shape[-1]
    a = x.abs().float().reshape(-1, K)
    if sparsity == 0:
        return torch.zeros(n_seg, K, device=x.device)
    if per_channel:  # a per-input-channel vector, as the weight-aware criterion produces
        base = torch.quantile(a, sparsity, dim=0) if a.shape[0] > 1 else a[0] * sparsity
        scale = torch.rand(n_seg, K, device=x.device) * 0.4 + 0.8
        return (base * scale).contiguous()
    levels = torch.linspace(sparsity * 0.9, sparsity, n_seg).tolist()
    return torch.stack([torch.quantile(a.flatten(), s).expand(K) for s in levels]).contiguous()


def halfway_thresholds(a, sparsity):
    """[1, K] thresholds giving about `sparsity` zeros on a [1, K], each halfway between two of its values: a
    rounding difference between kernel and reference then never flips an input across its threshold."""
    v = a.abs().float().flatten().sort().values
    i = max(1, int(sparsity * v.numel()))
    return torch.full((1, a.shape[-1]), float((v[i - 1] + v[i]) / 2) if sparsity else 0.0, device=a.device)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


CASES = {  # name: (K, sizes, glu, residual)
    "qkv": (100, (48, 20, 20), False, False),
    "o+residual": (72, (37,), False, True),
    "gate_up": (90, (33, 33), True, False),
    "down+residual": (131, (45,), False, True),
    "qkv-even": (80, (64, 32, 32), False, False),  # segments multiples of BLOCK_N: the unmasked-column path
    "gate_up-even": (96, (32, 32), True, False),
}

INT4_CASES = {  # name: (K, sizes, glu, residual): sizes whole int32 words (multiples of 8), K whole groups
    "qkv": (96, (48, 24, 24), False, False),
    "o+residual": (64, (40,), False, True),
    "gate_up": (96, (48, 48), True, False),
    "down+residual": (160, (56,), False, True),
}


def configs_for(M, K, sizes, glu, fmt=FLOAT):
    # batch 1: one program per column tile, split-K with a K range of several chunks, one warp (the list
    # compaction then spans several passes of the warp), the masked stream, and the default (int8 weights have
    # their own)
    fma = [C(16, 16, 1, 4, 1, 0), C(16, 32, 3, 4, 1, 0), C(32, 16, 2, 1, 1, 0)] if M == 1 else []
    if M == 1:  # rows in order with masked loads instead of a list (16/8-bit)
        fma.append(C(16, 32, 2, 4, 1, 0, 1))
    if fmt is INT8 and M == 1:  # what Llama-2-7B's int8 o and gate/up launch with on an H100 (128-row groups for o)
        fma += [configs.default_config(1, 4096, (4096,), False, fmt=INT8),
                configs.default_config(1, 4096, (11008, 11008), True, fmt=INT8)]
    return fma + [C(16, 16, 1, 4, 1, 1), C(32, 32, 4, 4, 2, 1),
                  configs.default_config(M, K, sizes, glu, n_sm=4, fmt=fmt)]


def _id(v) -> str:
    return DTYPE_IDS.get(v, str(v))


def pairwise(*axes, quick=()):
    """Like grid, but only enough combinations that every pair of values of any two axes meets in one of them
    (all-pairs testing; the quick ones first): a kernel's failures come from one value or a pair far more often
    than from a triple, and the interpreter costs seconds per case."""
    combos = list(itertools.product(*axes))
    pairs = lambda c: {(i, c[i], j, c[j]) for i in range(len(c)) for j in range(i + 1, len(c))}
    chosen = list(dict.fromkeys(tuple(q) for q in quick))
    todo = set().union(*(pairs(c) for c in combos)) - set().union(set(), *(pairs(c) for c in chosen))
    while todo:
        best = max(combos, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    keep = set(chosen)
    return [p for p in grid(*axes, quick=quick) if tuple(p.values) in keep]


def grid(*axes, quick=()):
    """pytest.param of every combination of the axes' values (in the order of the argnames), each marked slow
    except the combinations listed in `quick` (the quick loop, `-m "not slow"`, runs those)."""
    quick = {tuple(q) for q in quick}
    for q in quick:
        assert all(v in axis for v, axis in zip(q, axes)) and len(q) == len(axes), f"{q} is not in the grid"
    return [pytest.param(*combo, id="-".join(map(_id, combo)), marks=() if combo in quick else pytest.mark.slow)
            for combo in itertools.product(*axes)]
