"""llama.cpp's server API for its own clients, over either backend: `POST /completion` with a
`prompt` (EleutherAI's old `/completion` has `context`; gptj.serve.routes.eleuther tells the two
apart and hands llama.cpp's bodies here). `/tokenize` and `/detokenize` take llama.cpp's
fields too (gptj.serve.routes.tokenize).

Fields and defaults as llama.cpp's tools/server/README.md: prompt (a string, or token ids),
n_predict (-1: until the end of text or of the context window), temperature 0.8 (below 0:
greedy), top_k 40 (0 or less: off), top_p 0.95, min_p 0.05, repeat_penalty 1.0,
presence_penalty, frequency_penalty, seed (-1: random), stop, ignore_eos, stream, json_schema
(JSON output valid for the schema, gptj.runtime.constraints). The answer:
{content, stop, stop_type, stopping_word, tokens_predicted, tokens_evaluated, tokens_cached,
truncated, model, prompt, generation_settings, timings}; streamed as server-sent events
`data: {"content": ..., "stop": false}` and a last event with `stop: true` and the rest. What
cannot be honoured is a 400 naming the field: n_probs, grammar, image_data, more
than one prompt. Other fields (cache_prompt, n_keep, samplers, id_slot, ...) are ignored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, field_validator

from gptj.errors import InvalidRequest
from gptj.serve.backends import Backend, Generated
from gptj.serve.errors import as_api_error
from gptj.serve.guard import APIError
from gptj.serve.protocol import Body, DetokenizeBody, HostedCompletionBody, sse
from gptj.serve.routes.common import (
    MAX_STOPS,
    MAX_TOKENS,
    StopString,
    drain,
    failed,
    served,
    start,
    validated,
)

FIELDS = {"max_new_tokens": "n_predict", "repetition_penalty": "repeat_penalty", "stop": "stop"}


class CompletionBody(Body):
    """llama.cpp's POST /completion."""

    prompt: Any = Field(..., json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]})
    n_predict: int = Field(-1, ge=-2, le=MAX_TOKENS)
    temperature: float = Field(0.8, ge=-5.0, le=5.0)
    top_k: int = Field(40, ge=-MAX_TOKENS, le=MAX_TOKENS)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOPS)
    ignore_eos: bool = False
    stream: bool = False
    n_probs: int = Field(0, ge=0, le=MAX_TOKENS)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    image_data: list[Any] | None = None


    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or isinstance(value, list) and all(
                isinstance(p, str) or isinstance(p, int) and not isinstance(p, bool) for p in value):
            return value
        raise ValueError("must be a string or a list of token ids")


def is_llamacpp(data: Any) -> bool:
    """llama.cpp's body (a prompt) rather than EleutherAI's (a context)."""
    return isinstance(data, dict) and "prompt" in data and "context" not in data


async def completion(backend: Backend, data: Any, request: Request) -> Response:
    body = validated(CompletionBody, data)
    try:
        return await complete(backend, body, request)
    except InvalidRequest as exc:  # the engine's names -> llama.cpp's
        raise as_api_error(exc, FIELDS) from None


async def complete(backend: Backend, body: CompletionBody, request: Request) -> Response:
    for name, what in (("n_probs", "token probabilities are not supported here; use /v1/completions' logprobs"),
                       ("grammar", "grammar-constrained sampling is not supported"),
                       ("image_data", "the model takes no images")):
        if getattr(body, name):
            raise APIError(400, f"{name}: {what}", name)
    prompt = body.prompt
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, int) for p in prompt):
            prompt = (await backend.detokenize(DetokenizeBody(tokens=prompt)))["text"]
        elif len(prompt) == 1:
            prompt = prompt[0]
        else:
            raise APIError(400, "prompt: send one prompt per request (a string, or a list of token ids)", "prompt")
    if not prompt:
        raise APIError(400, "prompt: must not be empty", "prompt")
    settings = {"max_new_tokens": None if body.n_predict < 0 else body.n_predict,
                "temperature": max(body.temperature, 0.0), "top_k": max(body.top_k, 0), "top_p": body.top_p,
                "min_p": body.min_p, "repetition_penalty": body.repeat_penalty,
                "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                "seed": body.seed if body.seed is not None and body.seed >= 0 else None, "stop": body.stop,
                "ignore_eos": body.ignore_eos}
    if body.json_schema is not None:  # JSON output (gptj.runtime.constraints)
        settings["json_schema"] = body.json_schema
    if body.top_p == 0:  # llama.cpp: only the most likely token
        settings.update(top_p=1.0, top_k=1)
    if body.temperature < 0:
        settings["temperature"] = 0.0
    name, context = await served(backend)
    gen = await start(backend.generate(request, prompt=prompt, settings=settings))

    def final(done: Generated) -> dict:
        stop_type = {"stop": done.stop_type or "eos", "length": "limit"}.get(done.finish_reason, done.finish_reason)
        generated_s = max(done.seconds - (done.time_to_first_token or 0.0), 1e-9)
        prompt_s = max(done.time_to_first_token or 0.0, 1e-9)
        return {
            "index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": name,
            "tokens_predicted": done.completion_tokens, "tokens_evaluated": done.prompt_tokens,
            "tokens_cached": done.cached_prompt_tokens,
            "generation_settings": {"n_ctx": context, "n_predict": body.n_predict, "model": name,
                                    "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
                                    "min_p": body.min_p, "repeat_penalty": body.repeat_penalty,
                                    "presence_penalty": body.presence_penalty,
                                    "frequency_penalty": body.frequency_penalty, "seed": body.seed,
                                    "stop": body.stop, "ignore_eos": body.ignore_eos, "stream": body.stream},
            "prompt": prompt, "has_new_line": "\n" in done.text, "truncated": False,
            "stop_type": stop_type, "stopping_word": "", "finish_reason": done.finish_reason,
            "timings": {"prompt_n": done.prompt_tokens, "prompt_ms": prompt_s * 1e3,
                        "prompt_per_second": done.prompt_tokens / prompt_s,
                        "predicted_n": done.completion_tokens, "predicted_ms": generated_s * 1e3,
                        "predicted_per_second": done.completion_tokens / generated_s},
        }

    if not body.stream:
        async with aclosing(gen):
            done = await drain(gen)
        err = failed(done)
        if err is not None:
            raise err
        return JSONResponse({**final(done), "content": done.text})

    async def events() -> AsyncIterator[bytes]:
        predicted = 0
        async with aclosing(gen):
            async for item in gen:
                if isinstance(item, Generated):
                    err = failed(item)
                    if err is not None:
                        yield sse({"error": {"code": err.status, "message": err.message, "type": err.kind}})
                    else:
                        yield sse(final(item))
                elif item:
                    predicted += 1
                    yield sse({"index": 0, "content": item, "tokens": [], "stop": False, "id_slot": -1,
                               "tokens_predicted": predicted})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def openapi_body() -> dict:
    """POST /completion's documented body: EleutherAI's or llama.cpp's."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
        HostedCompletionBody.model_json_schema(), CompletionBody.model_json_schema()]}}}}}
