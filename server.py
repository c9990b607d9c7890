"""The OpenAI-compatible HTTP service behind serve.py: request schemas (OpenAI's fields that batch-1 decoding
serves, plus `sparsity`, `sparsity_method`, `criterion`, `top_k`, `ignore_eos`), the decode worker (one thread that
owns the model, serves jobs in arrival order, keeps the KV cache of the last conversation and sets each request's
level and sampling), and the FastAPI app (JSON and server-sent-event responses, OpenAI-style errors).

Under torchrun (tensor parallel, tp.py) rank 0 serves HTTP and its worker tells the other ranks, which run `follow`,
what to decode: each job's prompt, level, sampling settings and seed before it starts, and after every token
whether to stop (stop strings and client disconnects are known to rank 0 only). The ranks thus run the same steps
and their collectives pair up; while idle the worker sends a keep-alive every `heartbeat` seconds, so the others'
waiting broadcast never times out."""
import asyncio
import concurrent.futures
import json
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from engine import Generator, common_prefix, set_sparsity
from errors import UserError
from sparsity import CRITERIA, METHODS
from tokenizer import StreamDecoder

MAX_BODY = 8 << 20  # bytes of a request body


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- requests: OpenAI's fields that batch-1 decoding serves, plus the extensions; unknown fields are ignored ---

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, List[str]]] = Field(None)
    seed: Optional[int] = None
    n: Optional[int] = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    # OpenAI features this server does not have: refused when asked for, never silently ignored
    tools: Optional[list] = None
    functions: Optional[list] = None
    logprobs: Optional[Union[bool, int]] = None
    logit_bias: Optional[dict] = None
    response_format: Optional[dict] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    sparsity: Optional[float] = Field(None, ge=0, lt=1)
    sparsity_method: Optional[Literal[METHODS]] = None
    criterion: Optional[Literal[CRITERIA]] = None


class ChatRequest(_Sampling):
    messages: List[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int], List[str]]
    echo: bool = False


@dataclass
class Job:
    """One request as the worker serves it; events go back to the request's coroutine on the server's loop."""
    ids: list
    max_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: float
    stops: list
    seed: Optional[int]
    ignore_eos: bool
    level: float
    method: str
    criterion: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that could be the start of one."""

    def __init__(self, stops: list):
        self.stops, self.held, self.stopped = [s for s in stops if s], "", False

    def push(self, text: str) -> str:
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held) + 1))
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Worker:
    """The one thread that touches the model: takes jobs in arrival order, keeps the KV cache of the last
    conversation, sets each job's sparsity level and sampling settings, and streams its text back."""

    def __init__(self, gen: Generator, tok, calib, level: float, method: str, criterion: str, max_seq_len: int,
                 tp=None, heartbeat: float = 30.0):
        self.gen, self.tok, self.calib = gen, tok, calib
        self.tp, self.heartbeat = tp, heartbeat  # tp: rank 0's TP; the others follow (follow())
        self.setting = (level, method, criterion)
        self.max_seq_len = max_seq_len
        self.cached = []  # the ids whose keys and values the cache holds, in order
        self.jobs = queue.Queue()
        self.busy = False
        self.served = self.generated = 0  # requests served, tokens generated
        self.thread = threading.Thread(target=self._run, name="decode-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        self.jobs.put(job)

    def call(self, fn):
        """fn() run on the worker's thread, in turn with the requests; returns its result. Compiled steps are
        warmed up (and their CUDA graphs recorded) here: the graphs belong to the thread that records them."""
        done = concurrent.futures.Future()
        self.jobs.put((fn, done))
        return done.result()

    def waiting(self) -> int:
        return self.jobs.qsize() + self.busy

    def warm_up(self, ids: list):
        """warm_up() on the worker's thread (and on every rank)."""
        self.call(lambda: (self._tell("warm", ids=ids), warm_up(self.gen, ids)))

    def close(self):
        """Ends the worker thread after the jobs queued before; the other ranks' follow() returns."""
        self.jobs.put(None)
        self.thread.join()

    def _tell(self, op: str, **fields):
        if self.tp is not None:
            self.tp.broadcast({"op": op, **fields})

    def _run(self):
        while True:
            try:
                job = self.jobs.get(timeout=self.heartbeat if self.tp is not None else None)
            except queue.Empty:
                self._tell("idle")
                continue
            if job is None:
                self._tell("stop")
                return
            if isinstance(job, tuple):
                fn, done = job
                try:
                    done.set_result(fn())
                except BaseException as e:  # noqa: BLE001  (raised again in the caller's thread)
                    done.set_exception(e)
                continue
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._serve(job)
            except ApiError as e:
                job.emit("error", e)
            except Exception as e:  # the worker outlives any one request; the cache may hold a partial turn
                self.cached = []
                job.emit("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self.served += 1

    def _set_level(self, level: float, method: str, criterion: str):
        if (level, method, criterion) == self.setting:
            return
        try:
            set_sparsity(self.gen.model, self.calib, level, method, criterion)
        except UserError as e:
            raise ApiError(400, str(e), "sparsity") from None
        self.setting = (level, method, criterion)
        self.cached = []  # keys and values decoded at another level: prefill the conversation again

    def _serve(self, job: Job):
        self._set_level(job.level, job.method, job.criterion)
        gen, tok = self.gen, self.tok
        sampling = (job.temperature if job.top_p > 0 else 0.0, job.top_k, job.top_p)
        gen.set_sampling(*sampling)
        seed = job.seed
        if seed is None and self.tp is not None:  # the ranks sample alike from the same logits and seed
            seed = random.getrandbits(63)
        if seed is not None:
            torch.manual_seed(seed)
        stop_ids = set() if job.ignore_eos else tok.stop_ids
        reuse = common_prefix(self.cached, job.ids[:-1])  # at least one token to prefill: it gives the first new one
        stream, stops = StreamDecoder(tok, job.ids), StopText(job.stops)
        state = {"n": 0, "finish": "length"}
        self._tell("generate", ids=job.ids[reuse:], start=reuse, max_tokens=job.max_tokens, stop_ids=sorted(stop_ids),
                   sampling=sampling, seed=seed, setting=self.setting)

        def on_tokens(tokens):
            try:
                stop = bool(decide(tokens))
            except BaseException:
                if self.tp is not None:  # the other ranks stop with this one
                    self.tp.agree(True)
                raise
            return self.tp.agree(stop) if self.tp is not None else stop

        def decide(tokens):
            if job.cancelled.is_set():
                state["finish"] = None
                return True
            state["n"] += 1
            self.generated += 1
            if tokens[0] in stop_ids:
                state["finish"] = "stop"
                return True
            text = stops.push(stream.push(tokens[0]))
            if text:
                job.emit("text", text)
            if stops.stopped:
                state["finish"] = "stop"
                return True
            return state["n"] >= job.max_tokens

        self.cached = []  # until this run returns, the cache holds an unknown part of it
        new, st = gen.generate(torch.tensor([job.ids[reuse:]], device=gen.device), job.max_tokens, stop_ids,
                               on_tokens=on_tokens, start=reuse)
        self.cached = job.ids + new[0, :-1].tolist()
        if state["finish"] is None:  # the client went away
            return
        if not stops.stopped and (rest := stops.flush()):
            job.emit("text", rest)
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": state["n"],
                 "total_tokens": len(job.ids) + state["n"], "prompt_tokens_details": {"cached_tokens": reuse}}
        job.emit("done", state["finish"], usage, {"decode_tok_s": round(st.decode_tok_s, 2),
                                                  "time_to_first_token_s": round(st.ttft_s, 4)})


def warm_up(gen: Generator, ids: list):
    """Compiles the prefill and both decode steps (greedy and sampled) before the first request."""
    for temperature in (0.0, 1.0):
        gen.set_sampling(temperature)
        gen.generate(torch.tensor([ids], device=gen.device), 4)


def follow(gen: Generator, calib, setting: tuple, tp):
    """The loop of a rank > 0 under torchrun: the steps rank 0's worker runs, as it says (module docstring), until
    it says stop. setting: the (level, method, criterion) the model's thresholds hold."""
    while True:
        cmd = tp.broadcast()
        if cmd["op"] == "stop":
            return
        if cmd["op"] == "warm":
            warm_up(gen, cmd["ids"])
        elif cmd["op"] == "generate":
            if cmd["setting"] != setting:
                set_sparsity(gen.model, calib, *cmd["setting"])
                setting = cmd["setting"]
            gen.set_sampling(*cmd["sampling"])
            torch.manual_seed(cmd["seed"])
            gen.generate(torch.tensor([cmd["ids"]], device=gen.device), cmd["max_tokens"], cmd["stop_ids"],
                         on_tokens=lambda _: tp.agree(), start=cmd["start"])


# --- the HTTP side ---

class Service:
    """What the endpoints share: the worker, the tokenizer, the model's name and its context."""

    def __init__(self, worker: Worker, tok, model_id: str, max_body: int = MAX_BODY):
        self.worker, self.tok, self.model_id, self.max_body = worker, tok, model_id, max_body
        self.default = worker.setting  # (level, method, criterion) of a request that names none: the flags'
        self.created = int(time.time())

    async def read(self, request, kind):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the request body is over {self.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, f"the request body is over {self.max_body} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8") from None
        try:
            return kind.model_validate_json(text)
        except ValidationError as e:
            err = e.errors()[0]
            if err["type"] == "json_invalid":
                raise ApiError(400, f"the request body is not valid JSON: {err['msg']}") from None
            where = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"{where}: {err['msg']}", where or None) from None

    def job(self, r: _Sampling, ids: list, max_tokens: Optional[int]) -> Job:
        asked = {"tools": r.tools, "functions": r.functions, "logprobs": r.logprobs, "logit_bias": r.logit_bias,
                 "response_format": r.response_format and r.response_format.get("type") not in (None, "text"),
                 "frequency_penalty": r.frequency_penalty, "presence_penalty": r.presence_penalty}
        for name, value in asked.items():
            if value:
                raise ApiError(400, f"{name} is not supported by this server", name)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        room = self.worker.max_seq_len - len(ids)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens or 1}) exceed the "
                           f"context of {self.worker.max_seq_len} tokens", "max_tokens", "context_length_exceeded")
        stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop takes at most 4 strings", "stop")
        level, method, criterion = self.default
        if r.sparsity is not None:
            level = r.sparsity
            if level > 0 and self.worker.calib is None:
                raise ApiError(400, "this checkpoint has no calibration: only sparsity 0 is served (run "
                               "`python calibrate.py` on it)", "sparsity")
        vocab = self.worker.gen.model.args.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
        return Job(ids=ids, max_tokens=max_tokens or room, temperature=1.0 if r.temperature is None else r.temperature,
                   top_k=r.top_k, top_p=1.0 if r.top_p is None else r.top_p, stops=stops, seed=r.seed,
                   ignore_eos=r.ignore_eos, level=level, method=r.sparsity_method or method,
                   criterion=r.criterion or criterion, loop=asyncio.get_running_loop())

    def chat_job(self, r: ChatRequest) -> Job:
        if not self.tok.has_chat:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            ids = self.tok.encode_chat([{"role": m.role, "content": m.text()} for m in r.messages])
        except UserError as e:
            raise ApiError(400, str(e), "messages") from None
        return self.job(r, ids, r.max_completion_tokens or r.max_tokens)

    def completion_job(self, r: CompletionRequest) -> Job:
        prompt = r.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (batch 1)", "prompt")
            prompt = prompt[0]
        ids = self.tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.job(r, ids, r.max_tokens)

    def response_fields(self, job: Job) -> dict:
        return {"model": self.model_id, "sparsity": job.level, "sparsity_method": job.method,
                "criterion": job.criterion}


async def events(job: Job):
    """The job's events until its end; an error before any text is raised, after it is the last event."""
    while True:
        event = await job.events.get()
        yield event
        if event[0] in ("done", "error"):
            return


def make_app(service: Service) -> FastAPI:
    app = FastAPI(title="teal-engine", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(ApiError(400, str(e.errors()[0].get("msg"))).body(), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, "waiting": service.worker.waiting(),
                "served": service.worker.served,
                "generated_tokens": service.worker.generated, "sparsity": service.default[0]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "teal-engine", "max_model_len": service.worker.max_seq_len}]}

    async def run(request: Request, job: Job, stream: bool, include_usage: bool, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                **service.response_fields(job)}
        service.worker.submit(job)
        if stream:
            return StreamingResponse(sse(job, head, include_usage, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts, done = [], None
        try:
            while done is None:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse({}, status_code=499)
                    continue
                if event[0] == "error":
                    raise event[1]
                if event[0] == "text":
                    parts.append(event[1])
                else:
                    done = event
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        text = "".join(parts)
        _, finish, usage, timing = done
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**head, "choices": [choice], "usage": usage, "timing": timing}

    async def sse(job: Job, head: dict, include_usage: bool, chat: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(delta: Optional[dict], text: Optional[str], finish=None, **extra):
            choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
            return "data: " + json.dumps({**head, "choices": [choice], **extra}) + "\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            async for event in events(job):
                if event[0] == "text":
                    yield chunk({"content": event[1]}, event[1])
                elif event[0] == "error":
                    yield "data: " + json.dumps(event[1].body()) + "\n\n"
                else:
                    _, finish, usage, timing = event
                    yield chunk({}, "", finish, timing=timing)
                    if include_usage:
                        yield "data: " + json.dumps({**head, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the worker stops this job at its next token
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        r = await service.read(request, ChatRequest)
        job = service.chat_job(r)
        return await run(request, job, r.stream, bool(r.stream_options and r.stream_options.include_usage), True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        r = await service.read(request, CompletionRequest)
        job = service.completion_job(r)
        if r.echo:
            raise ApiError(400, "echo is not supported", "echo")
        return await run(request, job, r.stream, bool(r.stream_options and r.stream_options.include_usage), False)

    return app
