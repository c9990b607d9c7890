"""serve.py's speed through HTTP next to the same decode in-process (random weights of a real shape). Needs a GPU.

    python scripts/bench_server.py [--model llama-2-7b] [--sparsities 0,0.5] [--quant int8] [--json]

The server runs in this process as serve.py runs it (uvicorn's event loop on one thread, the decode worker on
another, the steps compiled with CUDA graphs); the client is a separate process that streams completions over
HTTP and times the chunks as they arrive. Per level, after a warm-up:
- in-process: Generator.generate on the worker's thread, 256 greedy tokens after a 128-token prompt, median of 3;
- through HTTP: the same request streamed (prompt as token ids, temperature 0, ignore_eos), median of 3:
  decode tok/s from the chunks' arrival times, and time to first token of a 128-token and of an 8-token prompt
  (request sent -> first text chunk received).
Thresholds are set from the prompt's activations as in scripts/bench.py. The tokenizer is a word-level one over
the model's vocabulary (one "word" per id): detokenising costs what a real one costs per token.
"""
import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from cli import HelpFormatter, add_quant_arg, run_cli, sparsity_list
from engine import Generator, set_sparsity
from errors import UserError
from kernels.formats import quant_format
from loading import random_model
from model import CONFIGS, ModelArgs
from plan import decode_plan
from quantization import quantize_model
from server import Service, Worker, make_app
from sparsity import capture_inputs, set_uniform_thresholds
from tokenizer import load_tokenizer

CLIENT = r"""
import http.client, json, sys, time
port, body, runs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = []
for _ in range(runs):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    times, buf = [], b""
    while True:
        line = r.fp.readline()
        if not line:
            break
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["text"]:
                times.append(time.perf_counter())
    n = len(times)
    out.append({"ttft_s": times[0] - t0, "chunks": n,
                "decode_tok_s": (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0})
print(json.dumps(out))
"""


def word_tokenizer(vocab: int, folder: Path) -> Path:
    tok = HFTokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(port: int, ids: list, new_tokens: int, runs: int) -> list:
    body = json.dumps({"prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True})
    r = subprocess.run([sys.executable, "-c", CLIENT, str(port), body, str(runs)], capture_output=True, text=True,
                       timeout=900)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help=f"one of {', '.join(CONFIGS)}")
    p.add_argument("--sparsities", default="0,0.5", help="comma-separated levels")
    add_quant_arg(p)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--runs", type=int, default=3, help="timed runs per level and path")
    p.add_argument("--json", action="store_true", help="print the records as the last line")
    a = p.parse_args()
    args = ModelArgs.from_name(a.model)
    levels = sparsity_list(a.sparsities, "--sparsities")
    if not torch.cuda.is_available():
        raise UserError("bench_server.py needs a CUDA GPU")

    model = random_model(args, "cuda", torch.bfloat16, seed=0)
    fmt = quant_format(a.quant)
    if fmt.quantized:
        quantize_model(model, fmt)
    model.set_plan(decode_plan(torch.device("cuda")))
    prompt = torch.randint(3, args.vocab_size, (1, a.prompt_len), device="cuda")
    captured = capture_inputs(model, prompt)
    gen = Generator(model, compile=True)
    max_seq = a.prompt_len + a.new_tokens + 64
    gen.setup(1, max_seq)
    tok = load_tokenizer(word_tokenizer(args.vocab_size, Path(tempfile.mkdtemp())))
    worker = Worker(gen, tok, None, 0.0, "uniform", "magnitude", max_seq)
    service = Service(worker, tok, a.model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    ids = prompt[0].tolist()
    records = []
    for s in levels:
        set_uniform_thresholds(model, captured, s)
        set_sparsity(model, None, s)
        service.default = worker.setting = (s, "uniform", "magnitude")  # what requests echo back
        t0 = time.perf_counter()
        worker.warm_up(ids)
        compile_s = time.perf_counter() - t0

        def in_process():
            gen.set_sampling(0.0)
            speeds = []
            for _ in range(a.runs + 1):
                worker.cached = []  # as a new conversation through HTTP: the whole prompt prefilled
                _, st = gen.generate(prompt, a.new_tokens)
                speeds.append(st.decode_tok_s)
            return statistics.median(speeds[1:]), st.ttft_s

        local, local_ttft = worker.call(in_process)
        client(port, ids, 16, 1)  # warm-up of the HTTP path
        http = []
        for _ in range(a.runs):  # each request a new prompt: no reuse of the cache
            worker.call(lambda: setattr(worker, "cached", []))
            http += client(port, ids, a.new_tokens, 1)
        short = client(port, ids[:8], 16, 3)
        rec = {"model": a.model, "quant": a.quant or "none", "sparsity": s, "in_process_tok_s": round(local, 1),
               "http_tok_s": round(statistics.median(r["decode_tok_s"] for r in http), 1),
               "http_ttft_ms": round(statistics.median(r["ttft_s"] for r in http) * 1e3, 1),
               "in_process_ttft_ms": round(local_ttft * 1e3, 1),
               "http_ttft_short_prompt_ms": round(statistics.median(r["ttft_s"] for r in short) * 1e3, 1),
               "chunks": http[0]["chunks"], "warm_up_s": round(compile_s, 1), "gpu": torch.cuda.get_device_name()}
        rec["http_over_in_process"] = round(rec["http_tok_s"] / rec["in_process_tok_s"], 3)
        records.append(rec)
        print(f"  {a.model} s={s:.2f}: in-process {rec['in_process_tok_s']:.1f} tok/s, through HTTP "
              f"{rec['http_tok_s']:.1f} tok/s ({rec['http_over_in_process'] * 100:.1f}%), first token "
              f"{rec['http_ttft_short_prompt_ms']:.1f} ms (8-token prompt) / {rec['http_ttft_ms']:.1f} ms "
              f"({a.prompt_len} tokens)", flush=True)
    server.should_exit = True
    if a.json:
        print(json.dumps(records))


if __name__ == "__main__":
    run_cli(main)
