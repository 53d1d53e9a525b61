"""`gptj serve`: the playground page and the HTTP APIs (OpenAI- and EleutherAI-compatible)
on one engine. Every generation goes through `gptj.engine`; this module only translates.

Serving many users: requests share the engine's running batch (`--parallel`); past it, up to
`--max-queue` wait, and more get 503 with Retry-After ("queue full ..., try again later").
A request past `--request-timeout` seconds (queueing included) ends with what it has, with
finish_reason "timeout"; one still running when the server shuts down after `--shutdown-grace`
seconds ends with finish_reason "shutdown". Both are passed on as they are in every API (the
OpenAI clients accept them; they are not "length", so a client can tell a limit it set from
one the server imposed). A client that disconnects leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from gptj.api import Model, sampling_params
from gptj.chat import ChatSession
from gptj.engine import Completion, RequestHandle, TokenInfo
from gptj.errors import InvalidRequest, Unavailable
from gptj.http_guard import (
    LOOPBACK_NAMES,
    APIError,
    ClientDisconnected,
    RequestCounts,
    api_key_list,
    cache_scope,
    error_response,
    install_guard,
    mount_page,
)
from gptj.presets import load_presets
from gptj.tokenizer import load_tokenizer

MAX_N = 8
MAX_CACHE_SALT = 256


def lone_surrogate(value: Any) -> str | None:
    """The path (`messages.0.content`) of the first string in a parsed JSON body that holds a
    lone surrogate, which json.loads accepts and no tokenizer can encode; None if there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item))
    return None


class Body(BaseModel):
    """Every request body: strings must be valid Unicode (no lone surrogates), checked once
    here for every field, so no route can forget it."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "holds a lone surrogate, which is not valid Unicode text",
                                      {"field": where})
        return data


# ---- request bodies ----------------------------------------------------------------------------

StopField = str | list[str] | None


class Settings(Body):
    """Sampling settings shared by the OpenAI endpoints (OpenAI's defaults and ranges)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: StopField = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    user: str | None = None
    truncate: bool = False  # left-truncate a prompt that does not fit (TGI's `truncate`, as a flag)
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, max_length=MAX_CACHE_SALT)  # vLLM's: share cached prefixes only within it


class CompletionBody(Settings):
    prompt: str | list[str] | list[int] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Settings):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompleteBody(Body):
    """mesh-transformer-jax's device_serve.py: POST /complete."""

    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temp: float = Field(1.0, ge=0.0, le=2.0)
    length: int = Field(512, ge=1)


class HostedCompletionBody(Body):
    """The old hosted EleutherAI API: POST /completion (clients sent camelCase too)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0, alias="topP")
    temp: float = Field(1.0, ge=0.0, le=2.0)
    response_length: int = Field(128, ge=1, alias="responseLength")
    remove_input: bool = Field(False, alias="removeInput")


class TokenizeBody(Body):
    text: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name
    tokenizer: str | None = None  # "gpt-j" for GPT-2 BPE; default: the served model's
    add_special: bool = False


class DetokenizeBody(Body):
    tokens: list[int]
    tokenizer: str | None = None


# ---- helpers -----------------------------------------------------------------------------------


def first_set(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def engine_settings(body: Settings, max_tokens: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return dict(
        max_new_tokens=max_tokens if max_tokens is not None else 16,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=stop,
        seed=body.seed,
        truncate_prompt=body.truncate,
        ignore_eos=body.ignore_eos,
    )


def tokenize_json(tokenizer, text: str, add_special: bool) -> dict:  # noqa: ANN001
    ids = tokenizer.encode(text, allow_special=add_special)
    return {"count": len(ids), "tokens": ids, "pieces": [piece_json(tokenizer, i) for i in ids]}


def piece_json(tokenizer, token_id: int) -> dict[str, Any]:  # noqa: ANN001
    raw = tokenizer.token_bytes(token_id)
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # part of a multi-byte character: show the bytes (as llama.cpp's with_pieces)
    return {"id": token_id, "text": text, "bytes": list(raw)}


def token_str(tokenizer, token_id: int) -> str:  # noqa: ANN001
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics(RequestCounts):
    def __init__(self) -> None:
        super().__init__()
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)  # not cumulative; summed up when shown
        self.gen_seconds, self.gen_tokens = 0.0, 0

    def observe(self, c: Completion, seconds: float) -> None:
        if c.time_to_first_token is not None:
            self.ttft_sum += c.time_to_first_token
            self.ttft_count += 1
            i = bisect.bisect_left(TTFT_BUCKETS, c.time_to_first_token)
            if i < len(TTFT_BUCKETS):
                self.ttft_buckets[i] += 1
        self.gen_seconds += seconds
        self.gen_tokens += c.completion_tokens


def install_error_handlers(app: FastAPI) -> None:
    """The JSON error format ({"error": {message, type, param, code}}) for every failure: also
    used by the upstream front (gptj.upstream), so both answer errors the same way."""

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(InvalidRequest)
    async def on_invalid(_: Request, err: InvalidRequest) -> JSONResponse:
        if err.field == "max_new_tokens":  # the engine's name for what HTTP clients send as max_tokens
            return error_response(APIError(400, "max_tokens" + str(err).removeprefix("max_new_tokens"), "max_tokens"))
        return error_response(APIError(400, str(err), err.field))

    @app.exception_handler(Unavailable)
    async def on_full(_: Request, err: Unavailable) -> JSONResponse:
        return error_response(APIError(503, str(err), None, "server_busy", {"Retry-After": "2"}))

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or "body"
        message = first.get("msg", "invalid request")
        if first.get("type") == "lone_surrogate":
            param = first.get("ctx", {}).get("field", param)
            message = f"{param}: {message}"
        elif first.get("type") == "json_invalid":
            message, param = "body: must be valid UTF-8 JSON", "body"
        else:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param))

    # Starlette's class: FastAPI raises it for unknown routes and bodies it cannot decode.
    @app.exception_handler(HTTPException)
    async def on_http(_: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 400 and err.detail == "There was an error parsing the body":  # e.g. not UTF-8
            return error_response(APIError(400, "body: must be valid UTF-8 JSON", "body"))
        param = "body" if err.status_code == 413 else None
        return error_response(APIError(err.status_code, str(err.detail), param, headers=err.headers))


# ---- the app -----------------------------------------------------------------------------------


def create_app(model: Model, *, api_key: str | list[str] | None = None, cors_origins: list[str] | None = None,
               request_timeout: float | None = None, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The app. `api_key`: one key or several (one per tenant: tenants never share cached
    prefixes). `allowed_hosts`: the Host names it answers (None: any). `request_timeout`:
    seconds (queueing included) after which a generation ends with finish_reason "timeout";
    None or 0: no limit."""
    app = FastAPIOffline(title="GPT-J Studio", version="0.1.0", redoc_url=None,
                         description="OpenAI- and EleutherAI-compatible APIs for GPT-J")
    app.state.model = model
    metrics = Metrics()
    chat = ChatSession(model)
    tokenizer = model.tokenizer
    started = time.time()
    timeout = request_timeout or None

    def path_label(path: str) -> str:
        """The route, not the raw path: unknown paths must not grow /metrics without bound."""
        if path.startswith(("/static/", "/static-offline-docs/")):
            return "/static"
        routes = {getattr(r, "path", None) for r in app.routes}
        return path if path in routes else "other"

    install_guard(app, metrics, path_label, api_keys=api_key_list(api_key), hosts=allowed_hosts)
    if cors_origins:  # added last, so outermost: errors from the guard (401, 413) carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Retry-After"])

    install_error_handlers(app)

    def check_model(name: str | None) -> None:
        if name and name not in (model.name, "default", model.info.path) and name.lower() not in ("gpt-j", "gptj"):
            raise APIError(404, f"model: unknown model {name!r}; this server serves {model.name!r}", "model", "model_not_found")

    # ---- page and info ----

    mount_page(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.name, "uptime_s": round(time.time() - started, 1)}

    @app.get("/api/info")
    async def info() -> dict:
        d = model.info.as_dict()
        d["context_length"] = model.context_length
        defaults = sampling_params()
        d["defaults"] = {k: getattr(defaults, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        d["parallel"] = model.engine.max_batch
        return d

    @app.get("/api/presets")
    async def presets() -> dict:
        found, errors = load_presets()
        return {"presets": [p.as_dict() for p in found.values()], "errors": errors}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": int(started), "owned_by": "gptj-studio"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        engine = model.engine
        s = engine.stats
        buckets, total = [], 0
        for le, n in zip(TTFT_BUCKETS, metrics.ttft_buckets, strict=True):
            total += n
            buckets.append(f'gptj_time_to_first_token_seconds_bucket{{le="{le}"}} {total}')
        lines = [
            "# HELP gptj_requests_total HTTP requests by route ('other': no such route)",
            "# TYPE gptj_requests_total counter",
            *[f'gptj_requests_total{{path="{p}"}} {n}' for p, n in sorted(metrics.requests.items())],
            "# HELP gptj_errors_total HTTP responses with status >= 400 (503: queue full or shutting down)",
            "# TYPE gptj_errors_total counter",
            *[f'gptj_errors_total{{status="{c}"}} {n}' for c, n in sorted(metrics.errors.items())],
            "# HELP gptj_generations_total generation requests finished, by finish_reason",
            "# TYPE gptj_generations_total counter",
            *[f'gptj_generations_total{{finish_reason="{r}"}} {n}' for r, n in sorted(engine.finish_reasons.items())],
            "# TYPE gptj_generated_tokens_total counter",
            f"gptj_generated_tokens_total {s['generated_tokens']}",
            "# TYPE gptj_prompt_tokens_total counter",
            f"gptj_prompt_tokens_total {s['prompt_tokens']}",
            "# TYPE gptj_cached_prompt_tokens_total counter",
            f"gptj_cached_prompt_tokens_total {s['cached_prompt_tokens']}",
            "# HELP gptj_queue_depth requests waiting for a place in the batch",
            "# TYPE gptj_queue_depth gauge",
            f"gptj_queue_depth {engine.queue_depth}",
            "# TYPE gptj_queue_limit gauge",
            f"gptj_queue_limit {engine.max_queue}",
            "# HELP gptj_batch_size requests in the running batch",
            "# TYPE gptj_batch_size gauge",
            f"gptj_batch_size {engine.batch_size}",
            "# TYPE gptj_batch_limit gauge",
            f"gptj_batch_limit {engine.max_batch}",
            "# HELP gptj_prefix_cache_bytes keys/values of earlier prompts kept for reuse (bounded by --prefix-cache)",
            "# TYPE gptj_prefix_cache_bytes gauge",
            f"gptj_prefix_cache_bytes {engine.prefix_store.nbytes if engine.prefix_store else 0}",
            "# HELP gptj_time_to_first_token_seconds from arrival (queueing included) to the first token",
            "# TYPE gptj_time_to_first_token_seconds histogram",
            *buckets,
            f'gptj_time_to_first_token_seconds_bucket{{le="+Inf"}} {metrics.ttft_count}',
            f"gptj_time_to_first_token_seconds_sum {metrics.ttft_sum:.6f}",
            f"gptj_time_to_first_token_seconds_count {metrics.ttft_count}",
            "# HELP gptj_tokens_per_second tokens generated per second over the last 10 s, all requests together",
            "# TYPE gptj_tokens_per_second gauge",
            f"gptj_tokens_per_second {engine.tokens_per_second(10.0):.3f}",
            "# HELP gptj_request_tokens_per_second mean speed of one request: its tokens over its time",
            "# TYPE gptj_request_tokens_per_second gauge",
            f"gptj_request_tokens_per_second {metrics.gen_tokens / metrics.gen_seconds if metrics.gen_seconds else 0:.3f}",
        ]
        return "\n".join(lines) + "\n"

    # ---- tokenizer ----

    def pick_tokenizer(name: str | None):  # noqa: ANN202
        if not name:
            return tokenizer
        try:
            return load_tokenizer(name)
        except (ValueError, OSError) as exc:
            raise APIError(400, f"tokenizer: {exc}", "tokenizer") from None

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict:
        text = body.text if body.text is not None else body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "text: required (the text to split into tokens)", "text")
        tok = pick_tokenizer(body.tokenizer)
        # a worker thread: a 1 MB text takes a while, and the event loop must stay free
        return await asyncio.to_thread(tokenize_json, tok, text, body.add_special)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict:
        tok = pick_tokenizer(body.tokenizer)
        bad = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is outside 0..{tok.vocab_size - 1}", "tokens")
        return {"text": tok.decode(body.tokens)}

    # ---- generation core ----

    def submit_all(prompt_ids: list[int], settings: dict, n: int, logprobs: int | None, request: Request,
                   salt: str | None = None, prompt_logprobs: int | None = None) -> list[RequestHandle]:
        """n requests for one prompt; only the first computes the prompt's logprobs (once per
        request, in its prefill chunks). Cached prefixes are shared only within the caller's
        API key and cache_salt."""
        # The handlers wait without driving: a thread must (`gptj serve` runs it in the main thread).
        model.engine.start_background()
        scope = cache_scope(getattr(request.state, "tenant", None), salt)
        handles = []
        for i in range(n):
            s = dict(settings)
            if s.get("seed") is not None:
                s["seed"] = s["seed"] + i
            if logprobs is not None:
                s["logprobs"] = logprobs
            if i == 0 and prompt_logprobs is not None:
                s["prompt_logprobs"] = prompt_logprobs
            try:
                handles.append(model.engine.submit(prompt_ids, sampling_params(**s), timeout=timeout,
                                                   cache_scope=scope))
            except Exception:
                for h in handles:
                    h.cancel()
                raise
        return handles

    async def wait_all(handles: list[RequestHandle], request: Request) -> list[Completion]:
        """Completions of all handles; a client that goes away cancels them."""
        t0 = time.monotonic()

        async def until_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async def completion(h: RequestHandle) -> Completion:
            async for _ in h:
                pass
            assert h.completion is not None
            return h.completion

        gone = asyncio.ensure_future(until_disconnect())
        done = asyncio.ensure_future(asyncio.gather(*(completion(h) for h in handles)))
        try:
            await asyncio.wait([gone, done], return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                raise ClientDisconnected
            results = done.result()
        finally:
            for task in (gone, done):
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nothing left unretrieved
            for h in handles:
                h.cancel()
        for c in results:
            metrics.observe(c, time.monotonic() - t0)
        return results

    async def stream_all(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, StreamEvent | Completion) as they arrive, woken by the engine; cancels
        on disconnect (the response is cancelled, and this generator with it)."""
        t0 = time.monotonic()
        arrivals: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def forward(i: int, h: RequestHandle) -> None:
            async for item in h:
                await arrivals.put((i, item))

        tasks = [asyncio.ensure_future(forward(i, h)) for i, h in enumerate(handles)]
        try:
            remaining = len(handles)
            while remaining:
                i, item = await arrivals.get()
                if isinstance(item, Completion):
                    remaining -= 1
                    metrics.observe(item, time.monotonic() - t0)
                yield i, item
        finally:  # also runs when the client disconnects and the response is cancelled
            for t in tasks:
                t.cancel()
            for h in handles:
                h.cancel()

    def completion_logprobs(tokens: list, offset: int) -> dict:
        ids = [t.id for t in tokens]
        strs = [token_str(tokenizer, i) for i in ids]
        offsets, pos = [], offset
        for s in strs:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": strs,
            "token_ids": ids,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_str(tokenizer, i): lp for i, lp in t.top_logprobs} for t in tokens],
            "text_offset": offsets,
        }

    def usage(results: list[Completion]) -> dict:
        prompt = results[0].prompt_tokens if results else 0
        gen = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen,
                "prompt_tokens_details": {"cached_tokens": results[0].cached_prompt_tokens if results else 0}}

    async def prompt_ids_of(prompt: str | list[str] | list[int]) -> tuple[list[int], str]:
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside 0..{model.config.vocab_size - 1}", "prompt")
            return ids, tokenizer.decode(ids)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: send one prompt per request (a list of exactly one string)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", "prompt")
        return await encode(prompt, "prompt"), prompt

    async def encode(text: str, field: str) -> list[int]:
        """Token ids off the event loop; an invalid text is a 400 naming `field`."""
        try:
            return await asyncio.to_thread(tokenizer.encode, text, True)
        except InvalidRequest as exc:
            raise InvalidRequest(field, str(exc).partition(": ")[2]) from None

    def finish_reason(c: Completion) -> str:
        if c.finish_reason == "error":
            raise APIError(500, f"generation failed: {c.error}", None, "server_error")
        return c.finish_reason

    # ---- OpenAI ----

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        check_model(body.model)
        ids, prompt_text = await prompt_ids_of(body.prompt)
        settings = engine_settings(body, first_set(body.max_completion_tokens, body.max_tokens))
        echo_text = prompt_text if body.echo else ""
        echo_logprobs = body.logprobs if body.echo else None
        handles = submit_all(ids, settings, body.n, body.logprobs, request, body.cache_salt, echo_logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model.name, "choices": choices, **extra}

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                finals: list[Completion] = []
                offsets = [len(echo_text)] * body.n
                arrivals = stream_all(handles)
                held: list[tuple[int, Any]] = []
                if echo_text:
                    echo_lp = None
                    if echo_logprobs is not None:  # the prompt's logprobs come with its text: wait for them
                        async for i, item in arrivals:
                            held.append((i, item))
                            infos = item.prompt_logprobs if i == 0 else None
                            if infos is not None or i == 0 and isinstance(item, Completion):
                                echo_lp = prompt_logprobs_json(infos, body.logprobs) if infos else None
                                break
                    for i in range(body.n):
                        yield sse(chunk([{"index": i, "text": echo_text, "logprobs": echo_lp, "finish_reason": None}]))

                async def rest() -> AsyncIterator[tuple[int, Any]]:
                    for pair in held:
                        yield pair
                    async for pair in arrivals:
                        yield pair

                async for i, item in rest():
                    if isinstance(item, Completion):
                        finals.append(item)
                        extra = {"usage": usage(finals)} if len(finals) == body.n else {}
                        yield sse(chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": finish_reason(item)}], **extra))
                    elif item.text or item.tokens:
                        lp = completion_logprobs(item.tokens, offsets[i]) if body.logprobs is not None else None
                        offsets[i] += len(item.text)
                        yield sse(chunk([{"index": i, "text": item.text, "logprobs": lp, "finish_reason": None}]))
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await wait_all(handles, request)
        echo_lp = None
        if echo_logprobs is not None and results[0].prompt_logprobs:
            echo_lp = prompt_logprobs_json(results[0].prompt_logprobs, echo_logprobs)
        choices = []
        for i, c in enumerate(results):
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(c.token_infos[: len(c.tokens)], len(echo_text))
                if echo_lp is not None:
                    lp = {k: echo_lp[k] + lp[k] for k in lp}
            choices.append({"index": i, "text": echo_text + c.text, "logprobs": lp, "finish_reason": finish_reason(c)})
        return JSONResponse(chunk(choices, usage=usage(results)))

    def prompt_logprobs_json(infos: list[TokenInfo], top: int) -> dict:
        """OpenAI's legacy logprobs for the prompt (echo): the first token has none."""
        tokens, offsets, pos = [], [], 0
        for t in infos:
            s = token_str(tokenizer, t.id)
            tokens.append(s)
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_ids": [t.id for t in infos],
                "token_logprobs": [t.logprob for t in infos],
                "top_logprobs": [None if t.logprob is None else
                                 {token_str(tokenizer, i): lp for i, lp in t.top_logprobs[:top]} for t in infos],
                "text_offset": offsets}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        settings = engine_settings(body, first_set(body.max_completion_tokens, body.max_tokens, 256))
        # templating and tokenizing a long conversation take a while: off the event loop
        prompt, settings, dropped = await asyncio.to_thread(chat.prepare, messages, settings)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        handles = submit_all(await encode(prompt, "messages"), settings, body.n, logprobs, request, body.cache_salt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        info = {"dropped_messages": dropped}

        def chat_logprobs(tokens: list) -> dict:
            return {"content": [{"token": token_str(tokenizer, t.id), "logprob": t.logprob,
                                 "bytes": list(tokenizer.token_bytes(t.id)),
                                 "top_logprobs": [{"token": token_str(tokenizer, i), "logprob": lp} for i, lp in t.top_logprobs]}
                                for t in tokens]}

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model.name, "choices": choices, **extra}

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                finals: list[Completion] = []
                started_text = [False] * body.n
                for i in range(body.n):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], gptj=info))
                async for i, item in stream_all(handles):
                    if isinstance(item, Completion):
                        finals.append(item)
                        extra = {"usage": usage(finals)} if len(finals) == body.n else {}
                        yield sse(chunk([{"index": i, "delta": {}, "finish_reason": finish_reason(item)}], **extra))
                        continue
                    text = item.text
                    if not started_text[i] and not chat.template:
                        text = text.lstrip()  # the play script's space after "Name:"
                    started_text[i] = started_text[i] or bool(text)
                    delta = {"content": text}
                    choice = {"index": i, "delta": delta, "finish_reason": None}
                    if logprobs is not None:
                        choice["logprobs"] = chat_logprobs(item.tokens)
                    if text or logprobs is not None:
                        yield sse(chunk([choice]))
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await wait_all(handles, request)
        choices = []
        for i, c in enumerate(results):
            text = c.text if chat.template else chat.script.clean_reply(c.text)
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(c)}
            if logprobs is not None:
                choice["logprobs"] = chat_logprobs(c.token_infos[: len(c.tokens)])
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model.name,
                             "choices": choices, "usage": usage(results), "gptj": info})

    # ---- EleutherAI ----

    async def simple_generate(context: str, temp: float, top_p: float, length: int, request: Request) -> Completion:
        if not context:
            raise APIError(400, "context: must not be empty", "context")
        ids = await encode(context, "context")
        length = min(length, model.context_length - 1)
        settings = dict(max_new_tokens=length, temperature=temp, top_p=top_p, top_k=0, truncate_prompt=True)
        (result,) = await wait_all(submit_all(ids, settings, 1, None, request), request)
        finish_reason(result)
        return result

    @app.post("/complete")
    async def complete(body: CompleteBody, request: Request) -> dict:
        """mesh-transformer-jax's server: the continuation only, 512 tokens by default."""
        result = await simple_generate(body.context, body.temp, body.top_p, body.length, request)
        return {"completion": result.text}

    @app.post("/completion")
    async def hosted_completion(body: HostedCompletionBody, request: Request) -> list[dict]:
        """The old hosted API: a list with one generated_text, the context included unless remove_input."""
        result = await simple_generate(body.context, body.temp, body.top_p, body.response_length, request)
        text = result.text if body.remove_input else body.context + result.text
        return [{"generated_text": text}]

    return app
