"""Activation-aware weight quantization (AWQ, Lin et al., MLSys 2024) into 4-bit groups, for the sparse linears.

Input channels that carry large activations matter more to a linear's output, so each group of linears that
shares an input (q/k/v; o; gate/up; down) gets per-input-channel scales s = mean|x|^α before round-to-nearest:
W' = diag(s) W is quantized, and the input is divided by s, which folds exactly into the op before it:
- q/k/v and gate/up: the RMSNorm weight (its output channels);
- o: the v columns of q/k/v (attention is linear in v; under GQA the query heads that share a KV head share its
  scales);
- down: the up columns of gate/up (silu(gate) * up is linear in up).
α is searched per group on a grid, minimising the squared error of the group's output on calibration activations.
Last, each scaled linear is rounded with GPTQ's error feedback on the same activations (gptq_int4, in act order with
static groups) rather than to nearest, and its group scales and offsets are then refitted to the codes GPTQ chose
(refit_scales, least squares on the same activations): the same int4 format. Both read the activations through
their Gram matrix xᵀx, made once per linear (gram). AWQ's clipping search (search_clip: each weight group's range
shrunk by the ratio that quantizes its share of the output best when rounded to nearest; q and k left alone) is
there for rounding to nearest; ahead of GPTQ's rounding it lost quality on the default model
(docs/quality-notes.md), so it is off.

Sparse-aware (`level`): decoding at a sparsity level, a linear sees its inputs with the small ones dropped. Given the
source model's thresholds at that level, each segment of a linear (q, k, v; gate, up: each has its own threshold)
is fitted to its dense inputs and, as many rows again, the same inputs as its thresholds leave them: the scale
search sums both errors (and takes mean|x| over both), and GPTQ's Hessian covers both. Off by default: over three
calibration draws of the default model, AWQ g128 at 50% read 1.098x the float model's perplexity with it and 1.091x
without (one draw varies by ±1.5%; docs/quality-notes.md, session 25).

Sparsity: a linear's input becomes x / s, so a threshold t of the source model becomes t / s channel by channel
and drops exactly the same inputs. Each scaled linear keeps s as its `input_scale` buffer (saved in the quantized
file), and sparsity.apply_thresholds divides the source checkpoint's calibrated thresholds by it: the calibration
of the 16-bit checkpoint applies unchanged.
"""
from itertools import accumulate
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from calibration import token_batches
from kernels.formats import AWQ, QuantFormat, pack_int4, round_int4, unpack_int4
from model import Transformer, attention_mask
from quantization import quantize_model
from sparsity import DEFAULT_CRITERION, Calibration, apply_thresholds, input_hooks


@torch.no_grad()
def layer_inputs(model: Transformer, batches: list, max_rows: int):
    """Yields (layer index, {module: its input x [rows, K] float32}) layer by layer, dense, at most max_rows rows
    each: the inputs the float model gives each linear. One layer's are held at a time (a 7B model's for all layers
    at 4,096 rows would be ~12 GB): each layer's outputs, the next one's inputs, are made in the same pass, before
    the caller changes the layer (its scales folded into its norms, v and up; its linears quantized)."""
    model.setup_caches(max(max(b.shape[0] for b in batches), model.max_batch_size),
                       max(max(b.shape[1] for b in batches), model.max_seq_len))
    states = []  # per batch: (residual stream [B, S, dim] entering the next layer, positions [S])
    for idx in batches:
        states.append((model.tok_embeddings(idx), torch.arange(idx.shape[1], device=idx.device)))
    window = model.args.sliding_window

    def run(layer, x, pos):
        mask = attention_mask(pos, model.max_seq_len, window)
        return layer(x, None, model.rope[pos], mask, pos, False, None, model.plan)[0]

    for i, layer in enumerate(model.layers):
        out = {}

        def grab(mod, a):
            rows = out.setdefault(mod, [])
            if sum(r.shape[0] for r in rows) < max_rows:
                rows.append(a.detach().float().reshape(-1, a.shape[-1]))

        with input_hooks(model, grab):  # the layer's outputs made while it is still the float model's
            states = [(run(layer, x, pos), pos) for x, pos in states]
        yield i, {m: torch.cat(r)[:max_rows] for m, r in out.items()}


def search_scale(x: Tensor, w: Tensor, fmt: QuantFormat, grid: int, tie=None, parts=None) -> tuple:
    """The best scales s [K] for input x [T, K] and weights w [K, N] (float32): s = mean|x|^α, α in 0, 1/grid, ...,
    (grid-1)/grid, normalised to a geometric mean of one; tie(s) -> s makes channels share a scale (GQA). parts:
    [(inputs [T', K], column slice)] whose output errors are summed instead (each segment its own inputs; default
    x for every column). -> (s, α, relative output error)."""
    parts = parts or [(x, slice(None))]
    act = torch.cat([xp for xp, _ in parts]).abs().mean(0).clamp_min(1e-8)  # over the rows the errors are taken on
    refs = [xp @ w[:, cols] for xp, cols in parts]
    best = None
    for i in range(grid):
        s = act.pow(i / grid)
        if tie is not None:
            s = tie(s)
        s = s / (s.max() * s.min()).sqrt()
        q, scale = fmt.quantize_weight(w * s[:, None])
        wq = fmt.dequantize(q, scale)
        err = sum(((xp / s) @ wq[:, cols] - ref).pow(2).sum().item() for (xp, cols), ref in zip(parts, refs))
        if best is None or err < best[2]:
            best = (s, i / grid, err)
    return best[0], best[1], best[2] / sum(ref.pow(2).sum().item() for ref in refs)


def search_clip(x: Tensor, w: Tensor, group: int, ratios: int = 11, rows: int = 512) -> Tensor:
    """w [K, N] (float32) with each scale group's range [min(w, 0), max(w, 0)] (of `group` inputs, per output column)
    shrunk by the ratio in 1, 0.95, ... that minimises the squared error of the group's share of x [T, K] @ w on the
    first `rows` rows of x, the weights clipped to it; round-to-nearest then quantizes within that range."""
    K, N = w.shape
    G = K // group
    xg = x[:rows].reshape(-1, G, group)  # [T, G, g]
    chunk = max(1, (1 << 24) // (xg.shape[0] * G))  # output columns per pass: [T, G, chunk] errors stay ~64 MB
    out = torch.empty_like(w)
    for n0 in range(0, N, chunk):
        wg = w[:, n0:n0 + chunk].reshape(G, group, -1)
        lo0, hi0 = wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0)  # [G, n]
        best_err = torch.full_like(lo0, float("inf"))
        best = torch.ones_like(lo0)
        for r in torch.linspace(1.0, 0.5, ratios).tolist():
            lo, hi = lo0 * r, hi0 * r
            q, s, m = round_int4(wg.clamp(lo[:, None], hi[:, None]), lo, hi)
            dw = q * s[:, None] + m[:, None] - wg
            err = torch.einsum("tgk,gkn->tgn", xg, dw).pow(2).sum(0)  # [G, n]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
        out[:, n0:n0 + chunk] = wg.clamp((lo0 * best)[:, None], (hi0 * best)[:, None]).reshape(K, -1)
    return out


def gram(x: Tensor) -> Tensor:
    """x [T, K] -> xᵀx [K, K] float64: the Hessian of a linear's squared output error on inputs x."""
    return x.T.double() @ x.double()


@torch.no_grad()
def gptq_int4(w: Tensor, h: Tensor, group: int, damp: float = 0.3, act_order: bool = True) -> tuple:
    """w [K, N] float32 rounded to int4 groups (rtn_int4's format) with GPTQ's error feedback (Frantar et al., ICLR
    2023): inputs are rounded one at a time and each one's rounding error, weighted by the inverse Hessian of the
    output error (h = gram(x) [K, K] of the inputs x, damped here; h is not changed), is pushed onto the inputs not
    rounded yet. act_order: the inputs are rounded in order of decreasing H diagonal (those that carry the most
    first), with each group's range fixed from the weights before any feedback (GPTQ's static groups: the file's
    groups stay contiguous); else in input order, a group's range taken when its first input comes up. damp: the
    multiple of h's mean diagonal added to it (0.3: on the default model 0.03 and 0.1 fitted the calibration rows
    closer and lost held-out perplexity, docs/quality-notes.md). -> (q int32 [K, N/8], scale float16 [2, K/group,
    N])."""
    K, N = w.shape
    H = h.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W = w.float().clone()
    W[dead] = 0.0
    S, M = W.new_empty(K // group, N), W.new_empty(K // group, N)
    perm = torch.arange(K, device=W.device)
    if act_order:
        wg = W.reshape(K // group, group, N)
        _, S, M = round_int4(wg, wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0))
        perm = torch.argsort(H.diagonal(), descending=True)
    H = H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(K, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # [K, K]
    W = W[perm]
    Q = torch.empty_like(W)
    gid = (perm // group).tolist()  # each rounding step's group
    for a in range(0, K, group):  # blocks of `group` steps: their feedback onto later blocks deferred to the end
        b = a + group
        if not act_order:  # the block is one group, its range from its weights as fed back so far
            _, s, m = round_int4(W[a:b][None], W[a:b].amin(0).clamp_max(0)[None], W[a:b].amax(0).clamp_min(0)[None])
            S[a // group], M[a // group] = s[0], m[0]
        err = W.new_empty(group, N)
        for k in range(a, b):
            g = gid[k]
            Q[k] = ((W[k] - M[g]) / S[g]).round().clamp(0, 15)
            err[k - a] = (W[k] - (Q[k] * S[g] + M[g])) / U[k, k]
            W[k + 1:b] -= U[k, k + 1:b, None] * err[k - a][None, :]
        W[b:] -= U[a:b, b:].T @ err
    out = torch.empty_like(Q)
    out[perm] = Q
    return pack_int4(out.to(torch.int32)), torch.stack([S, M]).half()


@torch.no_grad()
def refit_scales(w: Tensor, h: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The group scales and offsets of int4 weights q (pack_int4 words [K, N/8], scale [2, G, N]) refitted to w [K, N]
    on inputs x [T, K] (through h = gram(x) [K, K]) with the codes kept: per output column, the 2G values minimising
    the output error ||x (q s + m - w)||² (a least-squares problem in them: GPTQ chose each code for the scales it
    had, and its error feedback leaves the group ranges where they no longer fit the codes best). A column keeps its
    scales where the refit does not lower its error (after float16 rounding). -> scale [2, G, N] float16."""
    K, N = w.shape
    G = scale.shape[1]
    group = K // G
    qg = unpack_int4(q).double().view(G, group, N)
    H = h + 1e-6 * h.diagonal().mean() * torch.eye(K, dtype=h.dtype, device=h.device)
    Hq = torch.einsum("kgj,gjn->kgn", H.view(K, G, group), qg)  # [K, G, N]: H restricted to each group's codes
    H1 = H.view(K, G, group).sum(-1)  # [K, G]
    A = torch.empty(N, 2 * G, 2 * G, dtype=H.dtype, device=H.device)  # normal equations of (s, m) per column
    A[:, :G, :G] = torch.einsum("gjn,gjhn->ngh", qg, Hq.view(G, group, G, N))
    A[:, :G, G:] = torch.einsum("gjn,gjh->ngh", qg, H1.view(G, group, G))
    A[:, G:, :G] = A[:, :G, G:].transpose(1, 2)
    A[:, G:, G:] = H1.view(G, group, G).sum(1)
    Hw = (H @ w.double()).view(G, group, N)
    b = torch.cat([(qg * Hw).sum(1), Hw.sum(1)]).T  # [N, 2G]
    fit = torch.linalg.solve_ex(A, b[..., None])[0][..., 0].T.reshape(2, G, N).half()  # [2, G, N]

    def err(sc):  # per column
        d = qg * sc[0].double()[:, None] + sc[1].double()[:, None] - w.double().view(G, group, N)
        d = d.reshape(K, N)
        return ((H @ d) * d).sum(0)

    better = torch.isfinite(fit.float()).all(0).all(0) & (err(fit) < err(scale))
    return torch.where(better, fit, scale)


def awq_on_text(model: Transformer, tok, text: str, fmt: QuantFormat, tokens: int, seq_len: int,
                progress: bool = True, calib: Optional[Calibration] = None, level: float = 0.0) -> dict:
    """awq_quantize on `tokens` tokens of calibration text in sequences of seq_len, every one of them in GPTQ's
    Hessian (quantize.py --mode awq; the quality report's AWQ rows), sparse-aware at `level` with the source model's
    calibration `calib` (the default method's thresholds). -> awq_scale's report."""
    batches = token_batches(tok, text, tokens, seq_len, 4, model.tok_embeddings.weight.device)
    thresholds = level_thresholds(model, calib, level) if calib is not None and level > 0 else None
    return awq_quantize(model, batches, fmt, max_rows=tokens, progress=progress, thresholds=thresholds)


def level_thresholds(model: Transformer, calib: Calibration, level: float) -> dict:
    """{(layer, group): the group's thresholds [segments, K]} (awq_scale's groups) of the default method at `level`,
    as the model's buffers would hold them (the buffers are left as they were)."""
    before = {mod: mod.threshold.clone() for *_, mod, _ in model.sparse_modules()}
    apply_thresholds(model, calib, level, "greedy", DEFAULT_CRITERION)
    out = {(i, name): lin.threshold.clone() for i, layer in enumerate(model.layers)
           for name, lin in linear_groups(layer)}
    for mod, t in before.items():
        mod.threshold.copy_(t)
    return out


def linear_groups(layer) -> list:
    """[(group name, linear)] of a layer's sparse linears, each group one input (awq_scale's groups)."""
    att, ff = layer.attention, layer.feed_forward
    return [("qkv", att.wqkv), ("o", att.wo), ("gate_up", ff.w13), ("down", ff.w2)]


@torch.no_grad()
def awq_quantize(model: Transformer, batches: list, fmt: QuantFormat = AWQ, grid: int = 20, max_rows: int = 4096,
                 progress: bool = True, clip: bool = False, gptq: bool = True,
                 thresholds: Optional[dict] = None) -> dict:
    """awq_scale (the sparse linears rounded with GPTQ's error feedback with `gptq`, else to nearest), then the rest
    of the model quantized to `fmt` (in place). -> awq_scale's report."""
    report = awq_scale(model, batches, fmt, grid, max_rows, progress, clip, gptq, thresholds)
    quantize_model(model, fmt)
    return report


@torch.no_grad()
def awq_scale(model: Transformer, batches: list, fmt: QuantFormat = AWQ, grid: int = 20, max_rows: int = 4096,
              progress: bool = True, clip: bool = False, gptq: bool = False,
              thresholds: Optional[dict] = None) -> dict:
    """Scale every layer's linear groups for `fmt` and fold the scales into the ops before them (module docstring):
    the float model computes the same function; with `clip`, weight groups are also clipped for `fmt`'s rounding
    (search_clip), which changes the float model; with `gptq`, each layer's scaled linears are then quantized to
    int4 by gptq_int4 on their (scaled) inputs and their scales refitted (refit_scales). thresholds: {(layer,
    group): [segments, K] in the source model's units} (level_thresholds): sparse-aware (module docstring). ->
    {(layer, group): (α, relative output error once quantized to nearest, before clipping)}."""
    a = model.args
    thresholds = thresholds or {}
    H, Hkv, D, I = a.n_head, a.n_kv_head, a.head_dim, a.intermediate_size
    q_cols, kv_cols = H * D, Hkv * D
    report = {}
    for i, inputs in tqdm(layer_inputs(model, batches, max_rows), desc="awq", unit="layer", total=len(model.layers),
                          disable=not progress):
        layer = model.layers[i]
        att, ff = layer.attention, layer.feed_forward
        gqa = (lambda s: s.view(Hkv, H // Hkv, D).mean(1, keepdim=True).expand(Hkv, H // Hkv, D).reshape(-1))
        v_cols = slice(q_cols + kv_cols, q_cols + 2 * kv_cols)
        folds = {  # 1/s into the op before each group
            "qkv": lambda s: layer.attention_norm.weight.div_(s.to(layer.attention_norm.weight)),
            "o": lambda s: att.wqkv.weight[:, v_cols].div_(
                s.view(Hkv, H // Hkv, D)[:, 0].reshape(-1).to(att.wqkv.weight)[None, :]),
            "gate_up": lambda s: layer.ffn_norm.weight.div_(s.to(layer.ffn_norm.weight)),
            "down": lambda s: ff.w13.weight[:, I:].div_(s.to(ff.w13.weight)[None, :])}
        for name, lin in linear_groups(layer):
            tie, fold = gqa if name == "o" else None, folds[name]
            w = lin.weight.float()
            x = inputs[lin]
            parts = segment_inputs(lin, x, thresholds.get((i, name)))
            s, alpha, err = search_scale(x, w, fmt, grid, tie, parts)
            w = w * s[:, None]
            if clip:
                first = q_cols + kv_cols if name == "qkv" else 0  # q and k are not clipped
                w[:, first:] = search_clip(x / s, w[:, first:], fmt.group(w.shape[0]))
            lin.weight.copy_(w.to(lin.weight.dtype))
            fold(s)
            lin.register_buffer("input_scale", s.to(lin.weight.device))
            report[(i, name)] = (alpha, err)
        # after the layer's folds (o's scales divide v's columns, down's divide up's): its weights are final
        for name, lin in linear_groups(layer) if gptq else ():
            K = lin.weight.shape[0]
            w = lin.weight.float()
            done = []
            for xp, cols in segment_inputs(lin, inputs[lin], thresholds.get((i, name))):
                h = gram(xp / lin.input_scale)
                q, scale = gptq_int4(w[:, cols], h, fmt.group(K))
                done.append((q, refit_scales(w[:, cols], h, q, scale)))
            q, scale = torch.cat([d[0] for d in done], 1), torch.cat([d[1] for d in done], 2)  # packs of 8 columns
            lin.set_quantized(fmt, q.to(lin.weight.device), scale.to(lin.weight.device))
    return report


def segment_inputs(lin, x: Tensor, t: Optional[Tensor]) -> list:
    """[(inputs, column slice)] a linear's quantization is fitted to: x for all its columns; sparse-aware, with its
    thresholds t [segments, K], per output segment (q, k, v; gate, up) x and, below it, x as the segment's threshold
    row leaves it."""
    if t is None:
        return [(x, slice(None))]
    t = t.to(x)
    ends = [0, *accumulate(lin.sizes)]
    return [(torch.cat([x, torch.where(x.abs() > t[j], x, 0.0)]), slice(ends[j], ends[j + 1]))
            for j in range(len(ends) - 1)]
