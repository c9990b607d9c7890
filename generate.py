"""Generate text with an activation-sparse Llama/Mistral model.

    python generate.py                                   # embedded SmolLM2-135M-Instruct
    python generate.py --checkpoint CKPT --prompt "..." --sparsity 0.5 --compile
    torchrun --nproc-per-node N generate.py --checkpoint CKPT --sparsity 0.5   # tensor parallel over N GPUs (tp.py)
"""
import argparse
import contextlib
import os
import random
import sys
import time

import torch

from cli import (HelpFormatter, add_compile_args, add_model_args, add_quant_arg, add_sparsity_args, load_from_args,
                 pick_device, run_cli)
from engine import (Generator, bytes_per_token, common_prefix, decode_sparsity, linear_format, peak_memory_gb,
                    set_sparsity, sparsity_report)
from plan import decode_plan
from errors import UserError
from sparsity import CALIB_FILE, apply_thresholds, load_calibration
from tokenizer import StreamDecoder
from tp import close, from_env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    add_quant_arg(p)
    p.add_argument("--prompt", default="The capital of France is", help="the text to continue (or, with --chat, "
                   "the user message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat and --interactive")
    p.add_argument("--interactive", action="store_true",
                   help="chat loop (/help lists its commands; /sparsity S changes the level)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (at most)")
    p.add_argument("--num-samples", type=int, default=1, help="how many times to generate from the prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens only "
                   "(default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this "
                   "share of the probability (nucleus sampling; 1 keeps all)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: unseeded)")
    p.add_argument("--sparsity", type=float, default=0.0, help="model-wide activation sparsity in [0, 1)")
    add_sparsity_args(p)
    add_compile_args(p)
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: what the run needs)")
    a = p.parse_args(argv)
    if not 0.0 <= a.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if a.max_new_tokens < 1 or a.num_samples < 1:
        raise UserError("--max-new-tokens and --num-samples must be at least 1")
    if a.temperature < 0 or (a.top_k is not None and a.top_k < 1) or not 0 < a.top_p <= 1:
        raise UserError("--temperature must be >= 0, --top-k >= 1 and --top-p in (0, 1]")
    if a.max_seq_len is not None and a.max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2, got {a.max_seq_len}")
    if a.sparse_prefill_from is not None and a.sparse_prefill_from < 0:
        raise UserError(f"--sparse-prefill-from must be >= 0, got {a.sparse_prefill_from}")
    if not a.interactive and not a.prompt:
        raise UserError("--prompt is empty: give the text to continue")
    tp = from_env(pick_device(a.device).type)  # under torchrun: this rank's slices of the model
    if tp is not None and a.interactive:
        raise UserError("--interactive reads one terminal: run it in one process, without torchrun")
    seed = a.seed
    if tp is not None and seed is None:  # the ranks sample alike from the same logits: rank 0's seed for all
        seed = int(tp.sum_values([random.getrandbits(31) if tp.rank == 0 else 0])[0])
    if seed is not None:
        torch.manual_seed(seed)
    with contextlib.ExitStack() as quiet:
        if tp is not None and tp.rank > 0:  # rank 0 prints; the others run the same steps silently
            devnull = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        out = run(a, tp)
    close(tp)
    return out


def run(a, tp):
    ckpt, model, tok, device = load_from_args(a, mlp=a.mlp, tp=tp)
    # --sparsity needs the calibration; --interactive loads it when there is one, for /sparsity
    calib = None
    if a.sparsity > 0 or (a.interactive and (ckpt / CALIB_FILE).exists()):
        calib = load_calibration(model, ckpt / CALIB_FILE)
        apply_thresholds(model, calib, a.sparsity, a.sparsity_method, a.criterion)
    compile_ = device.type == "cuda" if a.compile is None else a.compile
    graph = a.graph and device.type == "cuda" and tp is None  # tensor parallel: the compiled step (its collectives)
    model.set_plan(decode_plan(device, sparsity=a.sparsity))  # the kernels on a GPU, the reference path on a CPU
    gen = Generator(model, compile=compile_, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    sparse_prefill_from=a.sparse_prefill_from, compile_prefill=compile_ and a.compile_prefill,
                    graph=graph)

    if a.interactive:
        return chat_loop(gen, tok, a, calib)
    ids = tok.encode_chat(([{"role": "system", "content": a.system}] if a.system else [])
                          + [{"role": "user", "content": a.prompt}]) if a.chat else tok.encode(a.prompt)
    max_seq = a.max_seq_len or round_up(len(ids) + a.max_new_tokens, 64)
    if len(ids) + a.max_new_tokens > model.args.max_seq_len:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} exceed the model's "
                        f"context of {model.args.max_seq_len} tokens")
    if len(ids) + a.max_new_tokens > max_seq:  # said before the prompt is echoed
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} exceed --max-seq-len "
                        f"{max_seq}")
    gen.setup(1, min(max_seq, model.args.max_seq_len))
    prompt = torch.tensor([ids], device=device)
    if compile_ or graph:  # compile (and record the CUDA graphs) before the first sample: it reports real speed
        t0 = time.perf_counter()
        gen.generate(prompt, min(a.max_new_tokens, 4))
        what = "the decode step" + (" (a CUDA graph of its kernel launches)" if graph and model.plan.sparse_decode
                                    else "")
        what = f"the prefill of {len(ids)} tokens and {what}" if gen.compiled_prefill else what
        print(f"[compiled in {time.perf_counter() - t0:.1f} s: {what}]", file=sys.stderr)
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
        seq = torch.cat([prompt, new], 1)
        stats = decode_sparsity(model, seq, len(ids)) if model.plan.sparse_decode else {}
        nbytes = bytes_per_token(model.args, stats, model.tok_embeddings.weight.element_size(), linear_format(model))
        print(f"\n[sample {i + 1}] prompt {st.prompt_tokens} tokens, generated {st.new_tokens} | "
              f"time to first token {st.ttft_s * 1e3:.1f} ms | decode {st.decode_tok_s:.1f} tok/s | "
              f"{nbytes * st.decode_tok_s / 1e9:.1f} GB/s of weights read | peak memory "
              f"{peak_memory_gb(device):.2f} GB", file=sys.stderr)
        if a.sparsity > 0:
            print(sparsity_report(model, stats), file=sys.stderr)


CHAT_HELP = """commands:
  /sparsity S   decode at sparsity S in [0, 1) from the next reply on (needs the checkpoint's calibration)
  /reset        start a new conversation (the system prompt stays)
  /help         this list
An empty line or Ctrl-D ends the chat; Ctrl-C stops a reply and returns to the prompt."""


def chat_loop(gen: Generator, tok, a, calib):
    """The conversation stays in the KV cache: each turn prefills only what the chat template adds after the
    tokens already cached (the new user message, and whatever the template writes around the last reply)."""
    model = gen.model
    if not tok.has_chat:
        raise UserError("this model has no chat template; --interactive needs an instruct model")
    gen.setup(1, a.max_seq_len or min(model.args.max_seq_len, 4096))
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages, cached = list(system), []  # cached: the ids whose keys and values the cache holds, in order
    print(f"chat at sparsity {a.sparsity:.2f}: /help lists the commands, an empty line or Ctrl-D ends",
          file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not line:
            break
        if line.startswith("/"):
            command = line.split()[0]
            if command == "/sparsity":
                set_level(gen, calib, line, a)
            elif command == "/reset":
                messages, cached = list(system), []
                print("new conversation", file=sys.stderr)
            else:
                print(CHAT_HELP if command == "/help" else f"unknown command {command}; /help lists them",
                      file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tok.encode_chat(messages)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        budget = model.max_seq_len - len(ids)
        if budget < 2:
            print("error: the conversation no longer fits the cache; /reset starts a new one", file=sys.stderr)
            messages.pop()
            continue
        reuse = common_prefix(cached, ids[:-1])  # at least one token to prefill: it gives the first new one
        stream = StreamDecoder(tok, ids)
        reply = []

        def show(tokens):
            if tokens[0] in tok.stop_ids:
                return True
            reply.append(tokens[0])
            print(stream.push(tokens[0]), end="", flush=True)
            return False

        try:
            new, st = gen.generate(torch.tensor([ids[reuse:]], device=gen.device), min(a.max_new_tokens, budget),
                                   tok.stop_ids, on_tokens=show, start=reuse)
        except KeyboardInterrupt:  # the cache holds an unknown part of this turn: the next one prefills again
            print("\n[stopped]", file=sys.stderr)
            cached = []
        else:
            cached = ids + new[0, :-1].tolist()
            print(f"\n[prefilled {st.prompt_tokens} of {len(ids)} tokens | {st.decode_tok_s:.1f} tok/s]",
                  file=sys.stderr)
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
        set_sparsity(gen.model, calib, level, a.sparsity_method, a.criterion)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return
    a.sparsity = level
    print(f"sparsity {level:.2f} ({a.sparsity_method}, {a.criterion})", file=sys.stderr)


def round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        run_cli(main)
