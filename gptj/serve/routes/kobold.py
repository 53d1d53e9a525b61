"""The KoboldAI API as KoboldCpp serves it, over either backend, for KoboldAI Lite, SillyTavern
and other Kobold clients.

GET /api/v1/model, /api/v1/info/version, /api/v1/config/max_length,
/api/v1/config/max_context_length (also under /api/latest/), /api/extra/version,
/api/extra/true_max_context_length; POST /api/v1/generate, /api/extra/generate/stream
(server-sent `event: message` / `data: {"token": ...}`), /api/extra/generate/check (the text so
far of a genkey's generation), /api/extra/tokencount, /api/extra/abort.

Fields and defaults follow KoboldCpp's koboldcpp.py: prompt (after `memory`), max_length 200,
max_context_length (capped at the server's window; max_length is cut to leave room, as
KoboldCpp), temperature 0.75, top_p 0.92, top_k 100, min_p 0, rep_pen 1.0, presence_penalty,
stop_sequence (always trimmed from the text, as with trim_stop), sampler_seed (-1: random),
use_default_badwordsids / ban_eos_token (never stop at end of text), genkey. KoboldCpp's other
sampler fields (rep_pen_range, rep_pen_slope, typical, tfs, top_a, mirostat, sampler_order,
dynatemp, dry, xtc, n, quiet, ...) are accepted and ignored. A prompt too long for the context
window is cut from the left. Errors are KoboldCpp's `{"detail": {"msg", "type"}}` with ours
beside it (`error`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field

from gptj.runtime.sampling import MAX_TEMPERATURE
from gptj.serve.backends import Backend, Generated
from gptj.serve.errors import shaped_errors
from gptj.serve.guard import APIError
from gptj.serve.protocol import Body, TokenizeBody
from gptj.serve.routes.common import (
    MAX_STOPS,
    MAX_TOKENS,
    drain,
    failed,
    greedy_when_zero,
    served,
    start,
    tenant,
)

KOBOLD_API_VERSION = "1.2.5"  # KoboldAI's API version, as KoboldCpp reports it
KOBOLDCPP_VERSION = "1.102"  # the KoboldCpp whose extra API this follows
MAX_LENGTH = 1024  # KoboldCpp's default --hordemaxlen: what /api/v1/config/max_length says
FALLBACK_CONTEXT = 2048  # an upstream that does not say its context window
FIELDS = {"max_new_tokens": "max_length", "repetition_penalty": "rep_pen", "seed": "sampler_seed",
          "stop": "stop_sequence"}


class GenerateBody(Body):
    prompt: str = ""
    memory: str = ""  # KoboldCpp: text kept before the prompt
    max_length: int = Field(200, ge=0, le=MAX_TOKENS)
    max_context_length: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.75, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(0.92, ge=0.0, le=1.0)
    top_k: int = Field(100, ge=0, le=MAX_TOKENS)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    rep_pen: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop_sequence: list[str | None] | None = Field(None, max_length=256)
    sampler_seed: int | None = None
    use_default_badwordsids: bool | None = None
    ban_eos_token: bool | None = None
    genkey: str | None = Field(None, max_length=256)
    images: list[str] | None = None
    grammar: str | None = None


class GenkeyBody(Body):
    genkey: str | None = Field(None, max_length=256)


class TokenCountBody(Body):
    prompt: str = ""
    special: bool = True  # KoboldCpp's: count as the model sees it


@dataclass
class Running:
    """A Kobold generation in flight: its abort switch and its text so far."""

    abort: asyncio.Event = field(default_factory=asyncio.Event)
    text: str = ""


def kobold_error(err: APIError) -> dict:
    return {"detail": {"msg": err.message, "type": "bad_input" if err.status < 500 else err.kind},
            "error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}


def router(backend: Backend) -> APIRouter:
    router = APIRouter(route_class=shaped_errors(kobold_error, FIELDS), tags=["KoboldAI"])
    running: dict[tuple[str | None, str], list[Running]] = {}  # by (tenant, genkey): "" when none was given

    async def context_window() -> int:
        _, context = await served(backend)
        return context or FALLBACK_CONTEXT

    def get(*paths: str, **kwargs):  # noqa: ANN202, ANN003
        """One handler under /api/v1/ and /api/latest/ (KoboldAI's alias)."""
        def register(fn):  # noqa: ANN001, ANN202
            for path in paths:
                router.add_api_route(path, fn, methods=["GET"], name=f"{fn.__name__}{path.count('latest')}",
                                     include_in_schema=("latest" not in path), **kwargs)
            return fn
        return register

    @get("/api/v1/model", "/api/latest/model")
    async def model() -> dict:
        """The served model, named as KoboldCpp names its own."""
        name, _ = await served(backend)
        return {"result": f"koboldcpp/{name}"}

    @get("/api/v1/info/version", "/api/latest/info/version")
    async def api_version() -> dict:
        return {"result": KOBOLD_API_VERSION}

    @get("/api/v1/config/max_length", "/api/latest/config/max_length")
    async def max_length() -> dict:
        return {"value": min(MAX_LENGTH, await context_window() // 2)}

    @get("/api/v1/config/max_context_length", "/api/latest/config/max_context_length")
    async def max_context_length() -> dict:
        return {"value": await context_window()}

    @router.get("/api/extra/true_max_context_length")
    async def true_max_context_length() -> dict:
        return {"value": await context_window()}

    @router.get("/api/extra/version")
    async def extra_version(request: Request) -> dict:
        """KoboldCpp's feature report: text generation only."""
        return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": tenant(request) is not None,
                "txt2img": False, "vision": False, "transcribe": False, "multiplayer": False, "websearch": False,
                "tts": False, "embeddings": False, "server": "gptj-studio"}

    async def begin(body: GenerateBody, request: Request) -> tuple[AsyncIterator[str | Generated], Running, tuple]:
        if body.images:
            raise APIError(400, "images: the model takes no images", "images")
        if body.grammar:
            raise APIError(400, "grammar: grammar-constrained sampling is not supported", "grammar")
        stops = [s for s in body.stop_sequence or [] if s]
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop_sequence: at most {MAX_STOPS} stop sequences", "stop_sequence")
        long = next((s for s in stops if len(s) > 256), None)
        if long is not None:
            raise APIError(400, "stop_sequence: each stop sequence must be 1 to 256 characters", "stop_sequence")
        prompt = body.memory + body.prompt
        if not prompt:
            raise APIError(400, "prompt: must not be empty", "prompt")
        # KoboldCpp: the context is the smaller of the request's and the server's, and
        # max_length leaves room for a little prompt
        ours = await context_window()
        context = min(body.max_context_length or ours, ours)
        length = body.max_length
        min_remain = min(context - 4, 16)
        if length >= context - min_remain:
            length = max(context - min_remain, 1)
        ban_eos = body.ban_eos_token if body.ban_eos_token is not None else bool(body.use_default_badwordsids)
        settings = greedy_when_zero({
            "max_new_tokens": length, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
            "min_p": body.min_p, "repetition_penalty": body.rep_pen, "presence_penalty": body.presence_penalty,
            "stop": stops, "seed": body.sampler_seed if body.sampler_seed is not None and body.sampler_seed >= 0 else None,
            "ignore_eos": ban_eos, "truncate_prompt": True})
        entry = Running()
        key = (tenant(request), body.genkey or "")
        gen = backend.generate(request, prompt=prompt, settings=settings, abort=entry.abort)
        running.setdefault(key, []).append(entry)
        try:
            gen = await start(gen)
        except BaseException:
            forget(key, entry)
            raise
        return gen, entry, key

    def forget(key: tuple, entry: Running) -> None:
        entries = running.get(key, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            running.pop(key, None)

    def result(done: Generated) -> dict:
        return {"text": done.text, "finish_reason": done.finish_reason, "logprobs": None,
                "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}

    async def follow(gen: AsyncIterator[str | Generated], entry: Running) -> AsyncIterator[str | Generated]:
        async for item in gen:
            if isinstance(item, str):
                entry.text += item
            yield item

    @router.post("/api/v1/generate")
    @router.post("/api/latest/generate", include_in_schema=False, name="generate_latest")
    async def generate(body: GenerateBody, request: Request) -> dict:
        """The continuation of `prompt`: {"results": [{"text": ...}]}."""
        gen, entry, key = await begin(body, request)
        try:
            async with aclosing(gen):
                done = await drain(follow(gen, entry))
        finally:
            forget(key, entry)
        err = failed(done)
        if err is not None:
            raise err
        return {"results": [result(done)]}

    @router.post("/api/extra/generate/stream")
    async def generate_stream(body: GenerateBody, request: Request) -> Response:
        """The same, streamed as KoboldCpp streams it: `event: message` / `data: {"token": ...}`."""
        gen, entry, key = await begin(body, request)

        def event(data: dict) -> bytes:
            return f"event: message\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            try:
                async with aclosing(gen):
                    async for item in follow(gen, entry):
                        if isinstance(item, Generated):
                            err = failed(item)
                            if err is not None:
                                yield event({"token": "", "finish_reason": "error", "error": err.message})
                            else:
                                yield event({"token": "", "finish_reason": item.finish_reason})
                        elif item:
                            yield event({"token": item, "finish_reason": None})
            finally:
                forget(key, entry)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.post("/api/extra/generate/check")
    async def check(body: GenkeyBody, request: Request) -> dict:
        """The text so far of the caller's generation with that genkey (KoboldCpp's polling)."""
        entries = running.get((tenant(request), body.genkey or ""), [])
        return {"results": [{"text": entries[-1].text if entries else ""}]}

    @router.post("/api/extra/abort", openapi_extra={"requestBody": {"required": False, "content": {
        "application/json": {"schema": GenkeyBody.model_json_schema()}}}})  # optional: read by hand
    async def abort(request: Request) -> dict:
        """Stops the caller's generation with that genkey, or all of the caller's (its API key's)
        when none is given; what they generated so far is their answer."""
        try:
            data = json.loads(await request.body() or b"{}")
        except (ValueError, RecursionError):
            data = {}
        genkey = data.get("genkey") if isinstance(data, dict) else None
        if genkey is not None and not isinstance(genkey, str):
            raise APIError(400, "genkey: must be a string", "genkey")
        who = tenant(request)
        if genkey:
            targets = list(running.get((who, genkey), []))
        else:
            targets = [e for (t, _), entries in running.items() if t == who for e in entries]
        for entry in targets:
            entry.abort.set()
        return {"success": "true" if targets else "false", "done": "true" if targets else "false"}

    @router.post("/api/extra/tokencount")
    async def tokencount(body: TokenCountBody) -> dict:
        """{"value": n, "ids": [...]}: the prompt's tokens as generation sees them."""
        tokens = await backend.tokenize(TokenizeBody(content=body.prompt, parse_special=True), body.prompt)
        return {"value": len(tokens["tokens"]), "ids": tokens["tokens"]}

    return router
