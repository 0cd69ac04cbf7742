"""`lt-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine
(`lt_jax.serving.Engine`). One engine thread owns the device; the HTTP handlers only validate, enqueue and
await or stream what the engine hands back.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health` ({"status", "model",
"active": requests not finished, "cancelled": requests their clients abandoned, "compiles": compilations held by
the serving functions, which stays put once a length bucket is warm}).

- Completions: `prompt` (a text, token ids, or a list of either: one choice per prompt, not with `stream`),
  `max_tokens` (default 16; 0 only scores), `temperature` (default 1; 0 = greedy), `top_p`, `stop` (strings, cut
  from the text), `seed` (default 0), `n` (1 only), `stream` (server-sent events ending with `data: [DONE]`;
  `stream_options.include_usage` adds a usage chunk), `echo`, `logprobs` (0..5; not with `stream`). With
  `echo=true, max_tokens=0, logprobs=1` the response holds the prompt tokens' logprobs (the first one null), as
  lm-eval's `local-completions` reads them. Logprobs are scored by one forward pass over prompt and completion
  under the fixed plan that served the request (`Model.token_nll`'s numbers).
- Chat completions: `messages` ([{role, content}]) through the model's chat template with the generation prompt;
  `max_tokens` (or `max_completion_tokens`; default the context left, at most 1024), `temperature`, `top_p`,
  `stop`, `seed`, `n`, `stream`.
- Extra request field `lt_plan`: a plan spec as `Model.plan` takes it (`full`, `streaming`, `lighttransfer`,
  `first`, a .json path, ...) for this request instead of the server's plan. Extra response fields:
  `lt_lazy_layers` (the lazy layers that served the request; per choice too when prompts differ, as a selecting
  plan chooses per prompt) and, per choice, `lt_token_ids` (the generated token ids).
- Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for bad values and malformed
  JSON, 404 for an unknown model or route, 422 for a body that is not a JSON object.
- A client that disconnects mid-stream cancels its request (its row is freed; a non-streamed request runs to its
  end). SIGTERM or SIGINT: stop accepting, finish the requests in flight, exit 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import threading
import time
import uuid
from functools import partial

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lt_jax import scoring
from lt_jax.batching import bucket
from lt_jax.errors import LtJaxError
from lt_jax.inference import Sampling
from lt_jax.plan import Plan
from lt_jax.serving import DEFAULT_CHUNK, Engine, Job

MAX_LOGPROBS = 5
CHAT_MAX_TOKENS = 1024  # a chat request's default budget (at most the context left)


class ApiError(Exception):
    """A bad request: HTTP status, one-sentence message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Text:
    """A completion's text as tokens arrive (on the engine thread): the new text safe to send (held back while it
    could be the start of a stop string or of a split UTF-8 character) and whether a stop string ended it."""

    def __init__(self, model, stops: list[str]):
        self.model, self.stops, self.ids, self.sent, self.text = model, stops, [], 0, ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, new: list[int]) -> tuple[str, bool]:
        self.ids += new
        text = self.model.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self.flush(), True
        self.text = text
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


class _Channel:
    """From the engine thread to one handler's event loop."""

    def __init__(self):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Server:
    """The state behind the routes: the model, its engine, the default plan, the served name."""

    def __init__(self, model, plan: Plan | str | None = None, max_batch: int = 8, chunk: int = DEFAULT_CHUNK,
                 name: str | None = None):
        self.model = model
        self.plan = model.plan(plan)
        self.name = name or model.label
        self.engine = Engine(model, batch_size=max_batch, chunk=chunk)
        self._plans: dict[str, Plan] = {}
        self._ids = itertools.count()
        self.cancelled = 0  # requests ended by their client (a closed stream)
        self.created = int(time.time())

    def compiles(self) -> int:
        """Compilations held by the functions that serve (exact; the load test asserts it stays put)."""
        from lt_jax import cache, inference, serving
        fns = (inference.prefill, inference.decode_chunk, cache.insert_rows, serving._put_row,
               scoring.token_logprobs)
        return sum(f._cache_size() for f in fns)

    def request_plan(self, body: dict) -> Plan:
        spec = body.get("lt_plan")
        if spec is None:
            return self.plan
        if not isinstance(spec, str):
            raise ApiError(400, f"lt_plan must be a plan spec string, got {spec!r}.", "lt_plan")
        if spec not in self._plans:
            try:
                self._plans[spec] = self.model.plan(spec)
            except LtJaxError as e:
                raise ApiError(400, f"lt_plan {spec!r}: {e}", "lt_plan") from None
        return self._plans[spec]

    # -- validation --

    def check_model(self, body: dict):
        name = body.get("model")
        if name is not None and name != self.name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {self.name!r}.", "model",
                           "model_not_found")

    def settings(self, body: dict, max_tokens_field: str = "max_tokens") -> dict:
        """The sampling settings common to both routes, checked."""
        def get(field, default, ok, what):
            v = body.get(field)
            if v is None:
                return default
            if not ok(v):
                raise ApiError(400, f"{field}={v!r} must be {what}.", field)
            return v
        max_tokens = get(max_tokens_field, None, lambda v: _whole(v) and v >= 0, "a whole number >= 0")
        if max_tokens is None and max_tokens_field == "max_tokens":
            max_tokens = body.get("max_completion_tokens")
            if max_tokens is not None and not (_whole(max_tokens) and max_tokens >= 0):
                raise ApiError(400, f"max_completion_tokens={max_tokens!r} must be a whole number >= 0.",
                               "max_completion_tokens")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(
                isinstance(s, str) and s for s in stop)):
            raise ApiError(400, f"stop={body.get('stop')!r} must be a non-empty string or a list of at most 4.",
                           "stop")
        get("n", 1, lambda v: v == 1 and _whole(v), "1 (one choice per prompt is served)")
        if body.get("best_of") not in (None, 1):
            raise ApiError(400, f"best_of={body['best_of']!r} is not supported (only 1).", "best_of")
        return dict(
            max_tokens=max_tokens,
            temperature=float(get("temperature", 1.0, lambda v: _number(v) and 0 <= v <= 2, "a number in 0..2")),
            top_p=float(get("top_p", 1.0, lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]")),
            seed=int(get("seed", 0, _whole, "a whole number")),
            stream=get("stream", False, lambda v: isinstance(v, bool), "true or false"),
            stop=stop or [],
            usage_chunk=bool(get("stream_options", {}, lambda v: isinstance(v, dict), "an object").get(
                "include_usage")),
            plan=self.request_plan(body))

    def prompt_ids(self, prompt, param: str = "prompt") -> list[list[int]]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_whole(t) for t in prompt)):
            prompt = [prompt]
        if not (isinstance(prompt, list) and prompt):
            raise ApiError(400, f"{param} must be a text, a list of token ids, or a list of either.", param)
        rows = []
        for p in prompt:
            if isinstance(p, str):
                if self.model.tokenizer is None:
                    raise ApiError(400, f"this model has no tokenizer: send {param} as token ids.", param)
                ids = self.model.encode(p)
            elif isinstance(p, list) and all(_whole(t) for t in p):
                ids = [int(t) for t in p]
                vocab = self.model.config.vocab_size
                if any(not 0 <= t < vocab for t in ids):
                    raise ApiError(400, f"{param} holds token ids outside 0..{vocab - 1}.", param)
            else:
                raise ApiError(400, f"{param} must be a text, a list of token ids, or a list of either.", param)
            if not ids:
                raise ApiError(400, f"{param} must hold at least one token.", param)
            rows.append(ids)
        return rows

    def check_length(self, ids: list[int], max_tokens: int, param: str):
        context = self.model.config.max_position_embeddings
        if len(ids) > context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the model's context of {context} "
                                f"tokens.", param, "context_length_exceeded")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"max_tokens={max_tokens} plus the prompt's {len(ids)} tokens exceed the model's "
                                f"context of {context} tokens.", "max_tokens", "context_length_exceeded")

    # -- engine work --

    def start(self, ids: list[int], s: dict, text: _Text, channel: _Channel) -> int:
        """Enqueues one generation; the channel receives ("delta", text, new ids) and then ("done", result)."""
        index = next(self._ids)

        def on_tokens(new):
            delta, stopped = text.push(new)
            channel.put(("delta", delta, new))
            return stopped

        def on_done(result):
            if isinstance(result, dict):
                result["tail"] = text.flush()
                self.cancelled += result["finish_reason"] == "cancelled"
            channel.put(("done", result))

        sampling = Sampling(temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"])
        self.engine.submit(Job(index, ids, s["max_tokens"], s["plan"], sampling, on_tokens, on_done))
        return index

    def score(self, ids: list[int], plan: Plan) -> dict:
        """On the engine thread: the fixed plan (a selecting plan chooses on `ids`) and every token's logprob after
        the first with the top MAX_LOGPROBS."""
        m = self.model
        fixed, _ = m.select([ids], plan)
        width = max(len(ids), min(bucket(len(ids)), m.config.max_position_embeddings))
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        chosen, top, top_ids = scoring.token_logprobs(m.params, m.rows(tokens), fixed.layers(m.config), m.config,
                                                      top=MAX_LOGPROBS)
        n = len(ids) - 1
        return {"plan": fixed, "chosen": np.asarray(chosen)[0, :n], "top": np.asarray(top)[0, :n],
                "top_ids": np.asarray(top_ids)[0, :n]}

    def logprobs(self, prompt: list[int], generated: list[int], plan: Plan, echo: bool, k: int,
                 scored: dict) -> dict:
        """OpenAI's completion logprobs object over the echoed prompt (if echo) and the generated tokens."""
        ids = prompt + generated
        first = 0 if echo else len(prompt)
        piece = lambda t: self.model.decode([t]) if self.model.tokenizer is not None else str(t)  # noqa: E731
        tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
        for t in range(first, len(ids)):
            tokens.append(piece(ids[t]))
            offsets.append(offset)
            offset += len(tokens[-1])
            if t == 0:
                token_logprobs.append(None), top_logprobs.append(None)
                continue
            token_logprobs.append(float(scored["chosen"][t - 1]))
            top_logprobs.append({piece(int(i)): float(v) for v, i in
                                 zip(scored["top"][t - 1][:k], scored["top_ids"][t - 1][:k])})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_app(model, plan: Plan | str | None = None, max_batch: int = 8, chunk: int = DEFAULT_CHUNK,
              name: str | None = None):
    """The FastAPI app serving `model` (its engine thread runs while the app's lifespan does)."""
    server = Server(model, plan, max_batch, chunk, name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="lt-jax", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
        if not isinstance(body, dict):
            raise ApiError(422, f"the request body must be a JSON object, got {type(body).__name__}.")
        server.check_model(body)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, "active": server.engine.active,
                "cancelled": server.cancelled, "compiles": server.compiles()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "lt-jax", "max_model_len":
                                                model.config.max_position_embeddings}]}

    async def run_one(ids: list[int], s: dict):
        """Yields ("delta", text, ids) events and last ("done", result) for one generation; cancels it if the
        consumer stops early (a disconnected client)."""
        channel = _Channel()
        index = server.start(ids, s, _Text(model, s["stop"]), channel)
        finished = False
        try:
            while True:
                event = await channel.queue.get()
                if event[0] == "done":
                    finished = True
                    if isinstance(event[1], BaseException):
                        raise event[1]
                yield event
                if finished:
                    return
        finally:
            if not finished:
                server.engine.cancel(index)

    async def complete(ids: list[int], s: dict) -> dict:
        """{"text", "ids", "finish_reason", "plan"} of one generation (max_tokens 0: nothing generated)."""
        if s["max_tokens"] == 0:
            return {"text": "", "ids": [], "finish_reason": "length", "plan": None}
        text = []
        async for event in run_one(ids, s):
            if event[0] == "delta":
                text.append(event[1])
            else:
                result = event[1]
                return {"text": "".join(text) + result["tail"], "ids": result["ids"],
                        "finish_reason": result["finish_reason"], "plan": result["plan"]}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def lazy(plan: Plan) -> list[int]:
        return list(plan.lazy_layers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        s = server.settings(body)
        s["max_tokens"] = 16 if s["max_tokens"] is None else s["max_tokens"]
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, f"echo={echo!r} must be true or false.", "echo")
        k = body.get("logprobs")
        if k is not None and not (_whole(k) and 0 <= k <= MAX_LOGPROBS):
            raise ApiError(400, f"logprobs={k!r} must be a whole number in 0..{MAX_LOGPROBS}.", "logprobs")
        if "prompt" not in body:
            raise ApiError(400, "prompt is required.", "prompt")
        rows = server.prompt_ids(body["prompt"])
        for ids in rows:
            server.check_length(ids, s["max_tokens"], "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if s["stream"]:
            if len(rows) > 1 or k is not None:
                raise ApiError(400, "stream serves one prompt without logprobs.", "stream")
            if s["max_tokens"] == 0:
                raise ApiError(400, "stream needs max_tokens >= 1.", "max_tokens")
            return StreamingResponse(stream_completion(rows[0], s, echo, rid, created),
                                     media_type="text/event-stream")
        done = await asyncio.gather(*(complete(ids, s) for ids in rows))
        choices, plans = [], []
        for i, (ids, r) in enumerate(zip(rows, done)):
            prompt_text = model.decode(ids) if model.tokenizer is not None else ""
            choice = {"index": i, "text": (prompt_text if echo else "") + r["text"], "logprobs": None,
                      "finish_reason": r["finish_reason"], "lt_token_ids": r["ids"]}
            if k is not None or r["plan"] is None:
                scored = await asyncio.wrap_future(server.engine.call(partial(
                    server.score, ids + r["ids"], r["plan"] or s["plan"])))
                r["plan"] = r["plan"] or scored["plan"]
                if k is not None:
                    choice["logprobs"] = server.logprobs(ids, r["ids"], r["plan"], echo, k, scored)
            choice["lt_lazy_layers"] = lazy(r["plan"])
            choices.append(choice)
            plans.append(lazy(r["plan"]))
        return {"id": rid, "object": "text_completion", "created": created, "model": server.name,
                "choices": choices, "usage": usage(sum(map(len, rows)), sum(len(r["ids"]) for r in done)),
                "lt_lazy_layers": plans[0]}

    async def stream_completion(ids, s, echo, rid, created):
        def chunk(text, finish=None, plan=None, new=()):
            c = {"id": rid, "object": "text_completion", "created": created, "model": server.name,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                              "lt_token_ids": list(new)}]}
            return _sse(c if plan is None else {**c, "lt_lazy_layers": lazy(plan)})
        if echo:
            yield chunk(model.decode(ids) if model.tokenizer is not None else "")
        n = 0
        async for event in run_one(ids, s):
            if event[0] == "delta":
                n += len(event[2])
                if event[1] or event[2]:
                    yield chunk(event[1], new=event[2])
            else:
                r = event[1]
                yield chunk(r["tail"], r["finish_reason"], r["plan"])
                if s["usage_chunk"]:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": server.name,
                                "choices": [], "usage": usage(len(ids), len(r["ids"]))})
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        s = server.settings(body, "max_tokens")
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects with text content.",
                           "messages")
        tok = model.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError(400, f"the model {server.name!r} has no chat template.", "messages")
        ids = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                      add_generation_prompt=True, tokenize=True)
        ids = [int(t) for t in (ids["input_ids"] if hasattr(ids, "keys") else ids)]
        context = model.config.max_position_embeddings
        s["max_tokens"] = min(CHAT_MAX_TOKENS, context - len(ids)) if s["max_tokens"] is None else s["max_tokens"]
        server.check_length(ids, max(s["max_tokens"], 0), "messages")
        if s["max_tokens"] == 0:
            raise ApiError(400, "max_tokens must be at least 1 for a chat completion.", "max_tokens")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if s["stream"]:
            return StreamingResponse(stream_chat(ids, s, rid, created), media_type="text/event-stream")
        r = await complete(ids, s)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "logprobs": None, "finish_reason": r["finish_reason"], "lt_token_ids": r["ids"]}],
                "usage": usage(len(ids), len(r["ids"])), "lt_lazy_layers": lazy(r["plan"])}

    async def stream_chat(ids, s, rid, created):
        def chunk(delta, finish=None, plan=None):
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.name,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return _sse(c if plan is None else {**c, "lt_lazy_layers": lazy(plan)})
        yield chunk({"role": "assistant", "content": ""})
        async for event in run_one(ids, s):
            if event[0] == "delta":
                if event[1]:
                    yield chunk({"content": event[1]})
            else:
                r = event[1]
                yield chunk({"content": r["tail"]} if r["tail"] else {}, r["finish_reason"], r["plan"])
                if s["usage_chunk"]:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": server.name, "choices": [], "usage": usage(len(ids), len(r["ids"]))})
        yield "data: [DONE]\n\n"

    return app


def _uvicorn_server(config):
    """uvicorn's server, whose SIGTERM / SIGINT only begin the graceful shutdown (uvicorn itself re-raises the
    signal once done, which would end the process by it rather than with exit 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
    return Server(config)


def serve(model, host: str = "127.0.0.1", port: int = 8000, plan: Plan | str | None = None, max_batch: int = 8,
          chunk: int = DEFAULT_CHUNK, name: str | None = None, log_level: str = "info") -> int:
    """Serves until SIGTERM / SIGINT; returns 0 once the requests in flight are finished."""
    import uvicorn
    app = build_app(model, plan, max_batch, chunk, name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    _uvicorn_server(config).run()
    return 0
