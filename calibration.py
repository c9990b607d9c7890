"""TEAL activation-sparsity calibration (the CLI is calibrate.py, which writes CKPT/sparsity.safetensors):

1. collect: a dense pass over calibration text histograms, per layer and projection, |x| of the projection's input
   (q, k, v share the attention input; gate, up the MLP input) and the weight-aware score |x_i|·‖W[i,:]‖, plus
   |silu(gate)| for the CATS-style MLP, on bins of 1/256 of an octave, fine enough to set any sparsity level to
   well within ±0.5%; hist_quantiles turns them into the stored quantile tables, with the weights' column norms.
2. greedy_block: block-wise greedy allocation (TEAL): per block, starting from 0, each step raises the block's
   effective sparsity (the parameter-weighted mean of its projections' levels) by `step` through one projection
   (or k and v together: KV_TIED), the one whose increase adds the least L2 error to the block output on the
   later tokens of each sequence (the block is fed its dense input; BlockProbe, which scores every
   `greedy_every`-th position: more sequences for the same work); candidates within `ties` standard errors of the
   best (paired over the sequences) count as tied, and the tied one whose level lags the block's most is taken.
   The table at model-level targets 0 ... 0.9 keeps, per block, whichever of the greedy and the uniform
   allocation has less error there.
   spread_over_blocks then sets the blocks' own effective sparsities for each model target (their mean the
   target): water-filling on each block's output error relative to its output's energy, at its table's rows.
3. aim_levels: the greedy tables re-aimed so that decoding measures what they intend: a decode-like pass per target
   (every layer sparsified) moves each projection's lookup level by the share it missed (stored beside the
   greedy tables, which keep the levels meant).
"""
import math
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import write_safetensors
from errors import UserError
from kernels import reference
from kernels.decode_attention import apply_rope
from model import attention_mask, rope_table
from plan import REFERENCE
from sparsity import (CALIB_FORMAT, CRITERIA, LEVELS, PROJECTIONS, TARGETS, Calibration, SparsityCounter, apply_levels,
                      crit_key, input_hooks, owners, param_fractions, set_threshold)

# bins of |x| in float32: the exponent and the top MANT_BITS bits of the mantissa of each value, i.e. 256 equal bins
# per octave (0.2-0.4% wide in value), from 2^LOG2_LO (smaller values and zeros: the first bin) to 2^LOG2_HI (larger:
# the last). A bin index is a shift of the float's bits, so a histogram is one bincount (6x faster than histc of log2).
MANT_BITS, LOG2_LO, LOG2_HI = 8, -40, 16
TIES = 0.0  # the greedy search's default tie band, in standard errors (greedy_block; 0: none)
# the greedy search's defaults: 8 scored sequences and k, v raised together are more stable between calibration
# texts than TEAL's 2 sequences and every projection alone, at the same float quality over draws and better AWQ
# quality (docs/quality-notes.md, sessions 28, 30 and 31)
GREEDY_SEQS = 8
ALLOC_SEQS = 8  # sequences whose block errors spread the sparsity over blocks
AIM_SEQS = 8  # sequences the greedy levels are re-aimed on, in decode-like passes
TIE_KV = True
# what one greedy candidate raises: every projection alone (TEAL's), or k and v together (the default): they share
# the input and hold a few percent of a GQA block each, so their single moves barely change the block's error, and
# which of the two goes first is decided by noise (docs/quality-notes.md, session 28)
ALONE = tuple((j,) for j in range(len(PROJECTIONS)))
KV_TIED = tuple(g for g in ALONE if PROJECTIONS[g[0]] not in ("k", "v")) + \
    ((PROJECTIONS.index("k"), PROJECTIONS.index("v")),)
N_BINS = (LOG2_HI - LOG2_LO) << MANT_BITS
_FIRST = (127 + LOG2_LO) << MANT_BITS  # the biased-exponent-and-mantissa prefix of 2^LOG2_LO


def value_hist(v: torch.Tensor) -> torch.Tensor:
    """counts [N_BINS] float64 (on the CPU) of the values of v >= 0."""
    bins = (v.float().contiguous().view(torch.int32) >> (23 - MANT_BITS)) - _FIRST
    return torch.bincount(bins.clamp_(0, N_BINS - 1).flatten(), minlength=N_BINS).double().cpu()


def bin_edges() -> tuple:
    """(lower, upper) value edges [N_BINS] float64 of value_hist's bins."""
    k = torch.arange(N_BINS, dtype=torch.float64)
    octave = torch.exp2(torch.div(k, 1 << MANT_BITS, rounding_mode="floor") + LOG2_LO)
    lower = octave * (1 + torch.remainder(k, 1 << MANT_BITS) / (1 << MANT_BITS))
    return lower, lower + octave / (1 << MANT_BITS)


def hist_quantiles(h: torch.Tensor) -> torch.Tensor:
    """counts [..., N_BINS] -> values at LEVELS [..., len(LEVELS)], interpolated linearly within a bin."""
    cdf = h.reshape(-1, N_BINS).cumsum(-1)
    cdf = (cdf / cdf[:, -1:].clamp_min(1)).contiguous()  # [R, N_BINS]
    lower, upper = bin_edges()
    lv = LEVELS.clamp(max=1 - 1e-12).expand(cdf.shape[0], -1).contiguous()
    i = torch.searchsorted(cdf, lv).clamp(max=N_BINS - 1)  # [R, len(LEVELS)]
    prev = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(lv))
    frac = ((lv - prev) / (cdf.gather(1, i) - prev).clamp_min(1e-300)).clamp(0, 1)
    out = lower[i] + frac * (upper[i] - lower[i])
    return out.reshape(*h.shape[:-1], len(LEVELS))


def column_norms(model) -> dict:
    """{projection: [n_layer, K]} ‖W[i, :]‖ over each projection's own outputs (weights are [in, out]), in the source
    model's units: AWQ weights (awq.py) hold diag(s) W, with the scales of o and down also folded into v's and up's
    columns; both are undone here."""
    a = model.args
    out = {p: [None] * a.n_layer for p in PROJECTIONS}
    for layer, p, mod, row in model.sparse_modules():
        w = (mod.float_weight() if mod.fmt.quantized else mod.weight).split(list(mod.sizes), dim=1)[row].float()
        if mod.input_scale is not None:
            w = w / mod.input_scale[:, None]
            b = model.layers[layer]
            if p == "v":  # o's scales, shared by the query heads of a KV head
                w = w * b.attention.wo.input_scale.view(a.n_kv_head, -1, a.head_dim)[:, 0].reshape(-1)
            elif p == "up":
                w = w * b.feed_forward.w2.input_scale
        out[p][layer] = w.norm(dim=1).cpu()
    return {p: torch.stack(v) for p, v in out.items()}


@torch.no_grad()
def collect(model, batches: list, skip: int, norms: dict, greedy_batches: int):
    """Histograms {criterion: [L, 7, N_BINS]}, CATS histogram [L, N_BINS], block inputs for the greedy."""
    L = model.args.n_layer
    hists = {c: torch.zeros(L, len(PROJECTIONS), N_BINS, dtype=torch.float64) for c in CRITERIA}
    cats = torch.zeros(L, N_BINS, dtype=torch.float64)
    owner = owners(model)
    dev = model.tok_embeddings.weight.device
    norms_dev = {p: n.to(dev) for p, n in norms.items()}
    I = model.args.intermediate_size

    def grab(mod, x):
        a = x[:, skip:].float().abs().reshape(-1, x.shape[-1])  # [N, K]
        if mod.input_scale is not None:  # AWQ weights: x / s; statistics in the source model's units
            a = a * mod.input_scale
        mag = value_hist(a)  # q, k, v (and gate, up) share one input
        for layer, p, _ in owner[mod]:
            j = PROJECTIONS.index(p)
            hists["magnitude"][layer, j] += mag
            hists["weight-aware"][layer, j] += value_hist(a * norms_dev[p][layer])
        if owner[mod][0][1] == "gate":  # CATS statistic: |silu(gate)|
            w = mod.float_weight().to(x.dtype) if mod.fmt.quantized else mod.weight
            gate = x[:, skip:].reshape(-1, x.shape[-1]) @ w[:, :I]
            cats[layer] += value_hist(torch.nn.functional.silu(gate.float()).abs())

    block_inputs = [[] for _ in range(L)]
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: block_inputs[i].append(args[0].clone()))
             for i, layer in enumerate(model.layers)]
    try:
        with input_hooks(model, grab):
            for b, idx in enumerate(tqdm(batches, desc="activation statistics", unit="batch")):
                if b == greedy_batches:
                    for h in hooks:
                        h.remove()
                    hooks = []
                # the hooks see every layer's inputs; only the last position's logits are made
                model(idx, torch.arange(idx.shape[1], device=dev), sparse_from=None, all_logits=False)
    finally:
        for h in hooks:
            h.remove()
    return hists, cats, [torch.cat(x) for x in block_inputs]


def part_weights(lin) -> list:
    """[(weight, scale or None)] of each part of a fused SparseLinear (q/k/v, gate/up) in column order: contiguous
    copies, faster to multiply one part at a time (kernels/reference.py's matmul_ref) than slices of the whole."""
    parts = lin.weight.split([n // lin.fmt.per_word for n in lin.sizes], dim=1)
    scales = lin.scale.split(list(lin.sizes), dim=-1) if lin.scale is not None else (None,) * len(parts)
    return [(w.contiguous(), sc) for w, sc in zip(parts, scales)]


class BlockProbe:
    """Runs one block on its dense calibration input with given per-projection levels; returns the L2 error
    of its output against the dense output, per sequence, on the scored positions: every `every`-th from skip
    (keys and values are made at every position; queries, o and the MLP, which mixes no positions, only at the
    scored ones: more sequences for the same work, and sequences differ more than neighbouring positions).

    What a search step asks for is mostly known already, so it is reused, never approximated: errors by
    (layer, criterion, levels) (a greedy path's points are the tables' targets again); q, k and v by their own
    levels and the attention output by theirs (a q candidate reuses k and v, an o candidate all three); the
    attention half's output by the attention projections' levels (the gate/up/down candidates of a step share it,
    and the next step starts from the chosen candidate's); with it, gate's and up's outputs by their own levels (a
    gate candidate reuses up's, an up candidate gate's, a down candidate both)."""

    N_ATTN = PROJECTIONS.index("o") + 1  # q, k, v, o: the levels the attention half depends on
    GATE, UP = PROJECTIONS.index("gate"), PROJECTIONS.index("up")

    def __init__(self, model, calib: Calibration, block_inputs: list, skip: int, every: int = 1):
        self.model, self.calib, self.inputs, self.skip = model, calib, block_inputs, skip
        B, S, _ = block_inputs[0].shape
        dev = model.tok_embeddings.weight.device
        self.pos = torch.arange(S, device=dev)
        self.scored = torch.arange(skip, S, every, device=dev)  # the positions whose outputs are compared
        self.rope = rope_table(model.args, S).to(dev)  # (no KV cache: the probe's attention keeps its own k and v)
        self.mask = attention_mask(self.scored, S, model.args.sliding_window)  # [n, S]
        self.active = self.pos >= skip
        self.dense = [None] * len(block_inputs)
        # (layer, criterion, levels) -> errors per sequence; attention levels -> {"h": output, "x": MLP input,
        # (j, level): gate/up}
        self.errors, self.halves = {}, {}
        self.gate_up = None  # (layer, [(weight, scale) of gate, of up]): contiguous copies, faster to multiply
        self.qkv = None  # (layer, the normalised input, [(weight, scale) of q, k, v])
        self.parts = {}  # q, k, v by their levels, their attention output by q's, k's and v's

    def run(self, layer: int, sparse: bool):
        return self.mlp(layer, self.attention(layer, sparse), sparse)

    def attention(self, layer: int, sparse: bool, levels: tuple = (), criterion: str = "") -> torch.Tensor:
        """The residual stream after the attention half at the scored positions [B, n, dim]: keys and values at
        every position, queries (and o) at the scored ones only; the reference path's operations
        (kernels/reference.py), one projection at a time. With `levels` (the thresholds set for them and
        `criterion`), q, k, v and their attention output are kept by the levels they depend on (a q candidate reuses
        k and v, ...)."""
        b = self.model.layers[layer]
        att, x, P = b.attention, self.inputs[layer], self.scored
        H, Hkv, D = att.n_head, att.n_kv_head, att.head_dim
        B, S, n = x.shape[0], x.shape[1], len(P)
        wqkv = att.wqkv
        keep = self.parts if levels else {}
        if self.qkv is None or self.qkv[0] != layer:
            xn = b.attention_norm(x)
            self.qkv = layer, xn, part_weights(wqkv)
        xn, weights = self.qkv[1:]

        def project(j: int) -> torch.Tensor:  # q [B, H, n, D], k and v [B, Hkv, S, D]
            key = (layer, criterion, j, levels[j] if levels else None)
            if key not in keep:
                xj, active = (xn[:, P], None) if j == 0 else (xn, self.active)  # scored positions: all sparsified
                xj = reference.sparsify(xj, wqkv.threshold[j], active) if sparse else xj
                y = reference.matmul_ref(xj, weights[j][0], wqkv.fmt, weights[j][1])
                if j == 2:
                    keep[key] = y.view(B, S, Hkv, D).transpose(1, 2)
                else:
                    rows = (n, H) if j == 0 else (S, Hkv)
                    keep[key] = apply_rope(y.view(B, rows[0], rows[1], D), self.rope[P] if j == 0 else self.rope
                                           ).transpose(1, 2)
            return keep[key]

        key = (layer, criterion, 3, tuple(levels[:3]) if levels else None)
        if key not in keep:
            if len(keep) >= 64:  # older steps' candidates
                for old in list(keep)[:16]:
                    keep.pop(old)
            y = F.scaled_dot_product_attention(project(0), project(1), project(2), attn_mask=self.mask,
                                               enable_gqa=H != Hkv)
            keep[key] = y.transpose(1, 2).reshape(B, n, H * D)
        return att.wo(keep[key], sparse, None, residual=x[:, P], plan=REFERENCE)[0]

    def mlp(self, layer: int, h: torch.Tensor, sparse: bool) -> torch.Tensor:
        """The block's output at the scored positions [B, n, dim] from h, the attention half's there."""
        b = self.model.layers[layer]
        return b.feed_forward(h, None, b.ffn_norm, sparse, None, REFERENCE)[0]

    def sparse_mlp(self, layer: int, half: dict, levels: tuple) -> torch.Tensor:
        """mlp(layer, half["h"], True) at the thresholds set for `levels`, from gate's and up's outputs kept in
        `half` by their levels: the reference path's operations (kernels/reference.py), one projection at a time."""
        b = self.model.layers[layer]
        w13, h = b.feed_forward.w13, half["h"]
        if "x" not in half:
            half["x"] = b.ffn_norm(h)
        if self.gate_up is None or self.gate_up[0] != layer:
            self.gate_up = layer, part_weights(w13)
        out = []
        for j, p in enumerate((self.GATE, self.UP)):
            if (j, levels[p]) not in half:
                w, sc = self.gate_up[1][j]
                half[j, levels[p]] = reference.matmul_ref(reference.sparsify(half["x"], w13.threshold[j]), w,
                                                          w13.fmt, sc)
            out.append(half[j, levels[p]])
        g = F.silu(out[0]) * out[1]
        return b.feed_forward.w2(g, True, None, residual=h, plan=REFERENCE)[0]

    def error(self, layer: int, levels: torch.Tensor, criterion: str) -> float:
        return float(self.seq_errors(layer, levels, criterion).sum())

    @torch.no_grad()
    def seq_errors(self, layer: int, levels: torch.Tensor, criterion: str) -> torch.Tensor:
        """The squared error of each sequence's block output [B] float64."""
        key = (layer, criterion, tuple(levels.tolist()))
        if key in self.errors:
            return self.errors[key]
        if self.dense[layer] is None:
            self.dense[layer] = self.run(layer, False).float()
        self.set_levels(layer, levels, criterion)
        attn_key = key[:2] + key[2][:self.N_ATTN]
        if attn_key not in self.halves:
            if len(self.halves) >= 16:  # older steps' candidates
                self.halves.pop(next(iter(self.halves)))
            self.halves[attn_key] = {"h": self.attention(layer, True, key[2], criterion)}
        y = self.sparse_mlp(layer, self.halves[attn_key], key[2]).float()
        self.errors[key] = (y - self.dense[layer]).pow(2).flatten(1).sum(1).double()
        return self.errors[key]

    def set_levels(self, layer: int, levels: torch.Tensor, criterion: str):
        thr = self.calib.layer_thresholds(layer, levels, criterion)
        for i, p, mod, row in self.model.sparse_modules():
            if i == layer:
                set_threshold(mod, row, thr[p])

    def reset(self, layer: int):
        for i, _, mod, _ in self.model.sparse_modules():
            if i == layer:
                mod.threshold.zero_()
        self.halves.clear()
        self.parts.clear()
        self.dense[layer], self.gate_up, self.qkv = None, None, None


def greedy_block(probe: BlockProbe, layer: int, criterion: str, w: torch.Tensor, step: float,
                 max_level: float = 0.99, uniform_floor: bool = True, max_move: float = 0.1,
                 ties: float = TIES, moves: tuple = ALONE) -> torch.Tensor:
    """[len(TARGETS), 7] levels reaching each target effective sparsity for one block. uniform_floor: at a target
    where the uniform allocation has less error on the scored positions, keep it instead. A candidate raises one
    projection's level by step / its parameter share, at most max_move (k and v of a GQA block hold a few percent
    of its parameters: uncapped, one step takes them from dense to max_level). ties: a candidate whose score is
    above the best one's by at most `ties` standard errors (paired over the sequences) is as good as the best, and
    of those the one whose level lags the block's effective sparsity most is taken (0: always the best): where the
    calibration text cannot tell the candidates apart, the allocation stays near uniform instead of following
    noise. moves: the projections each candidate raises together (ALONE, KV_TIED), by step / their parameter share.
    """
    levels = torch.zeros(len(PROJECTIONS), dtype=torch.float64)
    path = [(0.0, levels.clone())]
    err_now = torch.zeros(1, dtype=torch.float64)
    top = float(TARGETS[-1]) + 1e-9
    while float(w @ levels) < top:
        cands = []  # (score per sequence, levels, errors per sequence, the move's first projection)
        for g in moves:
            room = max_level - max(levels[j].item() for j in g)
            if room <= 1e-9:
                continue
            cand = levels.clone()
            cand[list(g)] += min(step / sum(w[j].item() for j in g), max_move, room)
            gain = float(w @ cand) - float(w @ levels)
            err = probe.seq_errors(layer, cand, criterion)
            cands.append(((err - err_now) / gain, cand, err, g[0]))  # added error per unit of effective sparsity
        if not cands:
            break
        best = min(cands, key=lambda c: float(c[0].sum()))
        if ties > 0 and len(best[0]) > 1:
            eff = float(w @ levels)
            n = len(best[0])

            def tied(c) -> bool:
                d = c[0] - best[0]
                return float(d.sum()) <= ties * float(d.std()) * n ** 0.5

            best = min((c for c in cands if tied(c)), key=lambda c: (float(levels[c[3]]) - eff, float(c[0].sum())))
        _, levels, err_now, _ = best
        path.append((float(w @ levels), levels.clone()))
    table = torch.zeros(len(TARGETS), len(PROJECTIONS), dtype=torch.float64)
    effs = torch.tensor([e for e, _ in path], dtype=torch.float64)
    for ti, target in enumerate(TARGETS.tolist()):
        i = int(torch.searchsorted(effs, torch.tensor(target, dtype=torch.float64)).clamp(1, len(path) - 1))
        (e0, l0), (e1, l1) = path[i - 1], path[i]
        f = 0.0 if e1 <= e0 else min(max((target - e0) / (e1 - e0), 0.0), 1.0)
        table[ti] = l0 + f * (l1 - l0)
        # a greedy path can wander: never keep an allocation worse than uniform at the same sparsity
        uniform = torch.full_like(table[ti], target)
        if uniform_floor and target > 0 and \
                probe.error(layer, uniform, criterion) < probe.error(layer, table[ti], criterion):
            table[ti] = uniform
    probe.reset(layer)
    return table


def per_block(model, calib: Calibration, block_inputs: list, skip: int, workers: int, fn, desc: str,
              every: int = 1) -> list:
    """[fn(probe, layer) for every layer], by `workers` threads that take blocks in turn, each with its own probe (a
    block's work sets only that block's thresholds) and every op on one core: on 2 CPU cores 1.2x
    faster than one thread with ops on both (the probe's ops are too small to split well)."""
    out = [None] * model.args.n_layer
    todo = queue.SimpleQueue()
    for layer in range(model.args.n_layer):
        todo.put(layer)
    bar = tqdm(total=model.args.n_layer, desc=desc, unit="block")

    def work(probe: BlockProbe):
        while True:
            try:
                layer = todo.get_nowait()
            except queue.Empty:
                return
            out[layer] = fn(probe, layer)
            bar.update()

    probes = [BlockProbe(model, calib, block_inputs, skip, every) for _ in range(workers)]
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(work, p) for p in probes]:
                f.result()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return out


def greedy_tables(model, calib: Calibration, block_inputs: list, skip: int, criterion: str, step: float,
                  uniform_floor: bool, max_move: float, workers: int, every: int = 1, ties: float = TIES,
                  moves: tuple = ALONE) -> torch.Tensor:
    """[n_layer, len(TARGETS), 7]: greedy_block of every block (per_block)."""
    w = param_fractions(model.args)
    rows = per_block(model, calib, block_inputs, skip, workers,
                     lambda probe, layer: greedy_block(probe, layer, criterion, w, step, uniform_floor=uniform_floor,
                                                       max_move=max_move, ties=ties, moves=moves),
                     f"block-wise greedy ({criterion})",
                     every)
    return torch.stack(rows).float()


def block_errors(model, calib: Calibration, block_inputs: list, skip: int, criterion: str, table: torch.Tensor,
                 workers: int) -> torch.Tensor:
    """[n_layer, len(TARGETS)] each block's output error on block_inputs at each row of its greedy table,
    relative to the energy of its dense output (the residual stream after the block, which the next norm divides
    by its scale: a relative error is what the next block sees)."""
    def errors(probe: BlockProbe, layer: int) -> torch.Tensor:
        energy = probe.run(layer, False).float().pow(2).sum().item()
        out = torch.tensor([probe.error(layer, lv, criterion) for lv in table[layer].double()], dtype=torch.float64)
        probe.reset(layer)
        return out / energy

    return torch.stack(per_block(model, calib, block_inputs, skip, workers, errors, f"block errors ({criterion})"))


def interp_rows(grid: torch.Tensor, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """rows [L, len(grid), ...] interpolated linearly along the grid at at [L] (one point per row)."""
    i = torch.searchsorted(grid, at.clamp(float(grid[0]), float(grid[-1]))).clamp(1, len(grid) - 1)
    f = ((at - grid[i - 1]) / (grid[i] - grid[i - 1])).clamp(0, 1)
    f = f.view(-1, *([1] * (rows.dim() - 2)))
    r = torch.arange(rows.shape[0])
    return rows[r, i - 1] + f * (rows[r, i] - rows[r, i - 1])


def block_sparsity(errors: torch.Tensor) -> torch.Tensor:
    """[n_layer, len(TARGETS)] each block's effective sparsity at each model target, their mean the target: blocks
    are raised one grid step at a time, each step the block whose relative error (block_errors) grows least per
    unit of sparsity, the last step's overshoot taken back from the block it raised; where that sums to more error
    than every block at the target, every block at the target."""
    L, T = errors.shape
    grid = TARGETS.double()
    out = torch.zeros(L, T, dtype=torch.float64)
    at = torch.zeros(L, dtype=torch.long)  # each block's grid index, only ever raised
    rows = torch.arange(L)
    for ti in range(1, T):
        last = 0
        while float(grid[at].mean()) < float(grid[ti]) - 1e-12:
            nxt = (at + 1).clamp(max=T - 1)
            cost = (errors[rows, nxt] - errors[rows, at]) / (grid[nxt] - grid[at]).clamp_min(1e-12)
            cost[at + 1 >= T] = float("inf")
            last = int(cost.argmin())
            at[last] += 1
        s = grid[at].clone()
        s[last] -= (float(s.mean()) - float(grid[ti])) * L
        equal = torch.full((L,), float(grid[ti]), dtype=torch.float64)
        if interp_rows(grid, errors, s).sum() > interp_rows(grid, errors, equal).sum():
            s = equal
        out[:, ti] = s
    return out


def spread_over_blocks(table: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """The greedy table [n_layer, len(TARGETS), 7] with each block at its block_sparsity at each model target:
    its levels there interpolated along its own rows."""
    s = block_sparsity(errors)
    out = torch.stack([interp_rows(TARGETS.double(), table.double(), s[:, ti]) for ti in range(len(TARGETS))], 1)
    return out.to(table.dtype)




@torch.no_grad()
def aim_levels(model, calib: Calibration, criterion: str, batches: list, skip: int, steps: int = 1) -> torch.Tensor:
    """The greedy table of `criterion` [n_layer, len(TARGETS), 7] re-aimed at what decoding measures: the levels to
    look the thresholds up at. Its levels are quantiles of dense activations; decoding sparsifies every layer, and a
    layer fed sparsified inputs upstream
    (o and down above all: smaller attention outputs and MLP hiddens) drops more than its level says. Per target:
    decode-like passes over `batches` (the first `skip` positions dense, the rest sparsified and counted) measure
    each projection's share dropped, and its lookup level moves by what it missed (a secant step of slope one:
    the measured share rises with the level one for one on the distribution it is measured on), `steps` times."""
    table = calib.greedy[criterion].double().clone()
    for ti in tqdm(range(1, len(TARGETS)), desc=f"aiming levels ({criterion})", unit="target"):
        want = table[:, ti].clone()
        look = want.clone()
        for _ in range(steps):
            apply_levels(model, calib, look, criterion)
            counter = SparsityCounter(model)
            with counter.counting(skip):
                for b in batches:
                    model(b, torch.arange(b.shape[1], device=b.device), sparse_from=skip, all_logits=False)
            stats = counter.stats()
            got = torch.tensor([[stats[(layer, p)] for p in PROJECTIONS] for layer in range(table.shape[0])],
                               dtype=torch.float64)
            look = torch.where(want > 0, (look + want - got).clamp(0.0, 0.99), 0.0)
        table[:, ti] = look
    apply_levels(model, calib, torch.zeros_like(table[:, 0]), criterion)
    return table


def aim_batches(batches: list, n_seqs: int, batch: int) -> list:
    """n_seqs of the calibration sequences, evenly spaced over them (so over the whole text), in batches."""
    seqs = torch.cat(batches)
    if n_seqs <= 0:
        return []
    every = max(1, seqs.shape[0] // n_seqs)
    return list(seqs[::every][:n_seqs].split(batch))


def token_batches(tok, text: str, n_tokens: int, seq_len: int, batch: int, device) -> list:
    ids = tok.encode(text, bos=False)
    bos = tok.bos_id if tok.add_bos else None
    per_seq = seq_len - (1 if bos is not None else 0)
    n_seq = min(len(ids) // per_seq, max(1, math.ceil(n_tokens / seq_len)))
    if n_seq < 1:
        raise UserError(f"the calibration text has only {len(ids)} tokens, fewer than --seq-len {seq_len}")
    # sequences spread evenly over the whole text, not just its beginning
    stride = len(ids) // n_seq
    seqs = [([bos] if bos is not None else []) + ids[i * stride: i * stride + per_seq] for i in range(n_seq)]
    t = torch.tensor(seqs, device=device)
    return [t[i:i + batch] for i in range(0, n_seq, batch)]


def calibrate(model, tok, text: str, n_tokens: int, seq_len: int, skip: int, batch: int, greedy_seqs: int,
              step: float, source: str, aim_seqs: int = AIM_SEQS, uniform_floor: bool = True,
              max_move: float = 0.1, criteria=CRITERIA, workers: int = 0, spread: bool = True,
              alloc_seqs: int = ALLOC_SEQS, greedy_every: int = 1, ties: float = TIES, tie_kv: bool = TIE_KV,
              trace: dict = None) -> tuple:
    """The Calibration of `model` on `text`: quantile tables of both criteria, greedy (and aimed) tables of
    `criteria` (the greedy search and the aiming are most of the time: one criterion's tables take about half).
    workers: threads of the greedy search (0: one per CPU core on a CPU, one on a GPU); greedy_every, ties: the
    greedy search's scored positions and tie band (greedy_block); tie_kv: k and v raised together (KV_TIED); spread:
    the blocks' sparsities chosen together (spread_over_blocks, on the errors of alloc_seqs sequences), else every
    block at the model's target (TEAL's). trace: a dict that receives, per criterion, the greedy table before the
    spread ("unspread") and the blocks' own sparsities ("blocks", [n_layer, len(TARGETS)]), for
    scripts/greedy_stability.py."""
    device = model.tok_embeddings.weight.device
    batches = token_batches(tok, text, n_tokens, seq_len, batch, device)
    norms = column_norms(model)
    model.setup_caches(batch, seq_len)
    kept = max(greedy_seqs, alloc_seqs if spread else 0)
    hists, cats_hist, inputs = collect(model, batches, skip, norms, -(-kept // batch))
    block_inputs = [x[:greedy_seqs] for x in inputs]
    q = {c: hist_quantiles(hists[c]) for c in CRITERIA}
    greedy = {c: torch.zeros(model.args.n_layer, len(TARGETS), len(PROJECTIONS)) for c in criteria}
    calib = Calibration({**{f"quantiles.{crit_key(c)}": q[c] for c in CRITERIA},
                         **{f"greedy.{crit_key(c)}": greedy[c] for c in criteria},
                         **{f"norms.{p}": norms[p] for p in PROJECTIONS},
                         "quantiles.cats": hist_quantiles(cats_hist)}, {})
    workers = workers or (1 if device.type == "cuda" else max(1, min(torch.get_num_threads(), model.args.n_layer)))
    for c in criteria:
        calib.greedy[c] = greedy_tables(model, calib, block_inputs, skip, c, step, uniform_floor, max_move, workers,
                                        greedy_every, ties, KV_TIED if tie_kv else ALONE)
        if spread:
            errors = block_errors(model, calib, [x[:alloc_seqs] for x in inputs], skip, c, calib.greedy[c], workers)
            if trace is not None:
                trace[c] = {"unspread": calib.greedy[c], "blocks": block_sparsity(errors)}
            calib.greedy[c] = spread_over_blocks(calib.greedy[c], errors)
    aim = aim_batches(batches, aim_seqs, batch)
    for c in criteria if aim else ():
        calib.aimed[c] = aim_levels(model, calib, c, aim, skip).float()
    n_tok = sum(b.numel() for b in batches)
    calib.meta = {"format": CALIB_FORMAT, "fingerprint": model.fingerprint, "text": source,
                  "tokens": str(n_tok), "greedy_tokens": str(block_inputs[0].shape[0] * seq_len),
                  "greedy_every": str(greedy_every), "ties": str(ties), "tie_kv": str(tie_kv),
                  "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
                  "seq_len": str(seq_len), "skip": str(skip), "step": str(step), "max_move": str(max_move),
                  "blocks": f"spread over {inputs[0][:alloc_seqs].shape[0] * seq_len} tokens" if spread else "equal",
                  "aim_tokens": str(sum(b.numel() for b in aim)),
                  "criteria": ",".join(criteria), "created": time.strftime("%Y-%m-%d")}
    return calib


def save_calibration(calib: Calibration, path: Path):
    tensors = calib.tensors()
    shapes = {k: (tuple(v.shape), torch.float32) for k, v in tensors.items()}
    write_safetensors(path, shapes, iter(tensors.items()), calib.meta)
