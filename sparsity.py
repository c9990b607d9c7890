"""Activation statistics and thresholds: capture the inputs of every sparse projection, set thresholds
in the model's buffers, measure the sparsity a forward pass actually gets."""
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import Tensor

from errors import UserError
from model import SparseLinear, Transformer

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@contextmanager
def input_hooks(model: Transformer, fn):
    """Calls fn(module, a) during forward passes with the quantity each sparse module thresholds:
    a = x [B, S, K] for a SparseLinear, a = silu(gate) [B, S, I] for the CATS up projection. The deferred
    split-K reduction and the fused MLP never materialise q/k/v's output or the down projection's input, so the
    model runs its plan's materialised() variant while the hooks are installed (the same values)."""
    def pre(mod, args, kwargs):
        if isinstance(mod, SparseLinear):
            x, norm = args[0], kwargs.get("norm")
            fn(mod, x if norm is None else norm(x))  # the projection's actual (normalised) input
        else:
            fn(mod, torch.nn.functional.silu(args[1].float()))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True)
               for m in {mod: None for _, _, mod, _ in model.sparse_modules()}]  # not the (int8) LM head
    plan = model.plan
    model.plan = plan.materialised()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.plan = plan


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


def owners(model: Transformer) -> dict:
    """{module: [(layer, projection, threshold row), ...]} from model.sparse_modules()."""
    out = {}
    for layer, name, mod, row in model.sparse_modules():
        out.setdefault(mod, []).append((layer, name, row))
    return out


class SparsityCounter:
    """Counts, over forward passes run inside `with counter.counting(start)`, the share of each projection's
    inputs at or below its threshold (positions >= start)."""

    def __init__(self, model: Transformer):
        self.model, self.owner, self.zeros = model, owners(model), {}

    @contextmanager
    def counting(self, start: int = 0):
        def count(mod, a):
            a = a.detach()[:, start:].float().abs()
            for layer, name, row in self.owner.get(mod, []):
                z = self.zeros.setdefault((layer, name), [0.0, 0])
                z[0] += (a <= mod.threshold[row]).sum().item()
                z[1] += a.numel()

        with input_hooks(self.model, count):
            yield

    def stats(self) -> dict:
        """{(layer, projection): fraction of inputs zeroed} (over all ranks of a tensor-parallel model: o's and
        down's inputs are split among them)."""
        zeros = self.zeros
        if self.model.tp is not None:
            keys = sorted(zeros)
            summed = self.model.tp.sum_values([v for k in keys for v in zeros[k]])
            zeros = {k: summed[2 * i: 2 * i + 2] for i, k in enumerate(keys)}
        return {k: z / n for k, (z, n) in zeros.items() if n}


@torch.no_grad()
def measure_sparsity(model: Transformer, idx: Tensor, sparse_from: Optional[int] = 0, start: int = 0) -> dict:
    """Forward over idx [B, T] with thresholds applied from position sparse_from; returns
    {(layer, projection): fraction of inputs zeroed} over positions >= start."""
    counter = SparsityCounter(model)
    ensure_cache(model, *idx.shape)
    with counter.counting(start):
        model(idx, torch.arange(idx.shape[1], device=idx.device), sparse_from=sparse_from)
    return counter.stats()


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


# ---- calibration tables (written by calibrate.py into CKPT/sparsity.safetensors) ----
CALIB_FILE = "sparsity.safetensors"
CALIB_FORMAT = "teal-sparsity-1"
LEVELS = torch.linspace(0, 1, 401, dtype=torch.float64)  # quantile grid: 0.25% steps
TARGETS = torch.linspace(0, 0.9, 19, dtype=torch.float64)  # model-level targets of the greedy tables
CRITERIA = ("magnitude", "weight-aware")
DEFAULT_CRITERION = "magnitude"  # with the greedy allocation it loses less than weight-aware on both held-out texts
METHODS = ("uniform", "greedy")


def crit_key(criterion: str) -> str:
    return criterion.replace("-", "_")


def param_fractions(args) -> Tensor:
    """[7] share of a block's linear parameters held by each projection (TEAL's weights)."""
    shapes = args.linear_shapes()
    n = torch.tensor([shapes[p][0] * shapes[p][1] for p in PROJECTIONS], dtype=torch.float64)
    return n / n.sum()


def interp_quantile(table: Tensor, level: Tensor) -> Tensor:
    """table [..., len(LEVELS)] of values at LEVELS; level [...] in [0, 1] -> values [...], interpolated in log
    space (level 0 gives 0: no input is dropped)."""
    level = level.to(torch.float64).clamp(0, 1)
    pos = level * (len(LEVELS) - 1)
    lo = pos.floor().long().clamp(max=len(LEVELS) - 2)
    frac = pos - lo
    logt = table.double().clamp_min(1e-30).log()
    a = logt.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    b = logt.gather(-1, (lo + 1).unsqueeze(-1)).squeeze(-1)
    out = (a + frac * (b - a)).exp()
    return torch.where(level > 0, out, torch.zeros_like(out))


class Calibration:
    """Quantile tables of each projection's input statistic, weight column norms and greedy allocations.

    quantiles[c]: [n_layer, 7, len(LEVELS)] values of |x| (magnitude) or |x_i|·‖W[i,:]‖ (weight-aware);
    norms[p]: [n_layer, K_p] column norms; greedy[c]: [n_layer, len(TARGETS), 7] per-projection levels;
    aimed[c] (None in files from before it): the greedy levels' lookup levels, whose thresholds drop the greedy
    levels' shares when every layer decodes sparse (calibration.aim_levels);
    cats: [n_layer, len(LEVELS)] quantiles of |silu(gate)| (CATS-style MLP)."""

    def __init__(self, tensors: dict, meta: dict):
        self.meta = meta
        self.quantiles = {c: tensors[f"quantiles.{crit_key(c)}"] for c in CRITERIA}
        # greedy tables of the criteria calibrated (calibrate.py --criteria), at least one
        self.greedy = {c: tensors[f"greedy.{crit_key(c)}"] for c in CRITERIA if f"greedy.{crit_key(c)}" in tensors}
        if not self.greedy:
            raise KeyError(f"greedy.{crit_key(DEFAULT_CRITERION)}")
        self.aimed = {c: tensors.get(f"aimed.{crit_key(c)}") for c in self.greedy}
        self.norms = {p: tensors[f"norms.{p}"] for p in PROJECTIONS}
        self.cats = tensors["quantiles.cats"]

    def tensors(self) -> dict:
        out = {f"quantiles.{crit_key(c)}": self.quantiles[c].float().contiguous() for c in CRITERIA}
        out.update({f"greedy.{crit_key(c)}": self.greedy[c].float().contiguous() for c in self.greedy})
        out.update({f"aimed.{crit_key(c)}": self.aimed[c].float().contiguous() for c in self.greedy
                    if self.aimed[c] is not None})
        out.update({f"norms.{p}": self.norms[p].float().contiguous() for p in PROJECTIONS})
        out["quantiles.cats"] = self.cats.float().contiguous()
        return out

    def levels(self, sparsity: float, method: str, criterion: str, aimed: bool = False) -> Tensor:
        """[n_layer, 7] per-projection sparsity levels for a model-wide target; aimed: the levels to look the
        thresholds up at (greedy with an aimed table; else the same levels)."""
        n_layer = self.quantiles[criterion].shape[0]
        if method == "uniform" or sparsity <= 0:
            return torch.full((n_layer, len(PROJECTIONS)), float(sparsity), dtype=torch.float64)
        if criterion not in self.greedy:
            raise UserError(f"this calibration has greedy levels for {', '.join(self.greedy)} only: use --criterion "
                            f"{next(iter(self.greedy))}, --sparsity-method uniform, or calibrate again with "
                            f"--criteria {','.join(CRITERIA)}")
        table = (self.aimed[criterion] if aimed and self.aimed[criterion] is not None
                 else self.greedy[criterion]).double()  # [L, T, 7]
        if sparsity > TARGETS[-1] + 1e-9:
            raise UserError(f"greedy tables reach {TARGETS[-1]:.2f}; use --sparsity-method uniform above that")
        pos = sparsity / (TARGETS[1] - TARGETS[0])
        i = min(int(pos), len(TARGETS) - 2)
        f = pos - i
        return table[:, i] * (1 - f) + table[:, i + 1] * f

    def thresholds(self, levels: Tensor, criterion: str) -> dict:
        """{(layer, projection): threshold vector [K] float32} for levels [n_layer, 7]."""
        return {(layer, p): t for layer in range(levels.shape[0])
                for p, t in self.layer_thresholds(layer, levels[layer], criterion).items()}

    def layer_thresholds(self, layer: int, levels: Tensor, criterion: str) -> dict:
        """{projection: threshold vector [K] float32} of one layer for levels [7]."""
        vals = interp_quantile(self.quantiles[criterion][layer], levels)  # [7]
        out = {}
        for j, p in enumerate(PROJECTIONS):
            norms = self.norms[p][layer].double()
            if criterion == "magnitude":
                t = vals[j].expand(norms.shape[0])
            else:  # |x_i|·n_i > τ  ⇔  |x_i| > τ / n_i
                t = vals[j] / norms.clamp_min(1e-30)
            out[p] = t.float()
        return out

    def cats_thresholds(self, sparsity: float) -> Tensor:
        """[n_layer] thresholds on |silu(gate)| that drop `sparsity` of the up/down rows."""
        return interp_quantile(self.cats, torch.full((self.cats.shape[0],), float(sparsity))).float()


def load_calibration(model: Transformer, path: Path) -> Calibration:
    """Reads a calibration file and checks it belongs to `model`; one clear error otherwise."""
    if not path.exists():
        raise UserError(f"{path} does not exist: run `python calibrate.py --checkpoint {path.parent}` first")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != CALIB_FORMAT:
        raise UserError(f"{path} is not a calibration file of this engine (format {meta.get('format')!r})")
    if model.fingerprint and meta.get("fingerprint") != model.fingerprint:
        raise UserError(f"{path} was calibrated for another model (fingerprint {meta.get('fingerprint', '?')[:12]}, "
                        f"this checkpoint is {model.fingerprint[:12]}): run calibrate.py again")
    try:
        calib = Calibration(tensors, meta)
    except KeyError as e:
        raise UserError(f"{path} lacks the table {e}; run calibrate.py again") from None
    a = model.args
    shapes = a.linear_shapes()
    expect = {f"norms.{p}": (a.n_layer, shapes[p][0]) for p in PROJECTIONS}
    expect.update({f"quantiles.{crit_key(c)}": (a.n_layer, len(PROJECTIONS), len(LEVELS)) for c in CRITERIA})
    expect.update({f"{t}.{crit_key(c)}": (a.n_layer, len(TARGETS), len(PROJECTIONS)) for c in calib.greedy
                   for t in ("greedy", "aimed") if t == "greedy" or f"aimed.{crit_key(c)}" in tensors})
    expect["quantiles.cats"] = (a.n_layer, len(LEVELS))
    for k, shape in expect.items():
        if tuple(tensors[k].shape) != shape:
            raise UserError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, this model needs {shape}")
    return calib


@torch.no_grad()
def apply_thresholds(model: Transformer, calib: Calibration, sparsity: float, method: str = "uniform",
                     criterion: str = "magnitude"):
    """Copies the thresholds for a model-wide sparsity into the model's buffers (no new tensors: compiled
    graphs and CUDA graphs stay valid). In a CATS model the MLP follows CATS: gate and down stay dense, up
    rows are dropped where |silu(gate)| is below its threshold."""
    if method not in METHODS or criterion not in CRITERIA:
        raise UserError(f"unknown sparsity method {method!r} or criterion {criterion!r}")
    cats = calib.cats_thresholds(sparsity) if model.mlp == "cats" else None
    apply_levels(model, calib, calib.levels(sparsity, method, criterion, aimed=True), criterion, cats)


@torch.no_grad()
def apply_levels(model: Transformer, calib: Calibration, levels: Tensor, criterion: str,
                 cats: Optional[Tensor] = None):
    """Copies the thresholds of per-projection levels [n_layer, 7] into the model's buffers; `cats`: [n_layer] up
    thresholds of a CATS MLP (gate and down then stay dense)."""
    thr = calib.thresholds(levels, criterion)
    for layer, name, mod, row in model.sparse_modules():
        t = thr[(layer, name)]
        if getattr(mod, "tp", None) is not None:  # row-parallel (tp.py): this rank's input channels
            t = t[mod.tp.part(t.shape[0])]
        if cats is not None and name in ("gate", "up", "down"):
            mod.threshold[row].fill_(cats[layer] if name == "up" else 0.0)
        else:
            set_threshold(mod, row, t)


def set_threshold(mod, row: int, t: Tensor):
    """Threshold row `row` of a sparse linear from t (a scalar or [K]) in the source model's units."""
    if mod.input_scale is not None:  # AWQ weights: the input is x / s of the source model's (awq.py)
        mod.threshold[row].copy_(torch.as_tensor(t).to(mod.threshold) / mod.input_scale)
    else:
        mod.threshold[row].copy_(t)
