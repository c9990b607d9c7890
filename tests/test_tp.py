"""Tensor parallelism (tp.py) on CPUs: 2 processes over gloo against the single-process model."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from calibration import collect, column_norms, hist_quantiles, save_calibration
from checkpoint import read_metadata, save_checkpoint
from errors import UserError
from kernels.formats import quant_format
from loading import load_model, random_tensors
from model import ModelArgs
from plan import decode_plan
from quantization import quantize_model, save_quantized
from sparsity import (CALIB_FILE, CALIB_FORMAT, CRITERIA, PROJECTIONS, TARGETS, Calibration, apply_thresholds,
                      crit_key, load_calibration, measure_sparsity, parameter_weighted)
from tokenizer import byte_tokenizer_files
from tp import TP, check_split, file_slices, from_env, head_rows

REPO = Path(__file__).resolve().parents[1]
# o's and down's inputs (256) split into whole int4 groups of 128; a vocabulary of 301 does not split evenly
ARGS = dict(dim=128, n_layer=2, n_head=4, n_kv_head=2, head_dim=64, intermediate_size=256, vocab_size=301,
            max_seq_len=64)
PROMPT = torch.tensor([[5, 17, 3, 88, 41, 9, 63, 2, 77, 30, 11, 54]])
# (checkpoint, --quant, sparsity, kernel path)
CASES = [("untied", None, 0.0, False), ("untied", None, 0.5, False), ("tied", None, 0.5, False),
         ("untied", "int8", 0.5, False), ("untied", "int4", 0.5, False), ("tied", "int8", 0.5, True)]


def make_checkpoint(root: Path, tied: bool) -> Path:
    """A random fp32 checkpoint with a calibration from its own activations and quantized int8 / int4 files."""
    args = ModelArgs(**ARGS, tie_embeddings=tied)
    ckpt = root / ("tied" if tied else "untied")
    save_checkpoint(ckpt, args, random_tensors(args, torch.float32, seed=3), torch.float32)
    for name, content in byte_tokenizer_files(args.vocab_size).items():
        (ckpt / name).write_text(json.dumps(content) + "\n")
    model = load_model(ckpt)
    model.setup_caches(4, 64)
    norms = column_norms(model)
    hists, cats, _ = collect(model, [torch.randint(0, 101, (4, 64), generator=torch.Generator().manual_seed(1))], 4,
                             norms, 1)
    t = {f"quantiles.{crit_key(c)}": hist_quantiles(hists[c]) for c in CRITERIA}
    greedy = TARGETS.float()[None, :, None].expand(2, len(TARGETS), len(PROJECTIONS))
    t.update({f"greedy.{crit_key(c)}": greedy.contiguous() for c in CRITERIA})
    t.update({f"norms.{p}": norms[p] for p in PROJECTIONS})
    t["quantiles.cats"] = hist_quantiles(cats)
    save_calibration(Calibration(t, {"format": CALIB_FORMAT, "fingerprint": model.fingerprint}), ckpt / CALIB_FILE)
    for q in ("int8", "int4"):
        save_quantized(quantize_model(load_model(ckpt), quant_format(q)), ckpt, read_metadata(ckpt), quant_format(q))
    return ckpt


def run_case(ckpt: Path, quant, sparsity: float, kernels: bool, tp) -> dict:
    """Logits of a prefill (every position sparse after the first 4) and 3 decode steps, and the decode sparsity."""
    model = load_model(ckpt, "cpu", torch.float32, quant=quant_format(quant) if quant else None, tp=tp)
    if sparsity:
        apply_thresholds(model, load_calibration(model, ckpt / CALIB_FILE), sparsity, "uniform", "weight-aware")
    model.set_plan(decode_plan(torch.device("cpu"), sparsity=sparsity, kernels=kernels))
    model.setup_caches(1, 64)
    S = PROMPT.shape[1]
    with torch.no_grad():
        out = [model(PROMPT, torch.arange(S), sparse_from=4 if sparsity else None)[0]]
        for i, tok in enumerate((7, 19, 60)):
            out.append(model(torch.tensor([[tok]]), torch.tensor([S + i]))[0])
        stats = measure_sparsity(model, PROMPT, sparse_from=4, start=4) if sparsity else {}
    return {"logits": torch.cat(out), "sparsity": torch.tensor([parameter_weighted(model, stats) if stats else 0.0])}


def _worker(rank: int, world: int, port: int, root: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tp = from_env("cpu")
    assert tp.world == world and os.environ["NCCL_NVLS_ENABLE"] == "0"
    for i, (name, quant, sparsity, kernels) in enumerate(CASES):
        got = run_case(Path(root) / name, quant, sparsity, kernels, tp)
        if rank == 0:
            save_file(got, str(Path(root) / f"tp-{i}.safetensors"))
    # the decode step traces as one graph with its collectives in it: one all-reduce after o and after down of
    # each layer, one gather of the logits (what a CUDA graph then captures)
    model = load_model(Path(root) / "untied", "cpu", torch.float32, tp=tp)
    model.setup_caches(1, 64)
    graph = torch._dynamo.export(lambda t, p: model(t, p), aten_graph=False)(
        torch.zeros(1, 1, dtype=torch.long), torch.tensor([5])).graph_module.graph
    ops = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    if rank == 0:
        (Path(root) / "ops.txt").write_text("\n".join(ops))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    make_checkpoint(root, tied=False)
    make_checkpoint(root, tied=True)
    return root


def test_two_ranks_match_one_process(checkpoints):
    """fp32 logits of 2 gloo ranks = the single-process model's, dense and at 50%, float, int8 and int4 weights, a
    tied head, the reference and the kernel path; the decode sparsity counted over both ranks' slices."""
    mp.spawn(_worker, args=(2, free_port(), str(checkpoints)), nprocs=2, join=True)
    torch.set_num_threads(1)
    for i, (name, quant, sparsity, kernels) in enumerate(CASES):
        want = run_case(checkpoints / name, quant, sparsity, kernels, None)
        got = load_file(str(checkpoints / f"tp-{i}.safetensors"))
        assert got["logits"].shape == want["logits"].shape == (PROMPT.shape[1] + 3, 301)
        err = (got["logits"] - want["logits"]).abs().max() / want["logits"].abs().max()
        assert err < 1e-5, (CASES[i], err)
        assert abs(got["sparsity"].item() - want["sparsity"].item()) < 1e-9, CASES[i]
        if sparsity:
            assert 0.3 < want["sparsity"].item() < 0.7, (CASES[i], want["sparsity"])
    ops = (checkpoints / "ops.txt").read_text().splitlines()
    assert sum("all_reduce" in o for o in ops) == 2 * ARGS["n_layer"], ops
    assert sum("all_gather" in o for o in ops) == 1, ops


def test_shard_slices_of_each_tensor():
    a = ModelArgs(**ARGS)
    tp = TP(1, 2, None, torch.device("cpu"))
    q, kv = 256, 128
    assert file_slices("layers.0.attention.wqkv.weight", (128, q + 2 * kv), a, tp) == \
        (1, [(128, 256), (256 + 64, 256 + 128), (384 + 64, 384 + 128)])
    assert file_slices("layers.0.attention.wqkv.weight", (128, (q + 2 * kv) // 8), a, tp) == \
        (1, [(16, 32), (40, 48), (56, 64)])  # int4 words of 8 columns
    assert file_slices("layers.0.feed_forward.w13.scale", (2, 1, 512), a, tp) == (2, [(128, 256), (384, 512)])
    assert file_slices("layers.0.feed_forward.w2.weight", (256, 128), a, tp) == (0, [(128, 256)])
    assert file_slices("layers.0.feed_forward.w2.scale", (2, 2, 128), a, tp) == (1, [(1, 2)])  # int4 groups
    assert file_slices("layers.0.feed_forward.w2.scale", (128,), a, tp) is None  # int8: per output channel
    assert file_slices("layers.0.attention.wo.input_scale", (256,), a, tp) == (0, [(128, 256)])
    assert file_slices("layers.0.attention.wqkv.input_scale", (128,), a, tp) is None
    assert file_slices("output.weight", (301, 128), a, tp) == (0, [(151, 301)])  # padded to 151 rows
    assert file_slices("output.weight", (128, 301), a, tp) == (1, [(151, 301)])  # the int8 head, input-major
    assert file_slices("output.scale", (301,), a, tp) == (0, [(151, 301)])
    assert file_slices("tok_embeddings.weight", (301, 128), a, tp) is None
    assert head_rows(301, 2) == 151


def test_splits_that_do_not_fit_are_refused():
    check_split(ModelArgs(**ARGS), 2, quant_format("int4"))
    with pytest.raises(UserError, match="do not divide the model's 2 KV heads"):
        check_split(ModelArgs(**ARGS), 4)
    with pytest.raises(UserError, match="not whole int4 scale groups of 128"):
        check_split(ModelArgs(**{**ARGS, "n_kv_head": 4}), 4, quant_format("int4"))


def test_a_torchrun_rank_ends_without_finalization():
    """Under torchrun, run_cli flushes what main printed and exits with its code, skipping Python's finalization (where
    gloo's threads, freeing a finished collective's tensors, abort the process); outside torchrun it finalizes."""
    script = ("import atexit, sys; from cli import run_cli\n"
              "atexit.register(lambda: print('finalized', flush=True))\n"
              "print('out', end=''); print('err', end='', file=sys.stderr)\n"
              "run_cli(lambda: int(sys.argv[1]))\n")
    for world, code, want in (("2", 0, "out"), ("2", 3, "out"), ("1", 0, "outfinalized\n")):
        env = {**os.environ, "WORLD_SIZE": world, "PYTHONPATH": str(REPO)}
        r = subprocess.run([sys.executable, "-c", script, str(code)], env=env, capture_output=True, text=True,
                           timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (code, want, "err"), (world, code, r)


@pytest.mark.slow
def test_torchrun_generate_matches_one_process(checkpoints):
    """`torchrun --nproc-per-node 2 generate.py` prints what one process prints; 3 ranks: one line, non-zero."""
    cmd = ["generate.py", "--checkpoint", str(checkpoints / "untied"), "--sparsity", "0.5", "--max-new-tokens", "8",
           "--prompt", "abc", "--seed", "4", "--temperature", "0.8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]
    two = subprocess.run([*run, "2", "--master-port", str(free_port()), *cmd], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and two.stdout.startswith("abc")
    assert two.stderr.count("[sample 1]") == 1  # rank 0 reports
    bad = subprocess.run([*run, "3", "--master-port", str(free_port()), *cmd], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == \
        ["error: 3 ranks do not divide the model's 2 KV heads (grouped-query attention splits whole KV heads with "
         "their 2 query heads each): use a divisor of the KV heads"]


def _post(port: int, body: dict) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"ignore_eos": True, **body}  # (a random model's first token may be its end of text)
    c.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    return json.loads(r.read())


def _start_server(cmd: list, port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: Ctrl-C reaches every rank
    deadline = time.time() + 240
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the server did not start: " + proc.communicate()[1][-3000:])
        time.sleep(0.3)


@pytest.mark.slow
def test_torchrun_serve_answers_what_one_process_serves(checkpoints):
    """`torchrun --nproc-per-node 2 serve.py`: rank 0 serves, rank 1 decodes in step (server.follow); every answer
    equals the one-process server's: greedy and seeded sampling, a stop string cutting a reply short (rank 0 alone
    sees it), another level, a turn that reuses the KV cache, and requests after idle keep-alives; Ctrl-C ends all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    serve = ["serve.py", "--checkpoint", str(checkpoints / "untied"), "--sparsity", "0.5", "--max-seq-len", "64"]
    ports = free_port(), free_port()
    one = _start_server([sys.executable, *serve, "--port", str(ports[0])], ports[0], env)
    two = _start_server([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                         str(free_port()), *serve, "--port", str(ports[1]), "--heartbeat", "0.2"], ports[1], env)
    try:
        greedy = {"prompt": "abc", "max_tokens": 12, "temperature": 0}
        first = [_post(p, greedy) for p in ports]
        text = first[0]["choices"][0]["text"]
        assert first[1]["choices"][0]["text"] == text and len(text) > 3
        stop = text[len(text) // 2:len(text) // 2 + 1]
        hot = {"max_tokens": 40, "temperature": 1.5}  # sampled long and flat: any difference of logits shows
        bodies = [{**hot, "prompt": "abc", "seed": 7},
                  {**greedy, "stop": [stop]},
                  {**hot, "prompt": "abc", "seed": 3, "sparsity": 0.0},
                  {**hot, "max_tokens": 20, "prompt": "abc" + text[:3] + "d", "seed": 5},
                  {**hot, "prompt": "xyz", "seed": 9}]
        for i, body in enumerate(bodies):
            if i == len(bodies) - 1:
                time.sleep(1.0)  # keep-alives while idle
            got = [_post(p, body) for p in ports]
            assert got[1]["choices"] == got[0]["choices"], body
            assert got[1]["usage"] == got[0]["usage"], body
        assert len(got[0]["choices"][0]["text"]) > 0
        cut = [_post(p, {**greedy, "stop": [stop]}) for p in ports]
        assert all(c["choices"][0]["finish_reason"] == "stop" for c in cut) and stop not in cut[1]["choices"][0]["text"]
        reuse = [_post(p, {**hot, "max_tokens": 20, "prompt": "abcd", "seed": 5}) for p in ports]  # after "abc"
        assert reuse[1]["choices"] == reuse[0]["choices"]
        assert reuse[1]["usage"] == reuse[0]["usage"] and reuse[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        for proc in (one, two):
            os.killpg(proc.pid, signal.SIGINT)
        for proc in (one, two):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the server did not stop on Ctrl-C: " + proc.communicate()[1][-3000:])
