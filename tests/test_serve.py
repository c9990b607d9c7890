"""serve.py: a server on 127.0.0.1 with the default model (CPU), called through the `openai` client and raw HTTP;
answers compared with the in-process Generator; multi-turn cache reuse; bad requests; a client leaving mid-stream;
concurrent clients. Also the stop-string cutter on its own."""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from default_model import default_checkpoint
from engine import Generator
from loading import load_model
from plan import decode_plan
from server import StopText
from sparsity import CALIB_FILE, DEFAULT_CRITERION, apply_thresholds, load_calibration
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    # as many threads as this process (conftest): the CPU matmuls then sum in the same order, and a sparse answer
    # cannot part from the local one at a near-tie of an input and its threshold
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--max-seq-len",
                             str(CONTEXT), "--name", "smol"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while True:
        try:
            if get(port, "/health")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the server did not start: " + proc.communicate()[1][-3000:])
        time.sleep(0.3)
    yield port, proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def local():
    """The same model in this process: what the server must answer."""
    ckpt = default_checkpoint()
    model = load_model(ckpt, "cpu", torch.float32)
    model.set_plan(decode_plan(torch.device("cpu")))
    gen = Generator(model)
    gen.setup(1, CONTEXT)
    return gen, load_tokenizer(ckpt), load_calibration(model, ckpt / CALIB_FILE)


def greedy_text(local, ids, n, level=0.0):
    gen, tok, calib = local
    apply_thresholds(gen.model, calib, level, "greedy", DEFAULT_CRITERION)  # what a request naming none gets
    gen.model.set_plan(gen.model.plan.at_level(level))
    new, _ = gen.generate(torch.tensor([ids]), n, tok.stop_ids)
    new = new[0].tolist()
    cut = next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))
    return tok.decode(new[:cut]), cut < len(new)


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, json.loads(r.read())


def post(port, path, body, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]


def test_openai_client_chat_stream_and_completions_answer_what_the_engine_does(server, local):
    port, _ = server
    c = client(port)
    assert [m.id for m in c.models.list().data] == ["smol"]
    tok = local[1]
    want, stopped = greedy_text(local, tok.encode_chat(CHAT), 12)

    r = c.chat.completions.create(model="smol", messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(tok.encode_chat(CHAT)) and 1 <= r.usage.completion_tokens <= 12
    assert r.model_extra["sparsity"] == 0.0

    chunks = list(c.chat.completions.create(model="smol", messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason

    prompt = "The capital of France is"
    want, _ = greedy_text(local, tok.encode(prompt), 10)
    r = c.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(tok.encode(prompt))
    streamed = c.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want

    # a level per request (the embedded model ships its calibration): the engine's answer at that level
    want5, _ = greedy_text(local, tok.encode(prompt), 10, level=0.5)
    r = c.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0, extra_body={"sparsity": 0.5})
    assert r.choices[0].text == want5 and r.model_extra["sparsity"] == 0.5
    r = c.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.model_extra["sparsity"] == 0.0

    # stop strings cut the text before them; sampling with a seed repeats
    stop = want[len(want) // 2:len(want) // 2 + 3]
    r = c.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].text == want[:want.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="smol", prompt=prompt, max_tokens=16, temperature=1.2, top_p=0.95, seed=5,
              extra_body={"ignore_eos": True})
    a, b = c.completions.create(**kw).choices[0].text, c.completions.create(**kw).choices[0].text
    assert a == b and c.completions.create(**{**kw, "seed": 6}).choices[0].text != a


def test_second_turn_prefills_only_the_new_messages(server, local):
    port, _ = server
    c = client(port)
    tok = local[1]
    first = [{"role": "user", "content": "Write one word."}]
    r1 = c.chat.completions.create(model="smol", messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "Another one."}]
    r2 = c.chat.completions.create(model="smol", messages=second, max_tokens=8, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    n1, n2 = len(tok.encode_chat(first)), len(tok.encode_chat(second))
    assert r2.usage.prompt_tokens == n2 and cached >= n1
    new_turn = len(tok.encode("Another one.", bos=False))
    assert n2 - cached <= new_turn + 12, (n1, n2, cached)  # the new message and the template's markers around it


BAD = [  # (body, status, words in the message)
    (b'{"messages": [', 400, "not valid JSON"),
    (b'{"messages": "hello"}', 400, "messages"),
    (json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"messages": CHAT, "max_tokens": 100000}).encode(), 400, "context"),
    (json.dumps({"messages": CHAT, "sparsity": 1.0}).encode(), 400, "sparsity"),
    (json.dumps({"messages": CHAT, "sparsity": -0.1}).encode(), 400, "sparsity"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"messages": CHAT, "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": CHAT, "tools": [{"type": "function"}]}).encode(), 400, "tools"),
    ('{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"), 400, "UTF-8"),
    (b"[1, 2]", 400, "input"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_an_openai_error_and_the_server_lives(server, body, status, words):
    port, _ = server
    code, reply = post(port, "/v1/chat/completions", body)
    assert code == status and words.lower() in reply["error"]["message"].lower(), reply
    assert reply["error"]["type"] == "invalid_request_error"
    assert get(port, "/health")[0] == 200


def test_bad_completion_requests_and_a_huge_body(server):
    port, _ = server
    for body, words in [({"prompt": ""}, "empty"), ({"prompt": [1, 99999999]}, "token ids"),
                        ({"prompt": ["a", "b"]}, "one prompt"), ({"prompt": "hi", "echo": True}, "echo"),
                        ({"prompt": "hi", "max_tokens": 0}, "max_tokens")]:
        code, reply = post(port, "/v1/completions", body)
        assert code == 400 and words in reply["error"]["message"], (body, reply)
    code, reply = post(port, "/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}')
    assert code == 413 and "bytes" in reply["error"]["message"]
    code, reply = post(port, "/v1/nothing", {})
    assert code == 404 and "error" in reply
    assert get(port, "/health")[0] == 200


def test_a_client_leaving_mid_stream_stops_its_generation(server):
    port, _ = server
    before = get(port, "/health")[1]
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while seen.count(b"data: ") < 3:
        seen += s.recv(4096)
    s.close()
    deadline = time.time() + 60
    while True:
        h = get(port, "/health")[1]
        if h["served"] > before["served"] and h["waiting"] == 0 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert h["served"] == before["served"] + 1 and h["waiting"] == 0
    assert h["generated_tokens"] - before["generated_tokens"] < 100  # not the 300 asked for
    r = client(port).completions.create(model="smol", prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_concurrent_clients_are_all_answered_in_order_and_memory_stays_flat(server, local):
    port, proc = server
    prompts = ["The sea is", "My favourite food is", "In the morning I"]
    want = {p: client(port).completions.create(model="smol", prompt=p, max_tokens=4, temperature=0).choices[0].text
            for p in prompts}

    def round_(results, per_client=5):
        def one(i):
            c = client(port)
            for j in range(per_client):
                p = prompts[(i + j) % len(prompts)]
                stream = (i + j) % 2 == 0
                r = c.completions.create(model="smol", prompt=p, max_tokens=4, temperature=0, stream=stream)
                text = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
                results.append(text == want[p])
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    round_([], per_client=2)  # the allocator and the threads' first use
    before = rss_kb(proc.pid)
    results = []
    round_(results)
    assert len(results) == 40 and all(results)
    assert rss_kb(proc.pid) - before < 64 << 10, (before, rss_kb(proc.pid))  # under 64 MB of growth
    # the worker marks a job done just after its last event goes out: the health line settles within moments
    deadline = time.monotonic() + 5
    while (h := get(port, "/health")[1])["waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["waiting"] == 0 and h["status"] == "ok"


@pytest.mark.parametrize("stops,pieces,out,stopped", [
    (["END"], ["ab", "cE", "N", "Dxy"], "abc", True),
    (["END"], ["ab", "cE", "Nx"], "abcENx", False),
    (["\n\n", "##"], ["a\n", "b#", "#c"], "a\nb", True),
    ([], ["a", "b"], "ab", False),
    (["xyz"], ["x", "yq"], "xyq", False),
])
def test_stop_text_cuts_at_the_first_stop_string_and_holds_back_possible_starts(stops, pieces, out, stopped):
    s = StopText(stops)
    emitted = [s.push(p) for p in pieces]
    text = "".join(emitted) + ("" if s.stopped else s.flush())
    assert text == out and s.stopped == stopped
    if stops == ["END"] and not stopped:
        assert emitted[1] == "c"  # "E" held back until "N x" shows it is not "END"


def test_serve_refuses_bad_flags_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--sparsity", "1.5"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--sparsity" in r.stderr
