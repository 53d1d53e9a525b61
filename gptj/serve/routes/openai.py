"""OpenAI's API on the local engine: /v1/models, /v1/completions, /v1/chat/completions,
streamed as server-sent events or whole.

What of the request is done, accepted without effect, or refused with a 400 naming the field:
gptj.serve.protocol (REFUSED, HARMLESS). The server holds one model and it answers to any
`model` name; responses name it (see LocalBackend.answering_name)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptj.errors import InvalidRequest
from gptj.runtime.engine import Completion
from gptj.serve.backends.local import LocalBackend, finish_reason, usage
from gptj.serve.protocol import ChatBody, CompletionBody, Settings, engine_settings, first_set, is_batch, sse

DONE = b"data: [DONE]\n\n"


def best(results: list[Completion], n: int) -> list[Completion]:
    """OpenAI's best_of: the n results with the highest mean logprob per generated token (the
    end-of-text token included), best first; all of them, in order, when there are n."""
    if len(results) <= n:
        return results

    def score(c: Completion) -> float:
        lps = [t.logprob for t in c.token_infos if t.logprob is not None]
        return sum(lps) / len(lps) if lps else 0.0

    return sorted(results, key=score, reverse=True)[:n]


@contextmanager
def fields_named(body: Settings) -> Iterator[None]:
    """The engine's errors under the request's own names: max_new_tokens is max_completion_tokens
    when the request set that (the app's handler names max_tokens otherwise); a bad JSON schema is
    the field that sent it (response_format.json_schema, guided_json or json_schema)."""
    try:
        yield
    except InvalidRequest as exc:
        message = str(exc).partition(": ")[2]
        if exc.field == "max_new_tokens" and body.max_completion_tokens is not None:
            raise InvalidRequest("max_completion_tokens", message) from None
        if exc.field == "json_schema" and (asked := body.json_output()) is not None:
            raise InvalidRequest(asked[0], message) from None
        raise


def batch_usage(groups: list[list[Completion]]) -> dict:
    """The usage of a request: every prompt's tokens once, every generated token (best_of's
    discarded samples too: they were computed)."""
    parts = [usage(g) for g in groups if g]
    total = {k: sum(p[k] for p in parts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    total["prompt_tokens_details"] = {"cached_tokens": sum(p["prompt_tokens_details"]["cached_tokens"] for p in parts)}
    total["completion_tokens_details"] = {k: sum(p["completion_tokens_details"][k] for p in parts)
                                          for k in ("accepted_prediction_tokens", "rejected_prediction_tokens")}
    return total


def router(backend: LocalBackend) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict:
        """The served model under each of its names (`--served-model-name`s, then its own), with
        its context window as vLLM lists it (`max_model_len`)."""
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(backend.started),
                                            "owned_by": "gptj-studio", "max_model_len": backend.model.context_length}
                                           for name in backend.names]}

    @router.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        model = backend.answering_name(body.model)
        prompts = await backend.prompts_of(body.prompt)
        settings = engine_settings(body, first_set(body.max_completion_tokens, body.max_tokens))
        n, best_of = body.n, body.best_of or body.n
        # best_of ranks samples by their tokens' logprobs: computed whether or not they are shown
        logprobs = body.logprobs if body.logprobs is not None or best_of == n else 0
        echo_logprobs = body.logprobs if body.echo else None
        echo_texts = [text if body.echo else "" for _, text in prompts]
        with fields_named(body):
            groups = await backend.submit_batch([ids for ids, _ in prompts], settings, best_of, logprobs, request,
                                                body.cache_salt, echo_logprobs, is_batch(body.prompt))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
            if usage is not None or include_usage or not body.stream:
                out["usage"] = usage
            return out

        if body.stream:  # best_of == n here (protocol.Settings): choice g is handle g, of prompt g // n
            handles = [h for group in groups for h in group]

            async def events() -> AsyncIterator[bytes]:
                finals: list[list[Completion]] = [[] for _ in prompts]
                offsets = [len(echo_texts[g // n]) for g in range(len(handles))]
                arrivals = backend.stream_all(handles)
                held: list[tuple[int, Any]] = []
                if body.echo:
                    echo_lps: dict[int, dict | None] = {}
                    if echo_logprobs is not None:  # the prompts' logprobs come with their text: wait for them
                        waiting = set(range(len(prompts)))
                        async for g, item in arrivals:
                            held.append((g, item))
                            infos = item.prompt_logprobs if g % n == 0 else None
                            if infos is not None or g % n == 0 and isinstance(item, Completion):
                                echo_lps[g // n] = backend.prompt_logprobs_json(infos, body.logprobs) if infos else None
                                waiting.discard(g // n)
                                if not waiting:
                                    break
                    for g in range(len(handles)):
                        yield sse(chunk([{"index": g, "text": echo_texts[g // n], "logprobs": echo_lps.get(g // n),
                                          "finish_reason": None}]))

                async def rest() -> AsyncIterator[tuple[int, Any]]:
                    for pair in held:
                        yield pair
                    async for pair in arrivals:
                        yield pair

                async for g, item in rest():
                    if isinstance(item, Completion):
                        finals[g // n].append(item)
                        yield sse(chunk([{"index": g, "text": "", "logprobs": None, "finish_reason": finish_reason(item)}]))
                    elif item.text or item.tokens:
                        lp = backend.completion_logprobs(item.tokens, offsets[g]) if body.logprobs is not None else None
                        offsets[g] += len(item.text)
                        yield sse(chunk([{"index": g, "text": item.text, "logprobs": lp, "finish_reason": None}]))
                if include_usage:  # as OpenAI: a last chunk with no choices
                    yield sse(chunk([], batch_usage(finals)))
                yield DONE

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await backend.wait_all([h for group in groups for h in group], request)
        by_prompt = [results[i * best_of:(i + 1) * best_of] for i in range(len(prompts))]
        choices = []
        for p, group in enumerate(by_prompt):
            for c in group:
                finish_reason(c)  # a failed generation is a 500, also one best_of would drop
            echo_lp = None
            if echo_logprobs is not None and group[0].prompt_logprobs:
                echo_lp = backend.prompt_logprobs_json(group[0].prompt_logprobs, echo_logprobs)
            for j, c in enumerate(best(group, n)):
                lp = None
                if body.logprobs is not None:
                    lp = backend.completion_logprobs(c.token_infos[: len(c.tokens)], len(echo_texts[p]))
                    if echo_lp is not None:
                        lp = {k: echo_lp[k] + lp[k] for k in lp}
                choices.append({"index": p * n + j, "text": echo_texts[p] + c.text, "logprobs": lp,
                                "finish_reason": finish_reason(c)})
        return JSONResponse(chunk(choices, batch_usage(by_prompt)))

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        model = backend.answering_name(body.model)
        settings = engine_settings(body, first_set(body.max_completion_tokens, body.max_tokens, 256))
        n, best_of = body.n, body.best_of or body.n
        shown = (body.top_logprobs or 0) if body.logprobs else None
        logprobs = shown if shown is not None or best_of == n else 0
        with fields_named(body):
            # templating and tokenizing a long conversation take a while: off the event loop
            prompt, settings, dropped = await asyncio.to_thread(
                backend.chat.prepare, body.chat_messages(), settings, continue_final_message=body.continue_final_message,
                add_generation_prompt=body.add_generation_prompt)
            handles = await backend.submit_all(await backend.encode(prompt, "messages"), settings, best_of, logprobs,
                                               request, body.cache_salt)
        # a continuation's text goes on from the last message as it is: its first space is kept
        continuing = backend.chat.continues(body.chat_messages(), body.continue_final_message)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        info = {"dropped_messages": dropped}

        def chunk(choices: list[dict], usage: dict | None = None, **extra: Any) -> dict:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
                   **extra}
            if usage is not None or include_usage:
                out["usage"] = usage
            return out

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                finals: list[Completion] = []
                started_text = [False] * n
                for i in range(n):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                                    gptj=info))
                async for i, item in backend.stream_all(handles):
                    if isinstance(item, Completion):
                        finals.append(item)
                        yield sse(chunk([{"index": i, "delta": {}, "finish_reason": finish_reason(item)}]))
                        continue
                    text = item.text
                    if not started_text[i] and not backend.chat.template and not continuing:
                        text = text.lstrip()  # the play script's space after "Name:"
                    started_text[i] = started_text[i] or bool(text)
                    choice = {"index": i, "delta": {"content": text}, "finish_reason": None}
                    if shown is not None:
                        choice["logprobs"] = backend.chat_logprobs(item.tokens)
                    if text or shown is not None:
                        yield sse(chunk([choice]))
                if include_usage:  # as OpenAI: a last chunk with no choices
                    yield sse(chunk([], usage(finals)))
                yield DONE

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results = await backend.wait_all(handles, request)
        for c in results:
            finish_reason(c)
        choices = []
        for i, c in enumerate(best(results, n)):
            text = c.text if backend.chat.template else backend.chat.script.clean_reply(c.text, continuing)
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(c)}
            if shown is not None:
                choice["logprobs"] = backend.chat_logprobs(c.token_infos[: len(c.tokens)])
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(results), "gptj": info})

    return router
