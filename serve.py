"""An OpenAI-compatible HTTP server: the model is loaded and compiled once, then requests are served in order, one at
a time (batch 1), each at the sparsity level it asks for.

    python serve.py                                          # the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    python serve.py --checkpoint CKPT --sparsity 0.5 --quant int8 --port 8000
    torchrun --nproc-per-node N serve.py --checkpoint CKPT --sparsity 0.5      # tensor parallel over N GPUs (tp.py)

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming or not), GET /v1/models, GET /health.
Beyond OpenAI's fields a request may give `sparsity` (in [0, 1); thresholds are buffers, so no level recompiles),
`sparsity_method`, `criterion`, `top_k` and `ignore_eos`; responses echo the level served. A request that extends
the previous conversation prefills only what follows the tokens still in the KV cache
(usage.prompt_tokens_details.cached_tokens says how many were reused). Under torchrun rank 0 serves HTTP and the
other ranks decode in step with it (server.py).
"""
import argparse
import sys
import time

import uvicorn

from cli import (HelpFormatter, add_compile_args, add_model_args, add_quant_arg, add_sparsity_args, load_from_args,
                 pick_device, run_cli)
from engine import Generator
from errors import UserError
from plan import decode_plan
from server import Service, Worker, follow, make_app
from sparsity import CALIB_FILE, apply_thresholds, load_calibration
from tp import close, from_env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    add_quant_arg(p)
    p.add_argument("--sparsity", type=float, default=0.0, help="the level served when a request names none, "
                   "in [0, 1)")
    add_sparsity_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length: prompt + reply of one request "
                   "(at most the model's context)")
    add_compile_args(p)
    p.add_argument("--name", default=None, help="the model's name in the API (default: the checkpoint directory's)")
    p.add_argument("--heartbeat", type=float, default=30.0, help="under torchrun: seconds between the keep-alive "
                   "messages an idle rank 0 sends the other ranks (their waits time out otherwise)")
    a = p.parse_args(argv)
    if not 0.0 <= a.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if not 0 <= a.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {a.port}")
    if a.max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2, got {a.max_seq_len}")
    if not a.heartbeat > 0:
        raise UserError(f"--heartbeat must be positive, got {a.heartbeat}")
    tp = from_env(pick_device(a.device).type)  # under torchrun: this rank's slices of the model
    try:
        serve(a, tp)
    finally:
        close(tp)


def serve(a, tp):
    ckpt, model, tok, device = load_from_args(a, mlp=a.mlp, tp=tp)
    calib = load_calibration(model, ckpt / CALIB_FILE) if (ckpt / CALIB_FILE).exists() else None
    if a.sparsity > 0:
        if calib is None:
            raise UserError(f"--sparsity {a.sparsity} needs {ckpt / CALIB_FILE}: run `python calibrate.py "
                            f"--checkpoint {ckpt}`")
        apply_thresholds(model, calib, a.sparsity, a.sparsity_method, a.criterion)
    model.set_plan(decode_plan(device, sparsity=a.sparsity))
    compile_ = device.type == "cuda" if a.compile is None else a.compile
    graph = a.graph and device.type == "cuda" and tp is None  # tensor parallel: the compiled step (its collectives)
    gen = Generator(model, compile=compile_, sparse_prefill_from=a.sparse_prefill_from,
                    compile_prefill=compile_ and a.compile_prefill, graph=graph)
    max_seq = min(a.max_seq_len, model.args.max_seq_len)
    gen.setup(1, max_seq)
    setting = (a.sparsity, a.sparsity_method, a.criterion)
    if tp is not None and tp.rank > 0:
        follow(gen, calib, setting, tp)
        return
    worker = Worker(gen, tok, calib, *setting, max_seq, tp=tp, heartbeat=a.heartbeat)
    try:
        if compile_ or graph:
            t0 = time.perf_counter()
            worker.warm_up(tok.encode("Hello"))
            print(f"[compiled in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        service = Service(worker, tok, a.name or ckpt.resolve().name)
        where = f", tensor parallel over {tp.world} ranks" if tp is not None else ""
        print(f"serving {service.model_id} on http://{a.host}:{a.port} (sparsity {a.sparsity:.2f}, "
              f"{'calibrated' if calib is not None else 'no calibration: dense only'}, context {max_seq}{where})",
              file=sys.stderr, flush=True)
        uvicorn.run(make_app(service), host=a.host, port=a.port, log_level="warning")
    finally:
        worker.close()  # the other ranks' follow() returns


if __name__ == "__main__":
    run_cli(main)
