"""The OpenAI-compatible HTTP API over one Engine: completions, chat completions, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..chat import has_template
from ..policies import Policy, make_policy
from .engine import Engine, Request, RequestTooLarge, Sampling

# OpenAI request fields we read; others that OpenAI defines are accepted only at their neutral value
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "kvevict",
                 "user", "n", "frequency_penalty", "presence_penalty", "logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
NEUTRAL = {"n": 1, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": (None, False),
           "echo": False, "suffix": None, "top_logprobs": None, "user": None}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_response(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


@dataclass
class Served:
    """What the app serves: the engine, its tokenizer and the default eviction policy."""

    engine: Engine
    tokenizer: object
    model_name: str
    policy: Policy
    context_window: int | None


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise BadRequest(f"{name} must be a{'n integer' if integer else ' number'}, got {value!r}", name)
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"{name} must be in [{low:g}, {high:g}], got {value!r}", name)
    return int(value) if integer else float(value)


def _policy(served: Served, body: dict) -> Policy:
    """The request's policy: the server's, or the one its `kvevict` field describes (validated by make_policy)."""
    extra = body.get("kvevict")
    if extra is None:
        return served.policy
    if not isinstance(extra, dict):
        raise BadRequest('kvevict must be an object, e.g. {"policy": "snapkv", "compression_ratio": 0.75}', "kvevict")
    params = dict(extra)
    name = params.pop("policy", None)
    if name is None:  # only sizing given: the server's policy, resized
        name, params = served.policy.name, {**served.policy.params(), **params}
        if "compression_ratio" in extra and "budget" not in extra:
            params["budget"] = None
        if "budget" in extra and "compression_ratio" not in extra:
            params["compression_ratio"] = 0.0
    try:
        return make_policy(name, **params)
    except (ValueError, TypeError) as err:
        raise BadRequest(f"kvevict: {err}", "kvevict") from None


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown parameter(s) {unknown}", unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in (neutral if isinstance(neutral, tuple) else (neutral,)):
            raise BadRequest(f"{name}={body[name]!r} is not supported by this server", name)


@dataclass
class Job:
    """A parsed request: prompt token ids, limits, sampling, stops and policy."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stops: list[str]
    policy: Policy
    stream: bool
    include_usage: bool


def parse_job(served: Served, body: dict, chat: bool) -> Job:
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    tok = served.tokenizer
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRequest("each message must be an object with a string role and string content", "messages")
        if not any(m["content"].strip() for m in messages):
            raise BadRequest("the messages are empty: give some text", "messages")
        if not has_template(tok):
            raise BadRequest(f"{served.model_name} has no chat template: use /v1/completions", "messages")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(text, add_special_tokens=False).input_ids
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRequest("the prompt is empty: give some text", "prompt")
            prompt_ids = tok(prompt).input_ids  # as kvevict.generate tokenizes a plain prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = len(tok)
            if any(t < 0 or t >= vocab for t in prompt):
                raise BadRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
            prompt_ids = list(prompt)
        else:
            raise BadRequest("prompt must be a non-empty string (or one list of token ids); one prompt per request",
                             "prompt")
    if not prompt_ids:
        raise BadRequest("the prompt is empty after tokenization", "prompt")
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    window = served.context_window
    default_max = 16 if not chat else max(1, (window or 4096) - len(prompt_ids))
    max_tokens = _number(body, limit_name, default_max, 1, 2**31, integer=True)
    if window is not None and len(prompt_ids) + max_tokens > window:
        raise BadRequest(
            f"this model's context window is {window} tokens; the prompt has {len(prompt_ids)} and {limit_name}="
            f"{max_tokens} would go past it", limit_name if len(prompt_ids) < window else "prompt")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("top_p must be > 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise BadRequest("stream_options accepts only include_usage", "stream_options")
    return Job(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=Sampling(temperature, top_p, seed),
               stops=_stops(body), policy=_policy(served, body), stream=stream,
               include_usage=bool(options.get("include_usage")))


class TextTracker:
    """Turns a request's token ids into text increments, holding back what could still become a stop string
    (or half of a multi-byte character); `stopped` once a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self.flush()
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        out = text[self.sent : len(text) - hold]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


class Mailbox:
    """The engine thread's events for the event loop, delivered in bursts: the loop wakes once for the tokens an
    engine step gives all its requests, not once per token (on a small machine every wake-up of the loop takes a
    core from the engine's threads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        """Called from the engine thread."""
        with self.lock:
            first = not self.pending
            self.pending.append((queue, event))
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="kvevict", description="OpenAI-compatible server with KV-cache eviction")
    engine = served.engine

    @app.exception_handler(BadRequest)
    async def bad_request(_, err: BadRequest):
        return error_response(str(err), err.status, err.param)

    async def read_body(http: HTTPRequest) -> dict:
        raw = await http.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(f"the body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server serves {served.model_name!r}", "model",
                             status=404)
        return body

    mailbox: list[Mailbox | None] = [None]  # one per event loop (the server's)

    async def run(http: HTTPRequest, chat: bool):
        body = await read_body(http)
        job = parse_job(served, body, chat)
        loop = asyncio.get_running_loop()
        if mailbox[0] is None or mailbox[0].loop is not loop:
            mailbox[0] = Mailbox(loop)
        post = mailbox[0].post
        events: asyncio.Queue = asyncio.Queue()
        request = Request(job.prompt_ids, job.max_tokens, job.policy, job.sampling,
                          on_event=lambda kind, value: post(events, (kind, value)))
        try:
            await asyncio.to_thread(engine.submit, request)
        except RequestTooLarge as err:
            raise BadRequest(str(err), "max_tokens", status=413) from None
        except ValueError as err:
            raise BadRequest(str(err), "kvevict") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        tracker = TextTracker(served.tokenizer, job.stops)
        usage = lambda: {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(request.output_ids),
                         "total_tokens": len(job.prompt_ids) + len(request.output_ids)}
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            message = {"role": "assistant", "content": text}
            if delta:
                return {"index": 0, "delta": {"content": text} if text or reason else message, "logprobs": None,
                        "finish_reason": reason}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}

        async def next_event():
            """The engine's next event; the request is stopped when the client has gone (a stream learns it at
            once, from its cancellation; this look every 2 s is for the others: rare, because every wake-up of
            this thread takes a core from the engine's threads)."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=2.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        engine.stop_request(request, "abort")

        async def pieces():
            """(text, finish_reason) as the engine produces tokens; the last has a reason."""
            while True:
                kind, value = await next_event()
                if kind == "token":
                    text = tracker.add(value)
                    if tracker.stopped:
                        engine.stop_request(request, "stop")
                        while (await next_event())[0] == "token":
                            pass
                        yield text, "stop"
                        return
                    if text:
                        yield text, None
                elif kind == "finish":
                    yield tracker.flush(), "abort" if value == "abort" else value
                    return
                else:
                    raise RuntimeError(value)

        extra = {"kvevict": {"policy": request.policy.describe(), "kv_bytes_peak": 0}}
        if not job.stream:
            try:
                parts = [p async for p in pieces()]
            except RuntimeError as err:
                return error_response(f"generation failed: {err}", 500)
            finally:
                engine.stop_request(request, "abort")  # a no-op once finished; frees it if we are cancelled
            text, reason = "".join(t for t, _ in parts), parts[-1][1]
            extra["kvevict"]["kv_bytes_peak"] = request.peak_nbytes
            return {"id": rid, "object": obj, "created": created, "model": served.model_name,
                    "choices": [choice(text, reason, delta=False)], "usage": usage(), **extra}

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            base = {"id": rid, "object": chunk_obj, "created": created, "model": served.model_name}
            try:
                if chat:
                    yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                try:
                    async for text, reason in pieces():
                        if text or reason:
                            yield sse({**base, "choices": [choice(text, reason, delta=True)]})
                except RuntimeError as err:
                    yield sse({"error": {"message": f"generation failed: {err}", "type": "server_error", "code": 500}})
                    return
                if job.include_usage:
                    yield sse({**base, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                engine.stop_request(request, "abort")  # the client left mid-stream: free the request now

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await run(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await run(http, chat=True)

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        """Token ids of a text, as the completions endpoint tokenizes it (vLLM's /tokenize)."""
        body = await read_body(http)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string", "prompt")
        ids = served.tokenizer(prompt).input_ids
        return {"count": len(ids), "max_model_len": served.context_window, "tokens": ids}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvevict", "max_model_len": served.context_window}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response("the engine has stopped", 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def root():
        return PlainTextResponse(f"kvevict serving {served.model_name}: POST /v1/completions, /v1/chat/completions\n")

    return app
