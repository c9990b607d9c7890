"""Activation statistics and thresholds: capture the inputs of every sparse projection, set thresholds
in the model's buffers, measure the sparsity a forward pass actually gets."""
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

from model import RowSparseUp, SparseLinear, Transformer

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@contextmanager
def input_hooks(model: Transformer, fn):
    """Calls fn(module, a) during forward passes with the quantity each sparse module thresholds:
    a = x [B, S, K] for a SparseLinear, a = silu(gate) [B, S, I] for the CATS up projection."""
    def pre(mod, args):
        fn(mod, args[0] if isinstance(mod, SparseLinear) else torch.nn.functional.silu(args[1].float()))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, (SparseLinear, RowSparseUp))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ensure_cache(model: Transformer, batch: int, length: int):
    if model.max_batch_size < batch or model.max_seq_len < length:
        model.setup_caches(max(batch, model.max_batch_size), max(length, model.max_seq_len))


@torch.no_grad()
def capture_inputs(model: Transformer, idx: Tensor) -> dict:
    """Dense forward over idx [B, T]; returns {module: |a| [B*T, K] float32} (see input_hooks)."""
    out = {}

    def grab(mod, a):
        a = a.detach().float().abs()
        out[mod] = a.reshape(-1, a.shape[-1])

    ensure_cache(model, *idx.shape)
    with input_hooks(model, grab):
        model(idx, torch.arange(idx.shape[1], device=idx.device), sparse_from=None)
    return out


def quantile(a: Tensor, q: float) -> Tensor:
    """q-quantile of all entries of a (no size limit, unlike torch.quantile)."""
    flat = a.flatten()
    k = min(max(int(round(q * (flat.numel() - 1))), 0), flat.numel() - 1)
    return flat.kthvalue(k + 1).values


@torch.no_grad()
def set_uniform_thresholds(model: Transformer, captured: dict, sparsity: float):
    """Every projection gets the scalar threshold that zeroes `sparsity` of its captured inputs."""
    for mod, a in captured.items():
        mod.threshold.fill_(quantile(a, sparsity).item() if sparsity > 0 else 0.0)


@torch.no_grad()
def measure_sparsity(model: Transformer, idx: Tensor, sparse_from: Optional[int] = 0, start: int = 0) -> dict:
    """Forward over idx [B, T] with thresholds applied from position sparse_from; returns
    {(layer, projection): fraction of inputs zeroed} over positions >= start."""
    owner = {}
    for layer, name, mod, row in model.sparse_modules():
        owner.setdefault(mod, []).append((layer, name, row))
    stats = {}

    def count(mod, a):
        a = a.detach()[:, start:].float().abs()
        for layer, name, row in owner.get(mod, []):
            stats[(layer, name)] = (a <= mod.threshold[row]).float().mean().item()

    ensure_cache(model, *idx.shape)
    with input_hooks(model, count):
        model(idx, torch.arange(idx.shape[1], device=idx.device), sparse_from=sparse_from)
    return stats


def parameter_weighted(model: Transformer, stats: dict) -> float:
    """Model-wide sparsity: each projection's sparsity weighted by its parameter count."""
    shapes = model.args.linear_shapes()
    num = sum(s * shapes[name][0] * shapes[name][1] for (_, name), s in stats.items())
    den = sum(shapes[name][0] * shapes[name][1] for (_, name), _ in stats.items())
    return num / den if den else 0.0


def per_projection(stats: dict) -> dict:
    """{projection: mean sparsity over layers}."""
    out = {}
    for (_, name), s in stats.items():
        out.setdefault(name, []).append(s)
    return {name: sum(v) / len(v) for name, v in out.items()}
