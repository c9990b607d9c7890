"""Decoding: the Generator (prefill and one-token decode step, optionally compiled, streaming tokens to the host
one step behind the GPU), sampling, and what a run reports (weight bytes per step, peak memory, measured decode
sparsity). The CLI is generate.py."""
import resource
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._library.utils import get_layout_constraint_tag

from errors import UserError
from kernels import (cuda_attention, cuda_gemv, decode_attention, gate_up_rows, gluon_gemv, gluon_mma, sparse_gemv,
                     sparse_mlp)
from kernels.formats import FLOAT, INT8, QuantFormat
from model import ModelArgs
from sparsity import DEFAULT_CRITERION, PROJECTIONS, Calibration, apply_thresholds, measure_sparsity, parameter_weighted, per_projection


def opaque_ops() -> list:
    """The kernels' opaque ops (torch.library custom ops), as torch.compile meets them."""
    return [op._opoverload for op in (sparse_gemv._sparse_gemv_op, sparse_gemv._sparse_gemv_ss_op,
                                      sparse_gemv._sparse_gemv_parts_op, sparse_mlp._sparse_mlp_op,
                                      gate_up_rows._gate_up_rows_op, decode_attention._decode_attention_op,
                                      cuda_gemv._cuda_gemv_op, cuda_attention._cuda_attention_op,
                                      *gluon_gemv.OPS.custom_ops, *gluon_mma.OPS.custom_ops)]


def register_fallbacks():
    """Gives inductor the kernels' ops as fallbacks up front, as it would make them on meeting each op. Left to
    inductor, torch 2.11 formats the op's arguments (eagerly, into a log line that is off) on its first call, and
    the text of an argument spells out every node it depends on: the quantized LM head, the last op of the decode
    graph, took longer than 10 minutes to print for a 32-layer model. torch 2.13 formats lazily."""
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    for op in opaque_ops():
        if op not in lowerings:
            make_fallback(op, layout_constraint=tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True)))


def set_sparsity(model, calib: Optional[Calibration], level: float, method: str = "greedy",
                 criterion: str = DEFAULT_CRITERION):
    """Decode at `level` from now on: the calibration's thresholds into the model's buffers (calib None: the
    thresholds stay as they are, e.g. set in-process by a benchmark) and the plan for the level (16-bit weights
    decode dense at 0: the NVRTC kernel on sm_90, cuBLAS elsewhere). Copies only: compiled steps and their CUDA graphs stay valid."""
    if calib is not None:
        apply_thresholds(model, calib, level, method, criterion)
    model.set_plan(model.plan.at_level(level))


def compile_step(fn: Callable, **kwargs) -> Callable:
    """torch.compile(fn, fullgraph=True, **kwargs) for a step that calls the kernels."""
    register_fallbacks()
    return torch.compile(fn, fullgraph=True, **kwargs)


class GraphStep:
    """A step recorded as a CUDA graph of its eager launches, without torch.compile. On the kernel path a decode
    step is a few opaque kernel launches per layer, and a graph replays them as the compiled step's graph does; the
    eager glue between them (the first norm, the head's, sampling) is not fused. Recording takes a fraction of a
    second where compiling takes seconds even from warm caches. One graph per (batch, key()): what the eager code
    branches on; inputs are copied into the graph's own tensors, and the output is the graph's (copy it)."""

    def __init__(self, fn: Callable, key: Callable):
        self.fn, self.key, self.graphs, self.pool = fn, key, {}, None

    def __call__(self, *inputs: Tensor) -> Tensor:
        k = (tuple(x.shape for x in inputs), self.key())
        if k not in self.graphs:
            self.graphs[k] = self._record(inputs)
        graph, static, out = self.graphs[k]
        for s, x in zip(static, inputs):
            s.copy_(x)
        graph.replay()
        return out

    def _record(self, inputs: tuple) -> tuple:
        static = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a first run off the graph: kernels are built or loaded, handles made
            self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # (the server's worker)
            out = self.fn(*static)
        self.pool = graph.pool()  # the graphs share their memory (only one runs at a time)
        return graph, static, out


SAMPLE_TOP = 1024  # the candidates top_k and top_p rank: a rule reaching past them keeps every token


def sample(logits: Tensor, params: Optional[Tensor] = None) -> Tensor:
    """logits [B, V] -> token ids [B, 1], without a host sync. params None: greedy; else float32 [3] on the logits'
    device: temperature (> 0), top_k (0: no limit), top_p (in (0, 1]). They are a tensor, not numbers, so that
    a compiled step serves every request's values with one graph."""
    if params is None:
        return logits.argmax(dim=-1, keepdim=True)
    temperature, top_k, top_p = params[0], params[1], params[2]
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    # top_k and top_p rank only the SAMPLE_TOP most likely tokens: a cumulative sum over the whole vocabulary
    # compiles to a split scan that inductor cannot fuse with the reductions around it
    top = torch.topk(probs, min(SAMPLE_TOP, probs.shape[-1]), dim=-1).values  # [B, T], descending
    rank = torch.arange(top.shape[-1], device=probs.device)
    keep = ((rank < top_k) | (top_k <= 0)) & (top.cumsum(dim=-1) - top < top_p)  # the first always
    # every token at least as likely as the least likely kept one (all of them when the rule keeps all T)
    floor = torch.where(keep, top, float("inf")).amin(dim=-1, keepdim=True)
    floor = torch.where(keep.all(dim=-1, keepdim=True), 0.0, floor)
    probs = torch.where(probs >= floor, probs, 0.0)
    # argmax(p / e) with e ~ Exp(1) samples from p without torch.multinomial's sync
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)


def sampling_params(temperature: float, top_k: Optional[int] = None, top_p: float = 1.0,
                    device=None) -> Optional[Tensor]:
    """sample()'s params for these settings (None: greedy, at temperature 0)."""
    if temperature <= 0:
        return None
    return torch.tensor([temperature, float(top_k or 0), top_p], dtype=torch.float32, device=device)


@dataclass
class GenStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class Generator:
    """Holds the model and its (optionally compiled) prefill and one-token decode step."""

    def __init__(self, model, compile: bool = False, temperature: float = 0.0, top_k: Optional[int] = None,
                 sparse_prefill_from: Optional[int] = None, top_p: float = 1.0, compile_prefill: bool = False,
                 graph: bool = False):
        """compile: the decode step through torch.compile (CUDA graphs on a GPU); compile_prefill: the prefill too
        (off by default, as in gpt-fast: its varying shapes cost a dynamic-shape compile, ~30 s on a 7B model even
        from warm caches, for a few ms per prompt). graph (CUDA): sparse decode steps (all kernels) recorded as a
        CUDA graph of the eager step (GraphStep) instead of compiled; dense steps as `compile` says."""
        self.model = model
        self.sparse_prefill_from = sparse_prefill_from  # None: dense prefill (TEAL's attention-sink rule)
        self.device = model.tok_embeddings.weight.device
        # sampling settings live in a tensor the steps read: new values are copied in, the graphs stay
        self.greedy, self.params = True, torch.tensor([1.0, 0.0, 1.0], device=self.device)
        self.set_sampling(temperature, top_k, top_p)
        self.prefill_step, self.decode_step = self._prefill, self._decode
        self.graph_step = None
        if graph and self.device.type == "cuda":
            # (a graph writes the caches it was recorded with: new caches, a new graph)
            self.graph_step = GraphStep(self._decode, lambda: (self.greedy, self.model.plan, self.model.rope.data_ptr(),
                                                               self.model.layers[0].attention.kv_cache.k.data_ptr()))
        if compile:
            cuda = self.device.type == "cuda"
            self.decode_step = compile_step(self._decode, mode="reduce-overhead" if cuda else None)
            if compile_prefill:
                self.prefill_step = compile_step(self._prefill, dynamic=True)
        self.compiled_prefill = compile and compile_prefill

    def set_sampling(self, temperature: float, top_k: Optional[int] = None, top_p: float = 1.0):
        """Greedy at temperature 0; else sample at this temperature from the top_k (None: all) most likely tokens
        within top_p of the mass. Greedy and sampled steps are two graphs, compiled once each."""
        params = sampling_params(temperature, top_k, top_p)
        self.greedy = params is None
        if params is not None:
            self.params.copy_(params)

    def _prefill(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        logits = self.model(idx, input_pos, sparse_from=self.sparse_prefill_from, all_logits=False)
        return sample(logits[:, -1], None if self.greedy else self.params)

    def _decode(self, cur: Tensor, input_pos: Tensor) -> Tensor:
        # the model's plan says whether decode steps apply thresholds: the compiled step is specialised on it, so
        # moving between 0 and a sparse level costs one more graph, not one per level
        logits = self.model(cur, input_pos, sparse_from=0 if self.model.plan.sparse_decode else None)
        return sample(logits[:, -1], None if self.greedy else self.params)

    def next_token(self, cur: Tensor, input_pos: Tensor) -> Tensor:
        """One decode step: a sparse one through the recorded graph (graph=True), else decode_step."""
        if self.graph_step is not None and self.model.plan.sparse_decode:
            return self.graph_step(cur, input_pos)
        return self.decode_step(cur, input_pos)

    def setup(self, batch: int, max_seq_len: int):
        self.model.setup_caches(batch, max_seq_len)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, stop_ids=(),
                 on_tokens: Optional[Callable[[list], bool]] = None, start: int = 0) -> tuple:
        """prompt [B, T] ids on the model's device -> (new ids [B, n], GenStats).

        start: positions 0 .. start-1 of the KV cache already hold the tokens before `prompt` (a conversation's
        earlier turns); only `prompt` is prefilled, at positions start .. start+T-1. The cache then holds the
        prompt and every new token but the last.

        on_tokens(list of B ids) is called as tokens reach the host, one step behind the GPU so that
        the next step is already queued; it may return True to stop. Without it nothing syncs until
        the end. Generation stops early once every row has produced a stop id.
        """
        B, T = prompt.shape
        if start + T + max_new_tokens > self.model.max_seq_len:
            raise UserError(f"prompt ({start + T} tokens) + {max_new_tokens} new tokens exceed the cache of "
                            f"{self.model.max_seq_len}")
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        stats = GenStats(prompt_tokens=T)
        sync()
        t0 = time.perf_counter()
        input_pos = torch.arange(start, start + T, device=self.device)
        tok = self.prefill_step(prompt, input_pos).clone()  # [B, 1]
        sync()
        stats.ttft_s = time.perf_counter() - t0
        out = [tok]
        stopped = torch.zeros(B, dtype=torch.bool)
        stop_ids = set(stop_ids)
        pending = self._to_host(tok) if on_tokens else None
        input_pos = torch.tensor([start + T], device=self.device, dtype=torch.long)
        t1 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            nxt = self.next_token(tok, input_pos).clone()
            input_pos += 1
            out.append(nxt)
            tok = nxt
            if on_tokens:
                ids = self._wait(pending)
                pending = self._to_host(nxt)
                stopped |= torch.tensor([i in stop_ids for i in ids])
                if on_tokens(ids) or bool(stopped.all()):
                    pending = None
                    break
        if on_tokens and pending is not None:
            ids = self._wait(pending)
            on_tokens(ids)
        sync()
        stats.decode_s = time.perf_counter() - t1
        new = torch.cat(out, dim=1)
        stats.new_tokens = new.shape[1]
        return new, stats

    def _to_host(self, tok: Tensor):
        if self.device.type != "cuda":
            return tok.view(-1).tolist()
        host = torch.empty(tok.numel(), dtype=tok.dtype, pin_memory=True)
        host.copy_(tok.view(-1), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return host, ev

    def _wait(self, pending) -> list:
        if isinstance(pending, list):
            return pending
        host, ev = pending
        ev.synchronize()
        return host.tolist()


def common_prefix(a: list, b: list) -> int:
    """How many leading ids two sequences share: the part of a new prompt whose keys and values a cache holding
    `a` can keep (generate.py's chat loop, the server)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bytes_per_token(args: ModelArgs, stats: dict, elem: int = 2, fmt: QuantFormat = FLOAT) -> float:
    """Weight bytes one decode step must read, given measured per-layer, per-projection sparsity: the kept rows of
    each sparse linear in its format, and all of its scales (every group is read at the sparsities measured); the
    LM head INT8 when the linears are quantized; the norms (the embedding: one row, not counted)."""
    shapes, total = args.linear_shapes(), 0.0
    for layer in range(args.n_layer):
        for proj, (k, n) in shapes.items():
            kept = 1 - stats.get((layer, proj), 0.0)
            bytes_per_weight = fmt.bits / 8 if fmt.quantized else elem
            total += kept * k * n * bytes_per_weight + fmt.scale_bytes(k, n)
    head = INT8 if fmt.quantized else None
    total += args.vocab_size * args.dim * (1 if head else elem) + (head.scale_bytes(args.dim, args.vocab_size)
                                                                   if head else 0)  # the LM head
    total += (2 * args.n_layer + 1) * args.dim * elem  # norms
    return total


def cache_bytes_per_token(args: ModelArgs, positions: float, elem: int = 2) -> float:
    """KV-cache bytes one decode step reads when it attends over `positions` cached positions (the sliding window's
    at most): every layer's keys and values of every KV head."""
    span = min(positions, args.sliding_window or positions)
    return 2 * args.n_layer * args.n_kv_head * args.head_dim * elem * span


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def decode_sparsity(model, seq: Tensor, n_prompt: int) -> dict:
    """{(layer, projection): share of zeroed inputs} of the decode steps of seq [1, T] (positions n_prompt on),
    measured on the reference path; {} when nothing was decoded."""
    if seq.shape[1] <= n_prompt:
        return {}
    return measure_sparsity(model, seq, sparse_from=n_prompt, start=n_prompt)


def linear_format(model) -> QuantFormat:
    """The weight format of the model's sparse linears (the LM head aside)."""
    return next((m.fmt for m in model.modules() if hasattr(m, "fmt") and not getattr(m, "head", False)), FLOAT)


def sparsity_report(model, stats: dict) -> str:
    """The decode sparsity the thresholds actually gave (decode_sparsity), per projection and model-wide."""
    if not stats:
        return "measured decode sparsity: no decoded tokens"
    pp = per_projection(stats)
    return ("measured decode sparsity " + " ".join(f"{p} {pp[p]:.2f}" for p in PROJECTIONS if p in pp)
            + f" | model-wide (parameter-weighted) {parameter_weighted(model, stats):.3f}")
