"""Ollama's API over either backend, so Ollama's clients (the `ollama` Python and JS packages,
Open WebUI, Continue, ...) can use this server: point them at it, or serve on Ollama's own port
(`gptj serve --port 11434`).

GET /api/tags, /api/ps, /api/version; POST /api/show, /api/generate, /api/chat (newline-
delimited JSON streams unless `stream: false`). The server holds one model: any model name is
answered, and responses name the served one. Options: num_predict (-1, -2: until the context
is full), temperature, top_p, top_k, min_p, repeat_penalty, presence_penalty,
frequency_penalty, seed (-1: random), stop, num_ctx (checked, not applied: the context window
is the server's; a prompt too long for it is cut from the left, as Ollama does); other options
are ignored. `format`: "json" (any JSON object) or a JSON schema constrains the output
(gptj.runtime.constraints). What cannot be honoured is a 400 naming the field: images,
`template`, `suffix`, `context`, tools, thinking, logprobs. /api/embed and /api/embeddings
answer 501. Errors are Ollama's shape, `{"error": "<field>: <message>"}`."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gptj.runtime.sampling import MAX_TEMPERATURE
from gptj.serve.backends import Backend, Generated
from gptj.serve.errors import shaped_errors
from gptj.serve.guard import APIError
from gptj.serve.protocol import Body
from gptj.serve.routes.common import (
    MAX_STOPS,
    MAX_TOKENS,
    StopString,
    drain,
    failed,
    greedy_when_zero,
    nanoseconds,
    now_iso,
    served,
    start,
)

OLLAMA_VERSION = "0.6.3"  # the Ollama API version these routes follow
# the engine's setting names -> Ollama's, for errors the engine finds
FIELDS = {"max_new_tokens": "options.num_predict", "temperature": "options.temperature", "top_p": "options.top_p",
          "top_k": "options.top_k", "min_p": "options.min_p", "repetition_penalty": "options.repeat_penalty",
          "presence_penalty": "options.presence_penalty", "frequency_penalty": "options.frequency_penalty",
          "seed": "options.seed", "stop": "options.stop", "json_schema": "format"}
NDJSON = "application/x-ndjson"


class Options(BaseModel):
    """Ollama's `options` (a Modelfile's parameters); the ones not listed are ignored."""

    model_config = ConfigDict(extra="ignore")
    num_predict: int | None = Field(None, ge=-2, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Annotated[list[StopString], Field(max_length=MAX_STOPS)] | StopString | None = None
    num_ctx: int | None = Field(None, ge=1, le=MAX_TOKENS)


class OllamaRequest(Body):
    model: str | None = None  # any name: this server holds one model
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | float | None = None  # accepted: the model stays loaded anyway
    think: bool | str | None = None
    logprobs: bool | None = None


class GenerateBody(OllamaRequest):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tool_calls, thinking, tool_name
    role: Literal["system", "user", "assistant"]
    content: str = ""  # the ollama package leaves out an empty content
    images: list[str] | None = None


class ChatBody(OllamaRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class ShowBody(Body):
    model: str | None = None
    name: str | None = None  # the old name of `model`
    verbose: bool = False


def refuse(body: OllamaRequest) -> None:
    """A 400 naming the first field asking for what this server cannot do."""
    if isinstance(body.format, str) and body.format not in ("", "json"):
        raise APIError(400, 'format: must be "json" or a JSON schema (an object)', "format")
    if body.think not in (None, False, "", "false"):
        raise APIError(400, "think: the model does not support thinking", "think")
    if body.logprobs:
        raise APIError(400, "logprobs: not supported on Ollama's API here; use /v1/completions' logprobs", "logprobs")


def settings_of(options: Options | None, output_format: str | dict[str, Any] | None = None) -> dict:
    """gptj settings for Ollama's options and format; what is not set takes gptj's defaults
    (num_predict: until the end of text or of the context window, as Ollama)."""
    o = options or Options()
    settings: dict[str, Any] = {"max_new_tokens": None if o.num_predict is None or o.num_predict < 0 else o.num_predict,
                                "truncate_prompt": True}
    for ours, theirs in (("temperature", o.temperature), ("top_p", o.top_p), ("top_k", o.top_k), ("min_p", o.min_p),
                         ("repetition_penalty", o.repeat_penalty), ("presence_penalty", o.presence_penalty),
                         ("frequency_penalty", o.frequency_penalty)):
        if theirs is not None:
            settings[ours] = theirs
    if o.seed is not None and o.seed >= 0:
        settings["seed"] = o.seed
    if o.stop:
        settings["stop"] = [o.stop] if isinstance(o.stop, str) else list(o.stop)
    if output_format:  # "json": any JSON object; a dict: its schema (refuse() checked the rest)
        settings["json_schema"] = True if output_format == "json" else output_format
    return greedy_when_zero(settings)


def stats(done: Generated) -> dict:
    first = done.time_to_first_token or 0.0
    return {"total_duration": nanoseconds(done.seconds), "load_duration": 0,
            "prompt_eval_count": done.prompt_tokens, "prompt_eval_duration": nanoseconds(first),
            "eval_count": done.completion_tokens, "eval_duration": nanoseconds(max(done.seconds - first, 0.0))}


def line(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def ollama_error(err: APIError) -> dict:
    return {"error": err.message}


def router(backend: Backend) -> APIRouter:
    router = APIRouter(route_class=shaped_errors(ollama_error, FIELDS), tags=["Ollama"])

    async def model_name() -> str:
        name, _ = await served(backend)
        return name if ":" in name else f"{name}:latest"

    async def details() -> tuple[dict, dict]:
        info = await backend.info()
        arch = info.get("architecture") or "unknown"
        params = info.get("parameters")
        size = "" if not params else f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
        d = {"parent_model": "", "format": info.get("format") or "", "family": arch, "families": [arch],
             "parameter_size": size, "quantization_level": info.get("quantization") or ""}
        return d, info

    def file_size(info: dict) -> int:
        try:
            return os.path.getsize(info.get("path") or "")
        except OSError:
            return 0

    async def listing(running: bool) -> dict:
        d, info = await details()
        entry = {"name": await model_name(), "model": await model_name(), "modified_at": now_iso(),
                 "size": file_size(info), "digest": "", "details": d}
        if running:
            entry.update(expires_at="2999-01-01T00:00:00Z", size_vram=0, context_length=info.get("context_length"))
        return {"models": [entry]}

    @router.get("/api/version")
    async def version() -> dict:
        """Ollama's version call: the Ollama API version these routes follow."""
        return {"version": OLLAMA_VERSION}

    @router.get("/api/tags")
    async def tags() -> dict:
        """The models there are: the one this server holds."""
        return await listing(False)

    @router.get("/api/ps")
    async def ps() -> dict:
        """The models loaded: the one this server holds (it stays loaded)."""
        return await listing(True)

    @router.post("/api/show")
    async def show(body: ShowBody) -> dict:
        """The served model's details, whatever name is asked for."""
        d, info = await details()
        arch, context = d["family"], info.get("context_length")
        model_info: dict[str, Any] = {"general.architecture": arch, "general.name": info.get("name")}
        if info.get("parameters"):
            model_info["general.parameter_count"] = info["parameters"]
        if context:
            model_info[f"{arch}.context_length"] = context
        defaults = info.get("defaults") or {}
        names = {"max_new_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
        parameters = "\n".join(f"{names.get(k, k):<30} {v}" for k, v in defaults.items())
        template = "{{ .Prompt }}" if not backend.chat_template() else ""
        return {"modelfile": f"# served by gptj-studio\nFROM {info.get('path') or info.get('name')}\n",
                "parameters": parameters, "template": template, "details": d, "model_info": model_info,
                "capabilities": ["completion"], "modified_at": now_iso()}

    async def respond(request: Request, stream: bool, name: str, gen: AsyncIterator[str | Generated],
                      shape: Any) -> Response:
        """`shape(text, done)` is one response object (done: the final one)."""
        gen = await start(gen)
        if not stream:
            async with aclosing(gen):
                done = await drain(gen)
            err = failed(done)
            if err is not None:
                raise err
            return JSONResponse({"model": name, "created_at": now_iso(), **shape(done.text, True),
                                 "done_reason": done.finish_reason, **stats(done)})

        async def lines() -> AsyncIterator[bytes]:
            async with aclosing(gen):
                async for item in gen:
                    if isinstance(item, Generated):
                        err = failed(item)
                        if err is not None:
                            yield line({"error": err.message})
                            return
                        yield line({"model": name, "created_at": now_iso(), **shape("", True),
                                    "done_reason": item.finish_reason, **stats(item)})
                    elif item:
                        yield line({"model": name, "created_at": now_iso(), **shape(item, False)})

        return StreamingResponse(lines(), media_type=NDJSON)

    @router.post("/api/generate")
    async def generate(body: GenerateBody, request: Request) -> Response:
        """A completion of `prompt` (through the chat template unless `raw`, as Ollama)."""
        refuse(body)
        for field in ("suffix", "template", "context", "images"):
            if getattr(body, field):
                what = {"suffix": "fill-in-the-middle (suffix) is not supported",
                        "template": "custom prompt templates are not supported; lay the prompt out and send raw: true",
                        "context": "not supported; send the conversation to /api/chat",
                        "images": "the model takes no images"}[field]
                raise APIError(400, f"{field}: {what}", field)
        name = await model_name()
        if not body.prompt:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            unload = body.keep_alive in (0, "0", "0s", "0m")
            return JSONResponse({"model": name, "created_at": now_iso(), "response": "", "done": True,
                                 "done_reason": "unload" if unload else "load"})
        settings = settings_of(body.options, body.format)
        if body.raw or not backend.chat_template():
            prompt = body.prompt if body.raw or not body.system else f"{body.system}\n\n{body.prompt}"
            gen = backend.generate(request, prompt=prompt, settings=settings)
        else:
            messages = [{"role": "system", "content": body.system}] if body.system else []
            messages.append({"role": "user", "content": body.prompt})
            gen = backend.generate(request, messages=messages, settings=settings)
        return await respond(request, body.stream, name, gen,
                             lambda text, done: {"response": text, "done": done})

    @router.post("/api/chat")
    async def chat(body: ChatBody, request: Request) -> Response:
        """The assistant's next message in `messages`, or the rest of the last one where it is the
        assistant's (a prefill)."""
        refuse(body)
        if body.tools:
            raise APIError(400, "tools: the model does not support tools", "tools")
        for i, m in enumerate(body.messages):
            if m.images:
                raise APIError(400, f"messages.{i}.images: the model takes no images", f"messages.{i}.images")
        name = await model_name()
        if not body.messages:  # load / unload
            unload = body.keep_alive in (0, "0", "0s", "0m")
            return JSONResponse({"model": name, "created_at": now_iso(),
                                 "message": {"role": "assistant", "content": ""}, "done": True,
                                 "done_reason": "unload" if unload else "load"})
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        # as Ollama: a last message of the assistant's is continued, not answered (a prefill)
        gen = backend.generate(request, messages=messages, settings=settings_of(body.options, body.format),
                               continue_final_message=messages[-1]["role"] == "assistant")
        return await respond(request, body.stream, name, gen,
                             lambda text, done: {"message": {"role": "assistant", "content": text}, "done": done})

    @router.post("/api/embed", include_in_schema=False)  # a 501 whatever is sent: nothing to document
    async def embed() -> Response:
        """Not available: the served model is a text generator."""
        raise APIError(501, "embeddings are not supported by this server (it serves a text-generation model)",
                       None, "not_implemented")

    @router.post("/api/embeddings", include_in_schema=False)  # a 501 whatever is sent: nothing to document
    async def embeddings() -> Response:
        """Not available: the served model is a text generator."""
        raise APIError(501, "embeddings are not supported by this server (it serves a text-generation model)",
                       None, "not_implemented")

    return router
