"""The backend on this machine's model: every generation goes through `gptj.runtime.engine`.

Serving many users: requests share the engine's running batch (`--parallel`); past it, up to
`--max-queue` wait, and more get 503 with Retry-After. A request past `--request-timeout`
seconds (queueing included) ends with finish_reason "timeout"; one still running when the
server shuts down ends with "shutdown". Both pass to every API as they are (not "length", so
a client can tell a limit it set from one the server imposed). A client that disconnects
leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from gptj import quant
from gptj.api import Model, sampling_params
from gptj.chat import ChatSession
from gptj.errors import InvalidRequest
from gptj.runtime.engine import Completion, RequestHandle, TokenInfo
from gptj.serve.guard import APIError, ClientDisconnected, cache_scope
from gptj.serve.metrics import Metrics, engine_metrics
from gptj.serve.protocol import DetokenizeBody, TokenizeBody, token_str, tokenize_json
from gptj.tokenizer import Tokenizer, load_tokenizer

INFO_DEFAULTS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LocalBackend:
    def __init__(self, model: Model, request_timeout: float | None = None) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.chat = ChatSession(model)
        self.metrics = Metrics()
        self.timeout = request_timeout or None
        self.started = time.time()

    @property
    def name(self) -> str:
        return self.model.name

    # ---- page and info ----

    async def health(self) -> dict:
        return {"status": "ok", "model": self.model.name, "uptime_s": round(time.time() - self.started, 1)}

    async def info(self) -> dict:
        d = self.model.info.as_dict()
        d["context_length"] = self.model.context_length
        defaults = sampling_params()
        d["defaults"] = {k: getattr(defaults, k) for k in INFO_DEFAULTS}
        d["parallel"] = self.model.engine.max_batch
        d["kernels"] = quant.kernel_name() if self.model.device.type == "cpu" else None  # GPTJ_ISA's variant
        return d

    def metrics_text(self) -> str:
        return engine_metrics(self.metrics, self.model.engine)

    # ---- tokenizer ----

    def pick_tokenizer(self, name: str | None) -> Tokenizer:
        if not name:
            return self.tokenizer
        try:
            return load_tokenizer(name)
        except (ValueError, OSError) as exc:
            raise APIError(400, f"tokenizer: {exc}", "tokenizer") from None

    async def tokenize(self, body: TokenizeBody, text: str) -> dict:
        tok = self.pick_tokenizer(body.tokenizer)
        # a worker thread: a 1 MB text takes a while, and the event loop must stay free
        return await asyncio.to_thread(tokenize_json, tok, text, body.add_special)

    async def detokenize(self, body: DetokenizeBody) -> dict:
        tok = self.pick_tokenizer(body.tokenizer)
        bad = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is outside 0..{tok.vocab_size - 1}", "tokens")
        return {"text": tok.decode(body.tokens)}

    async def encode(self, text: str, field: str) -> list[int]:
        """Token ids off the event loop; an invalid text is a 400 naming `field`."""
        try:
            return await asyncio.to_thread(self.tokenizer.encode, text, True)
        except InvalidRequest as exc:
            raise InvalidRequest(field, str(exc).partition(": ")[2]) from None

    # ---- generation ----

    def check_model(self, name: str | None) -> None:
        model = self.model
        if name and name not in (model.name, "default", model.info.path) and name.lower() not in ("gpt-j", "gptj"):
            raise APIError(404, f"model: unknown model {name!r}; this server serves {model.name!r}", "model", "model_not_found")

    def submit_all(self, prompt_ids: list[int], settings: dict, n: int, logprobs: int | None, request: Request,
                   salt: str | None = None, prompt_logprobs: int | None = None) -> list[RequestHandle]:
        """n requests for one prompt; only the first computes the prompt's logprobs (once per
        request, in its prefill chunks). Cached prefixes are shared only within the caller's
        API key and cache_salt."""
        engine = self.model.engine
        # The handlers wait without driving: a thread must (`gptj serve` runs it in the main thread).
        engine.start_background()
        scope = cache_scope(getattr(request.state, "tenant", None), salt)
        handles: list[RequestHandle] = []
        for i in range(n):
            s = dict(settings)
            if s.get("seed") is not None:
                s["seed"] = s["seed"] + i
            if logprobs is not None:
                s["logprobs"] = logprobs
            if i == 0 and prompt_logprobs is not None:
                s["prompt_logprobs"] = prompt_logprobs
            try:
                handles.append(engine.submit(prompt_ids, sampling_params(**s), timeout=self.timeout, cache_scope=scope))
            except Exception:
                for h in handles:
                    h.cancel()
                raise
        return handles

    async def wait_all(self, handles: list[RequestHandle], request: Request) -> list[Completion]:
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
            self.metrics.observe(c, time.monotonic() - t0)
        return results

    async def stream_all(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Any]]:
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
                    self.metrics.observe(item, time.monotonic() - t0)
                yield i, item
        finally:  # also runs when the client disconnects and the response is cancelled
            for t in tasks:
                t.cancel()
            for h in handles:
                h.cancel()

    async def generate_text(self, request: Request, context: str, temp: float, top_p: float, length: int) -> str:
        """The continuation of `context` (the EleutherAI APIs), left-truncated to fit."""
        if not context:
            raise APIError(400, "context: must not be empty", "context")
        ids = await self.encode(context, "context")
        length = min(length, self.model.context_length - 1)
        settings = dict(max_new_tokens=length, temperature=temp, top_p=top_p, top_k=0, truncate_prompt=True)
        (result,) = await self.wait_all(self.submit_all(ids, settings, 1, None, request), request)
        finish_reason(result)
        return result.text

    # ---- OpenAI's shapes ----

    async def prompt_ids_of(self, prompt: str | list[str] | list[int]) -> tuple[list[int], str]:
        vocab = self.model.config.vocab_size
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside 0..{vocab - 1}", "prompt")
            return ids, self.tokenizer.decode(ids)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: send one prompt per request (a list of exactly one string)", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", "prompt")
        return await self.encode(prompt, "prompt"), prompt

    def completion_logprobs(self, tokens: list[TokenInfo], offset: int) -> dict:
        ids = [t.id for t in tokens]
        strs = [token_str(self.tokenizer, i) for i in ids]
        offsets, pos = [], offset
        for s in strs:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": strs,
            "token_ids": ids,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_str(self.tokenizer, i): lp for i, lp in t.top_logprobs} for t in tokens],
            "text_offset": offsets,
        }

    def prompt_logprobs_json(self, infos: list[TokenInfo], top: int) -> dict:
        """OpenAI's legacy logprobs for the prompt (echo): the first token has none."""
        tokens, offsets, pos = [], [], 0
        for t in infos:
            s = token_str(self.tokenizer, t.id)
            tokens.append(s)
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_ids": [t.id for t in infos],
                "token_logprobs": [t.logprob for t in infos],
                "top_logprobs": [None if t.logprob is None else
                                 {token_str(self.tokenizer, i): lp for i, lp in t.top_logprobs[:top]} for t in infos],
                "text_offset": offsets}

    def chat_logprobs(self, tokens: list[TokenInfo]) -> dict:
        tok = self.tokenizer
        return {"content": [{"token": token_str(tok, t.id), "logprob": t.logprob, "bytes": list(tok.token_bytes(t.id)),
                             "top_logprobs": [{"token": token_str(tok, i), "logprob": lp} for i, lp in t.top_logprobs]}
                            for t in tokens]}


def usage(results: list[Completion]) -> dict:
    prompt = results[0].prompt_tokens if results else 0
    gen = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_prompt_tokens if results else 0}}


def finish_reason(c: Completion) -> str:
    if c.finish_reason == "error":
        raise APIError(500, f"generation failed: {c.error}", None, "server_error")
    return c.finish_reason
