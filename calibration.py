"""TEAL activation-sparsity calibration (the CLI is calibrate.py, which writes CKPT/sparsity.safetensors):

1. collect: a dense pass over calibration text histograms, per layer and projection, |x| of the projection's input
   (q, k, v share the attention input; gate, up the MLP input) and the weight-aware score |x_i|·‖W[i,:]‖, plus
   |silu(gate)| for the CATS-style MLP, on log-spaced bins fine enough to set any sparsity level to well within
   ±0.5%; hist_quantiles turns them into the stored quantile tables, with the weights' column norms.
2. greedy_block: block-wise greedy allocation (TEAL): per block, starting from 0, each step raises the block's
   effective sparsity (the parameter-weighted mean of its projections' levels) by `step` through one projection,
   the one whose increase adds the least L2 error to the block output on the later tokens of each sequence (the
   block is fed its dense input; BlockProbe). Done for both criteria; the table at model-level targets 0 ... 0.9
   keeps, per block, whichever of the greedy and the uniform allocation has less error there.
"""
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import write_safetensors
from errors import UserError
from model import attention_mask
from sparsity import (CALIB_FORMAT, CRITERIA, LEVELS, PROJECTIONS, TARGETS, Calibration, crit_key, input_hooks, owners,
                      param_fractions)

N_BINS, LOG2_LO, LOG2_HI = 16384, -40.0, 16.0  # bins of log2|x|: 0.24% wide in value


def log2_hist(v: torch.Tensor) -> torch.Tensor:
    lv = v.float().clamp_min(2.0 ** LOG2_LO).log2().clamp(LOG2_LO, LOG2_HI)
    return torch.histc(lv, bins=N_BINS, min=LOG2_LO, max=LOG2_HI).double().cpu()


def hist_quantiles(h: torch.Tensor) -> torch.Tensor:
    """counts [..., N_BINS] -> values at LEVELS [..., len(LEVELS)], interpolated within a bin."""
    cdf = h.reshape(-1, N_BINS).cumsum(-1)
    cdf = (cdf / cdf[:, -1:].clamp_min(1)).contiguous()  # [R, N_BINS]
    width = (LOG2_HI - LOG2_LO) / N_BINS
    edges = LOG2_LO + width * torch.arange(1, N_BINS + 1, dtype=torch.float64)  # right edges
    lv = LEVELS.clamp(max=1 - 1e-12).expand(cdf.shape[0], -1).contiguous()
    i = torch.searchsorted(cdf, lv).clamp(max=N_BINS - 1)  # [R, len(LEVELS)]
    prev = torch.where(i > 0, cdf.gather(1, (i - 1).clamp(min=0)), torch.zeros_like(lv))
    frac = ((lv - prev) / (cdf.gather(1, i) - prev).clamp_min(1e-300)).clamp(0, 1)
    out = 2.0 ** (edges[i] - width + frac * width)
    return out.reshape(*h.shape[:-1], len(LEVELS))


def column_norms(model) -> dict:
    """{projection: [n_layer, K]} ‖W[i, :]‖ over each projection's own outputs (weights are [in, out])."""
    out = {p: [None] * model.args.n_layer for p in PROJECTIONS}
    for layer, p, mod, row in model.sparse_modules():
        out[p][layer] = mod.weight.split(list(mod.sizes), dim=1)[row].float().norm(dim=1).cpu()
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
        mag = log2_hist(a)  # q, k, v (and gate, up) share one input
        for layer, p, _ in owner[mod]:
            j = PROJECTIONS.index(p)
            hists["magnitude"][layer, j] += mag
            hists["weight-aware"][layer, j] += log2_hist(a * norms_dev[p][layer])
        if owner[mod][0][1] == "gate":  # CATS statistic: |silu(gate)|
            gate = x[:, skip:].reshape(-1, x.shape[-1]) @ mod.weight[:, :I]
            cats[layer] += log2_hist(torch.nn.functional.silu(gate.float()).abs())

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
                model(idx, torch.arange(idx.shape[1], device=dev), sparse_from=None)
    finally:
        for h in hooks:
            h.remove()
    return hists, cats, [torch.cat(x) for x in block_inputs]


class BlockProbe:
    """Runs one block on its dense calibration input with given per-projection levels; returns the L2 error
    of its output against the dense output on positions >= skip.

    What a search step asks for is mostly known already, so it is reused, never approximated: errors by
    (layer, criterion, levels) (a greedy path's points are the tables' targets again); the attention half's output
    by the attention projections' levels (the gate/up/down candidates of a step share it, and the next step starts
    from the chosen candidate's); the MLP half runs on the scored positions only (it mixes no positions)."""

    N_ATTN = PROJECTIONS.index("o") + 1  # q, k, v, o: the levels the attention half depends on

    def __init__(self, model, calib: Calibration, block_inputs: list, skip: int):
        self.model, self.calib, self.inputs, self.skip = model, calib, block_inputs, skip
        B, S, _ = block_inputs[0].shape
        dev = model.tok_embeddings.weight.device
        model.setup_caches(B, S)
        self.pos = torch.arange(S, device=dev)
        self.rope = model.rope[self.pos]
        self.mask = attention_mask(self.pos, S, model.args.sliding_window)
        self.active = self.pos >= skip
        self.dense = [None] * len(block_inputs)
        self.errors, self.halves = {}, {}  # (layer, criterion, levels) -> error; attention levels -> output

    def run(self, layer: int, sparse: bool):
        return self.mlp(layer, self.attention(layer, sparse), sparse)

    def attention(self, layer: int, sparse: bool) -> torch.Tensor:
        """The residual stream after the attention half [B, S, dim]."""
        b = self.model.layers[layer]
        return b.attention(self.inputs[layer], None, b.attention_norm, self.rope, self.mask, self.pos, sparse,
                           self.active, self.model.plan)[0]

    def mlp(self, layer: int, h: torch.Tensor, sparse: bool) -> torch.Tensor:
        """The block's output on the scored positions [B, S - skip, dim]."""
        b = self.model.layers[layer]
        return b.feed_forward(h[:, self.skip:], None, b.ffn_norm, sparse, self.active[self.skip:],
                              self.model.plan)[0]

    @torch.no_grad()
    def error(self, layer: int, levels: torch.Tensor, criterion: str) -> float:
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
            self.halves[attn_key] = self.attention(layer, True)
        y = self.mlp(layer, self.halves[attn_key], True).float()
        self.errors[key] = (y - self.dense[layer]).pow(2).sum().item()
        return self.errors[key]

    def set_levels(self, layer: int, levels: torch.Tensor, criterion: str):
        thr = self.calib.layer_thresholds(layer, levels, criterion)
        for i, p, mod, row in self.model.sparse_modules():
            if i == layer:
                mod.threshold[row].copy_(thr[p])

    def reset(self, layer: int):
        for i, _, mod, _ in self.model.sparse_modules():
            if i == layer:
                mod.threshold.zero_()
        self.halves.clear()
        self.dense[layer] = None


def greedy_block(probe: BlockProbe, layer: int, criterion: str, w: torch.Tensor, step: float,
                 max_level: float = 0.99) -> torch.Tensor:
    """[len(TARGETS), 7] levels reaching each target effective sparsity for one block."""
    levels = torch.zeros(len(PROJECTIONS), dtype=torch.float64)
    path = [(0.0, levels.clone())]
    err_now = 0.0
    top = float(TARGETS[-1]) + 1e-9
    while float(w @ levels) < top:
        best = None
        for j in range(len(PROJECTIONS)):
            room = max_level - levels[j].item()
            if room <= 1e-9:
                continue
            cand = levels.clone()
            cand[j] += min(step / w[j].item(), room)
            gain = float(w @ cand) - float(w @ levels)
            err = probe.error(layer, cand, criterion)
            score = (err - err_now) / gain  # added error per unit of effective sparsity
            if best is None or score < best[0]:
                best = (score, cand, err)
        if best is None:
            break
        _, levels, err_now = best
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
        if target > 0 and probe.error(layer, uniform, criterion) < probe.error(layer, table[ti], criterion):
            table[ti] = uniform
    probe.reset(layer)
    return table


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
              step: float, source: str) -> tuple:
    device = model.tok_embeddings.weight.device
    batches = token_batches(tok, text, n_tokens, seq_len, batch, device)
    norms = column_norms(model)
    model.setup_caches(batch, seq_len)
    greedy_batches = max(1, greedy_seqs // batch)
    hists, cats_hist, block_inputs = collect(model, batches, skip, norms, greedy_batches)
    block_inputs = [x[:greedy_seqs] for x in block_inputs]
    q = {c: hist_quantiles(hists[c]) for c in CRITERIA}
    greedy = {c: torch.zeros(model.args.n_layer, len(TARGETS), len(PROJECTIONS)) for c in CRITERIA}
    calib = Calibration({**{f"quantiles.{crit_key(c)}": q[c] for c in CRITERIA},
                         **{f"greedy.{crit_key(c)}": greedy[c] for c in CRITERIA},
                         **{f"norms.{p}": norms[p] for p in PROJECTIONS},
                         "quantiles.cats": hist_quantiles(cats_hist)}, {})
    probe = BlockProbe(model, calib, block_inputs, skip)
    w = param_fractions(model.args)
    for c in CRITERIA:
        for layer in tqdm(range(model.args.n_layer), desc=f"block-wise greedy ({c})", unit="block"):
            calib.greedy[c][layer] = greedy_block(probe, layer, c, w, step)
    n_tok = sum(b.numel() for b in batches)
    calib.meta = {"format": CALIB_FORMAT, "fingerprint": model.fingerprint, "text": source,
                  "tokens": str(n_tok), "greedy_tokens": str(block_inputs[0].shape[0] * seq_len),
                  "seq_len": str(seq_len), "skip": str(skip), "step": str(step),
                  "criteria": ",".join(CRITERIA), "created": time.strftime("%Y-%m-%d")}
    return calib


def save_calibration(calib: Calibration, path: Path):
    tensors = calib.tensors()
    shapes = {k: (tuple(v.shape), torch.float32) for k, v in tensors.items()}
    write_safetensors(path, shapes, iter(tensors.items()), calib.meta)
