"""OpenAI's API on the local engine: /v1/models, /v1/completions, /v1/chat/completions,
streamed as server-sent events or whole."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptj.runtime.engine import Completion
from gptj.serve.backends.local import LocalBackend, finish_reason, usage
from gptj.serve.protocol import ChatBody, CompletionBody, engine_settings, first_set, sse


def router(backend: LocalBackend) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": int(backend.started),
                                            "owned_by": "gptj-studio"}]}

    @router.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        backend.check_model(body.model)
        ids, prompt_text = await backend.prompt_ids_of(body.prompt)
        settings = engine_settings(body, first_set(body.max_completion_tokens, body.max_tokens))
        echo_text = prompt_text if body.echo else ""
        echo_logprobs = body.logprobs if body.echo else None
        handles = backend.submit_all(ids, settings, body.n, body.logprobs, request, body.cache_salt, echo_logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": backend.name, "choices": choices, **extra}

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                finals: list[Completion] = []
                offsets = [len(echo_text)] * body.n
                arrivals = backend.stream_all(handles)
                held: list[tuple[int, Any]] = []
                if echo_text:
                    echo_lp = None
                    if echo_logprobs is not None:  # the prompt's logprobs come with its text: wait for them
                        async for i, item in arrivals:
                            held.append((i, item))
                            infos = item.prompt_logprobs if i == 0 else None
                            if infos is not None or i == 0 and isinstance(item, Completion):
                                echo_lp = backend.prompt_logprobs_json(infos, body.logprobs) if infos else None
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
                        lp = backend.completion_logprobs(item.tokens, offsets[i]) if body.logprobs is not None else None
                        offsets[i] += len(item.text)
                        yield sse(chunk([{"index": i, "text": item.text, "logprobs": lp, "finish_reason": None}]))
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await backend.wait_all(handles, request)
        echo_lp = None
        if echo_logprobs is not None and results[0].prompt_logprobs:
            echo_lp = backend.prompt_logprobs_json(results[0].prompt_logprobs, echo_logprobs)
        choices = []
        for i, c in enumerate(results):
            lp = None
            if body.logprobs is not None:
                lp = backend.completion_logprobs(c.token_infos[: len(c.tokens)], len(echo_text))
                if echo_lp is not None:
                    lp = {k: echo_lp[k] + lp[k] for k in lp}
            choices.append({"index": i, "text": echo_text + c.text, "logprobs": lp, "finish_reason": finish_reason(c)})
        return JSONResponse(chunk(choices, usage=usage(results)))

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        backend.check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        settings = engine_settings(body, first_set(body.max_completion_tokens, body.max_tokens, 256))
        # templating and tokenizing a long conversation take a while: off the event loop
        prompt, settings, dropped = await asyncio.to_thread(backend.chat.prepare, messages, settings)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        handles = backend.submit_all(await backend.encode(prompt, "messages"), settings, body.n, logprobs, request, body.cache_salt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        info = {"dropped_messages": dropped}

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": backend.name, "choices": choices, **extra}

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                finals: list[Completion] = []
                started_text = [False] * body.n
                for i in range(body.n):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], gptj=info))
                async for i, item in backend.stream_all(handles):
                    if isinstance(item, Completion):
                        finals.append(item)
                        extra = {"usage": usage(finals)} if len(finals) == body.n else {}
                        yield sse(chunk([{"index": i, "delta": {}, "finish_reason": finish_reason(item)}], **extra))
                        continue
                    text = item.text
                    if not started_text[i] and not backend.chat.template:
                        text = text.lstrip()  # the play script's space after "Name:"
                    started_text[i] = started_text[i] or bool(text)
                    delta = {"content": text}
                    choice = {"index": i, "delta": delta, "finish_reason": None}
                    if logprobs is not None:
                        choice["logprobs"] = backend.chat_logprobs(item.tokens)
                    if text or logprobs is not None:
                        yield sse(chunk([choice]))
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await backend.wait_all(handles, request)
        choices = []
        for i, c in enumerate(results):
            text = c.text if backend.chat.template else backend.chat.script.clean_reply(c.text)
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(c)}
            if logprobs is not None:
                choice["logprobs"] = backend.chat_logprobs(c.token_infos[: len(c.tokens)])
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": backend.name,
                             "choices": choices, "usage": usage(results), "gptj": info})

    return router
