"""What the routers of the other API families (Ollama, KoboldAI, llama.cpp) share: reading a
JSON body by hand, starting and draining `Backend.generate`, the served model's name and
context window, and sampling-setting conversions."""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, StringConstraints, ValidationError

from gptj.serve.backends import Backend, Generated
from gptj.serve.guard import APIError

MAX_TOKENS = 1 << 31  # a bound for token counts in bodies (the context window is the real limit)
MAX_STOPS = 16  # as gptj.runtime.sampling.SamplingParams.validate
StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
INFO_TTL = 30.0  # seconds the served model's name and context window are reused
M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request) -> Any:
    """The request's JSON (for routes that pick a body model by its fields)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise APIError(400, "body: must be valid UTF-8 JSON", "body") from None


def validated(model: type[M], data: Any) -> M:
    """`data` as `model`, or the same 400 a FastAPI body parameter gives (naming the field)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


async def start(gen: AsyncIterator[str | Generated]) -> AsyncIterator[str | Generated]:
    """Takes the first (empty) delta: the generation was accepted, or this raises its error."""
    first = await anext(gen)
    assert first == "", first
    return gen


async def drain(gen: AsyncIterator[str | Generated]) -> Generated:
    """The Generated at the end of a started generation."""
    async for item in gen:
        if isinstance(item, Generated):
            return item
    raise APIError(500, "the generation ended without a result", None, "server_error")


def failed(done: Generated) -> APIError | None:
    """The HTTP error for a generation that failed (finish_reason "error")."""
    if done.finish_reason != "error":
        return None
    upstream = (done.error or "").startswith("upstream")
    return APIError(502 if upstream else 500, f"generation failed: {done.error}", None,
                    "upstream_error" if upstream else "server_error")


_served: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> (when, name, context)


async def served(backend: Backend) -> tuple[str, int | None]:
    """The served model's name (the one responses give: `--served-model-name`'s first, locally)
    and context window (None: the upstream does not say)."""
    now = time.monotonic()
    cached = _served.get(backend)
    if cached and now - cached[0] < INFO_TTL:
        return cached[1], cached[2]
    info = await backend.info()
    context = info.get("context_length")
    name = getattr(backend, "name", None) or info["name"]
    _served[backend] = (now, name, int(context) if isinstance(context, int) else None)
    return name, _served[backend][2]


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def nanoseconds(seconds: float | None) -> int:
    return int(round((seconds or 0.0) * 1e9))


def greedy_when_zero(settings: dict) -> dict:
    """llama.cpp's meaning of top_p 0 (and Ollama's, KoboldCpp's): only the most likely token
    (gptj's top_p must be above 0)."""
    if settings.get("top_p") == 0:
        settings["top_p"] = 1.0
        settings["top_k"] = 1
    return settings


def tenant(request: Request) -> str | None:
    return getattr(request.state, "tenant", None)

