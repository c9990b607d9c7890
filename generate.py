"""Generate text with an activation-sparse Llama/Mistral model.

    python generate.py                                   # embedded SmolLM2-135M-Instruct
    python generate.py --checkpoint CKPT --prompt "..." --sparsity 0.5 --compile
"""
import argparse
import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from checkpoint import default_checkpoint, load_model, parse_dtype
from errors import UserError, run_cli
from quantize import SCHEMES
from sparsity import (CALIB_FILE, CRITERIA, METHODS, PROJECTIONS, apply_thresholds, load_calibration,
                      measure_sparsity, parameter_weighted, per_projection)
from tokenizer import StreamDecoder, load_tokenizer


def sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    """logits [B, V] -> token ids [B, 1], without a host sync."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / e) with e ~ Exp(1) samples from p without torch.multinomial's sync
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)


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
                 sparse_prefill_from: Optional[int] = None, sparse: bool = True):
        self.model, self.temperature, self.top_k = model, temperature, top_k
        self.sparse_prefill_from = sparse_prefill_from  # None: dense prefill (TEAL's attention-sink rule)
        # False: decode dense, projections through cuBLAS (a sparse kernel at zero thresholds is slower); the
        # compiled step is specialised on it, so switching costs one more graph, not one per level
        self.sparse = sparse
        self.device = model.tok_embeddings.weight.device
        self.prefill_step, self.decode_step = self._prefill, self._decode
        if compile:
            cuda = self.device.type == "cuda"
            self.decode_step = torch.compile(self._decode, fullgraph=True, mode="reduce-overhead" if cuda else None)
            self.prefill_step = torch.compile(self._prefill, fullgraph=True, dynamic=True)

    def _prefill(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        logits = self.model(idx, input_pos, sparse_from=self.sparse_prefill_from, all_logits=False)
        return sample(logits[:, -1], self.temperature, self.top_k)

    def _decode(self, cur: Tensor, input_pos: Tensor) -> Tensor:
        logits = self.model(cur, input_pos, sparse_from=0 if self.sparse else None)
        return sample(logits[:, -1], self.temperature, self.top_k)

    def setup(self, batch: int, max_seq_len: int):
        self.model.setup_caches(batch, max_seq_len)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, stop_ids=(),
                 on_tokens: Optional[Callable[[list], bool]] = None) -> tuple:
        """prompt [B, T] ids on the model's device -> (new ids [B, n], GenStats).

        on_tokens(list of B ids) is called as tokens reach the host, one step behind the GPU so that
        the next step is already queued; it may return True to stop. Without it nothing syncs until
        the end. Generation stops early once every row has produced a stop id.
        """
        B, T = prompt.shape
        if T + max_new_tokens > self.model.max_seq_len:
            raise UserError(f"prompt ({T} tokens) + {max_new_tokens} new tokens exceed the cache of "
                            f"{self.model.max_seq_len}")
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        stats = GenStats(prompt_tokens=T)
        sync()
        t0 = time.perf_counter()
        input_pos = torch.arange(T, device=self.device)
        tok = self.prefill_step(prompt, input_pos).clone()  # [B, 1]
        sync()
        stats.ttft_s = time.perf_counter() - t0
        out = [tok]
        stopped = torch.zeros(B, dtype=torch.bool)
        stop_ids = set(stop_ids)
        pending = self._to_host(tok) if on_tokens else None
        input_pos = torch.tensor([T], device=self.device, dtype=torch.long)
        t1 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            nxt = self.decode_step(tok, input_pos).clone()
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


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads when dense: every parameter and quantization scale, but not the
    embedding table (one row of it is read) unless it doubles as the LM head."""
    emb = model.tok_embeddings.weight
    scales = [b for n, b in model.named_buffers() if n.endswith(".scale")]
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *scales))
    return total - (0 if model.output.weight is emb else emb.numel() * emb.element_size())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None


def add_model_args(p: argparse.ArgumentParser):
    """Flags shared by the CLIs that load a model."""
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="CKPT directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float16, bfloat16, float32")


def kernel_step(sparsity: float, quant: Optional[str]) -> bool:
    """Whether decode steps take the sparse kernels (Generator.sparse): dense 16-bit weights decode through cuBLAS,
    quantized ones through the kernels, whose zero thresholds are dense."""
    return sparsity > 0 or quant is not None


def add_quant_arg(p: argparse.ArgumentParser):
    p.add_argument("--quant", choices=sorted(SCHEMES), default=None,
                   help="weight-only quantization of the sparse linears (quantize.py, RTN: int8 per output "
                        "channel, int4 per group of 128 inputs) and the LM head (int8)")


def load_from_args(args, mlp: str = "teal"):
    device = pick_device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else parse_dtype(args.dtype)
    ckpt = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    model = load_model(ckpt, device, dtype, mlp=mlp, quant=getattr(args, "quant", None))
    return ckpt, model, load_tokenizer(ckpt), device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_arg(p)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat and --interactive")
    p.add_argument("--interactive", action="store_true", help="chat loop; /sparsity S changes the level")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--sparsity", type=float, default=0.0, help="model-wide activation sparsity in [0, 1)")
    add_sparsity_args(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on for CUDA, off for CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: what the run needs)")
    a = p.parse_args(argv)
    if not 0.0 <= a.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if a.max_new_tokens < 1 or a.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be at least 1")
    if a.temperature < 0 or (a.top_k is not None and a.top_k < 1):
        raise UserError("--temperature must be >= 0 and --top-k >= 1")
    if a.seed is not None:
        torch.manual_seed(a.seed)

    ckpt, model, tok, device = load_from_args(a, mlp=a.mlp)
    # --sparsity needs the calibration; --interactive loads it when there is one, for /sparsity
    calib = None
    if a.sparsity > 0 or (a.interactive and (ckpt / CALIB_FILE).exists()):
        calib = load_calibration(model, ckpt / CALIB_FILE)
        apply_thresholds(model, calib, a.sparsity, a.sparsity_method, a.criterion)
    compile_ = device.type == "cuda" if a.compile is None else a.compile
    if device.type == "cuda":
        model.enable_kernels()
    gen = Generator(model, compile=compile_, temperature=a.temperature, top_k=a.top_k,
                    sparse_prefill_from=a.sparse_prefill_from, sparse=kernel_step(a.sparsity, a.quant))

    if a.interactive:
        return chat_loop(gen, tok, a, calib)
    ids = tok.encode_chat(([{"role": "system", "content": a.system}] if a.system else [])
                          + [{"role": "user", "content": a.prompt}]) if a.chat else tok.encode(a.prompt)
    max_seq = a.max_seq_len or round_up(len(ids) + a.max_new_tokens, 64)
    if len(ids) + a.max_new_tokens > model.args.max_seq_len:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} exceed the model's "
                        f"context of {model.args.max_seq_len} tokens")
    gen.setup(1, min(max_seq, model.args.max_seq_len))
    prompt = torch.tensor([ids], device=device)
    nbytes = weight_bytes(model)
    for i in range(a.num_samples):
        stream = StreamDecoder(tok, ids)
        print(a.prompt if not a.chat else "", end="", flush=True)

        def show(tokens):
            if tokens[0] in tok.stop_ids:
                return True
            print(stream.push(tokens[0]), end="", flush=True)
            return False

        new, st = gen.generate(prompt, a.max_new_tokens, tok.stop_ids, on_tokens=show)
        print()
        note = " (includes compilation)" if compile_ and i == 0 else ""
        print(f"\n[sample {i + 1}]{note} prompt {st.prompt_tokens} tokens, generated {st.new_tokens} | "
              f"time to first token {st.ttft_s * 1e3:.1f} ms | decode {st.decode_tok_s:.1f} tok/s | "
              f"{nbytes * st.decode_tok_s / 1e9:.1f} GB/s of weights | peak memory {peak_memory_gb(device):.2f} GB",
              file=sys.stderr)
        if a.sparsity > 0:
            print(sparsity_report(model, torch.cat([prompt, new], 1), len(ids)), file=sys.stderr)


def sparsity_report(model, seq: Tensor, n_prompt: int) -> str:
    """The decode sparsity the thresholds actually give on this text, per projection and model-wide."""
    if seq.shape[1] <= n_prompt:
        return "measured decode sparsity: no decoded tokens"
    stats = measure_sparsity(model, seq, sparse_from=n_prompt, start=n_prompt)
    pp = per_projection(stats)
    return ("measured decode sparsity " + " ".join(f"{p} {pp[p]:.2f}" for p in PROJECTIONS if p in pp)
            + f" | model-wide (parameter-weighted) {parameter_weighted(model, stats):.3f}")


def add_sparsity_args(p: argparse.ArgumentParser):
    p.add_argument("--sparsity-method", choices=METHODS, default="greedy",
                   help="uniform: every projection at the target; greedy: TEAL's block-wise allocation")
    p.add_argument("--criterion", choices=CRITERIA, default="weight-aware",
                   help="magnitude: |x_i| > t; weight-aware: |x_i|·‖W[i,:]‖ > t")
    p.add_argument("--mlp", choices=("teal", "cats"), default="teal",
                   help="cats: threshold |silu(gate)| and compute only the passing rows of up (ablation)")
    p.add_argument("--sparse-prefill-from", type=int, default=None, metavar="N",
                   help="sparsify the prompt too, except its first N tokens (default: dense prefill)")


def chat_loop(gen: Generator, tok, a, calib):
    model = gen.model
    if tok.chat_format is None:
        raise UserError("this model has no chat template; --interactive needs an instruct model")
    gen.setup(1, a.max_seq_len or min(model.args.max_seq_len, 4096))
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("chat: an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line.startswith("/sparsity"):
            set_level(gen, calib, line, a)
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode_chat(messages)
        budget = model.max_seq_len - len(ids)
        if budget < 2:
            print("error: the conversation no longer fits the cache; start again", file=sys.stderr)
            messages = messages[:1] if a.system else []
            continue
        stream = StreamDecoder(tok, ids)
        reply = []

        def show(tokens):
            if tokens[0] in tok.stop_ids:
                return True
            reply.append(tokens[0])
            print(stream.push(tokens[0]), end="", flush=True)
            return False

        _, st = gen.generate(torch.tensor([ids], device=gen.device), min(a.max_new_tokens, budget),
                             tok.stop_ids, on_tokens=show)
        print(f"\n[{st.decode_tok_s:.1f} tok/s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def set_level(gen: Generator, calib, line: str, a):
    """`/sparsity S`: new thresholds are copied into the buffers; nothing is recompiled or re-captured, except
    once on the first move between 0 (dense decode) and a sparse level."""
    try:
        level = float(line.split()[1])
        if not 0 <= level < 1:
            raise ValueError
    except (IndexError, ValueError):
        print("usage: /sparsity S with S in [0, 1)", file=sys.stderr)
        return
    if calib is None:
        print(f"no calibration for this checkpoint: run `python calibrate.py --checkpoint {a.checkpoint}`",
              file=sys.stderr)
        return
    try:
        apply_thresholds(gen.model, calib, level, a.sparsity_method, a.criterion)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return
    gen.sparse = kernel_step(level, a.quant)
    a.sparsity = level
    print(f"sparsity {level:.2f} ({a.sparsity_method}, {a.criterion})", file=sys.stderr)


def round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        run_cli(main)
