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
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request

from gptj import quant
from gptj.api import Model, check_logit_bias, check_token_ids, sampling_params
from gptj.chat import ChatSession
from gptj.errors import InvalidRequest
from gptj.runtime.engine import Completion, RequestHandle, TokenInfo
from gptj.serve.backends import Generated, Interruption, detokenize_json, requested_tokenizer
from gptj.serve.guard import APIError, ClientDisconnected, cache_scope
from gptj.serve.metrics import Metrics, engine_metrics
from gptj.serve.protocol import DetokenizeBody, TokenizeBody, is_batch, token_str, tokenize_json
from gptj.tokenizer import Tokenizer

INFO_DEFAULTS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LocalBackend:
    def __init__(self, model: Model, request_timeout: float | None = None, served_names: Sequence[str] = ()) -> None:
        self.model = model
        # what /v1/models lists: `--served-model-name`s (the first is the one responses name), then the model's own
        self.names = list(dict.fromkeys([*(n for n in served_names if n), model.name]))
        self.tokenizer = model.tokenizer
        self.chat = ChatSession(model)
        self.metrics = Metrics()
        self.timeout = request_timeout or None
        self.started = time.time()

    @property
    def name(self) -> str:
        return self.names[0]

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

    async def pick_tokenizer(self, name: str | None) -> Tokenizer:
        return await requested_tokenizer(name) if name else self.tokenizer

    async def tokenize(self, body: TokenizeBody, text: str) -> dict:
        tok = await self.pick_tokenizer(body.tokenizer)
        # a worker thread: a 1 MB text takes a while, and the event loop must stay free
        return await asyncio.to_thread(tokenize_json, tok, text, bool(body.parse_special), body.add_special)

    async def detokenize(self, body: DetokenizeBody) -> dict:
        return await detokenize_json(await self.pick_tokenizer(body.tokenizer), body.tokens)

    async def encode(self, text: str, field: str) -> list[int]:
        """Token ids off the event loop; an invalid text is a 400 naming `field`."""
        try:
            return await asyncio.to_thread(self.tokenizer.encode_prompt, text)
        except InvalidRequest as exc:
            raise InvalidRequest(field, str(exc).partition(": ")[2]) from None

    # ---- generation ----

    def answering_name(self, requested: str | None) -> str:
        """The `model` of a response. This server holds one model, and it answers to any name
        (as llama.cpp's does): a response names it by the name asked for when that is one of
        its names, else by its first."""
        return requested if requested in self.names else self.name

    async def submit_all(self, prompt_ids: list[int], settings: dict, n: int, logprobs: int | None,
                         request: Request, salt: str | None = None,
                         prompt_logprobs: int | None = None) -> list[RequestHandle]:
        """n requests for one prompt; only the first computes the prompt's logprobs (once per
        request, in its prefill chunks). Cached prefixes are shared only within the caller's
        API key and cache_salt. Off the event loop: a submit may compile a JSON schema or build
        the token-healing index first, which takes tens of milliseconds."""
        return await asyncio.to_thread(self._submit_all, prompt_ids, settings, n, logprobs, request, salt,
                                       prompt_logprobs)

    def _submit_all(self, prompt_ids: list[int], settings: dict, n: int, logprobs: int | None, request: Request,
                    salt: str | None, prompt_logprobs: int | None) -> list[RequestHandle]:
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
                params = sampling_params(**s)
                check_logit_bias(params, self.model.config.vocab_size)
                handles.append(engine.submit(prompt_ids, params, timeout=self.timeout, cache_scope=scope))
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

    async def generate_text(self, request: Request, context: str, temp: float, top_p: float, length: int,
                            token_healing: bool = True) -> str:
        """The continuation of `context` (the EleutherAI APIs), left-truncated to fit."""
        if not context:
            raise APIError(400, "context: must not be empty", "context")
        ids = await self.encode(context, "context")
        length = min(length, self.model.context_length - 1)
        settings = dict(max_new_tokens=length, temperature=temp, top_p=top_p, top_k=0, truncate_prompt=True,
                        token_healing=token_healing)
        (result,) = await self.wait_all(await self.submit_all(ids, settings, 1, None, request), request)
        finish_reason(result)
        return result.text

    # ---- OpenAI's shapes ----

    async def prompts_of(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt: one for a string or a list of token ids, one per item
        of a batch (a list of strings or of token-id lists), whose errors name `prompt.i`."""
        batch = is_batch(prompt)
        vocab = self.model.config.vocab_size
        prompts = []
        for i, item in enumerate(prompt if batch else [prompt]):  # type: ignore[union-attr]
            field = f"prompt.{i}" if batch else "prompt"
            if isinstance(item, str):
                if not item:
                    raise APIError(400, f"{field}: must not be empty", field)
                prompts.append((await self.encode(item, field), item))
                continue
            ids = check_token_ids(item, vocab, field)
            prompts.append((ids, self.tokenizer.decode(ids)))
        return prompts

    async def submit_batch(self, prompts: list[list[int]], settings: dict, n: int, logprobs: int | None,
                           request: Request, salt: str | None, prompt_logprobs: int | None,
                           batch: bool) -> list[list[RequestHandle]]:
        """submit_all for each prompt of a request: n handles each, all or none queued. A batch
        must fit what the engine takes at once (--parallel + --max-queue), else it could never run."""
        engine = self.model.engine
        capacity = engine.max_batch + engine.max_queue
        if batch and len(prompts) * n > capacity:
            raise APIError(400, f"prompt: {len(prompts)} prompts x {n} choices each are more than this server takes at "
                           f"once ({capacity}: --parallel + --max-queue); send fewer prompts per request", "prompt")
        groups: list[list[RequestHandle]] = []
        try:
            for i, ids in enumerate(prompts):
                try:
                    groups.append(await self.submit_all(ids, settings, n, logprobs, request, salt, prompt_logprobs))
                except InvalidRequest as exc:
                    if batch and exc.field == "prompt":
                        raise InvalidRequest(f"prompt.{i}", str(exc).partition(": ")[2]) from None
                    raise
        except BaseException:
            for group in groups:
                for h in group:
                    h.cancel()
            raise
        return groups

    def completion_logprobs(self, tokens: list[TokenInfo], offset: int) -> dict:
        # a healed first token (gptj.runtime.healing) shows its text past the prompt's end, so that
        # the tokens add up to the text; its alternatives begin with the same prompt text
        ids = [t.id for t in tokens]
        strs = [token_str(self.tokenizer, t.id)[len(t.healed):] for t in tokens]
        offsets, pos = [], offset
        for s in strs:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": strs,
            "token_ids": ids,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{token_str(self.tokenizer, i)[len(t.healed):]: lp for i, lp in t.top_logprobs}
                             for t in tokens],
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
        # a healed first token: its text past the prompt's end, as in completion_logprobs
        return {"content": [{"token": token_str(tok, t.id)[len(t.healed):], "logprob": t.logprob,
                             "bytes": list(tok.token_bytes(t.id)[len(t.healed.encode()):]),
                             "top_logprobs": [{"token": token_str(tok, i)[len(t.healed):], "logprob": lp}
                                              for i, lp in t.top_logprobs]}
                            for t in tokens]}

    # ---- the other API families (Ollama, KoboldAI, llama.cpp): backend-neutral generation ----

    def chat_template(self) -> bool:
        return self.chat.template is not None

    async def generate(self, request: Request, *, prompt: str | None = None, messages: list[dict] | None = None,
                       settings: dict, abort: asyncio.Event | None = None,
                       continue_final_message: bool = False) -> AsyncIterator[str | Generated]:
        """Text deltas, then a Generated (see gptj.serve.backends.Backend.generate)."""
        settings = dict(settings)
        field = "messages" if messages is not None else "prompt"
        if messages is not None:
            if not messages:
                raise APIError(400, "messages: must not be empty", "messages")
            # templating and tokenizing a long conversation take a while: off the event loop
            prompt, settings, _ = await asyncio.to_thread(self.chat.prepare, messages, settings,
                                                          continue_final_message=continue_final_message)
        if not prompt:
            raise APIError(400, f"{field}: must not be empty", field)
        ids = await self.encode(prompt, field)
        if settings.get("max_new_tokens") is None:  # until the context window is full
            settings["max_new_tokens"] = max(self.model.context_length - len(ids), 1)
        handles = await self.submit_all(ids, settings, 1, None, request)
        interruption = Interruption(request, abort)

        async def cancel_when_interrupted() -> None:
            await interruption.event.wait()
            for h in handles:
                h.cancel()

        canceller = asyncio.ensure_future(cancel_when_interrupted())
        t0 = time.monotonic()
        try:
            yield ""
            # the play script's space after "Name:" goes; a continued message's text goes on as it is
            lstrip = (messages is not None and not self.chat.template
                      and not self.chat.continues(messages, continue_final_message))
            text = ""
            async for _, item in self.stream_all(handles):
                if isinstance(item, Completion):
                    if interruption.disconnected:
                        raise ClientDisconnected
                    stop_type = None
                    if item.finish_reason == "stop":  # the end-of-text token is in token_infos, not in tokens
                        stop_type = "eos" if len(item.token_infos) > len(item.tokens) else "word"
                    yield Generated(text, item.finish_reason, item.prompt_tokens, item.completion_tokens,
                                    item.cached_prompt_tokens, item.time_to_first_token, time.monotonic() - t0,
                                    stop_type, item.error)
                    return
                piece = item.text
                if lstrip:
                    piece = piece.lstrip()
                    lstrip = not piece
                if piece:
                    text += piece
                    yield piece
        finally:
            canceller.cancel()
            interruption.close()
            for h in handles:
                h.cancel()


def usage(results: list[Completion]) -> dict:
    """OpenAI's usage. Speculative decoding's drafts go where OpenAI reports predicted outputs:
    accepted_prediction_tokens (kept) and rejected_prediction_tokens (checked and dropped)."""
    prompt = results[0].prompt_tokens if results else 0
    gen = sum(r.completion_tokens for r in results)
    accepted = sum(r.accepted_tokens for r in results)
    rejected = sum(r.drafted_tokens - r.accepted_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": gen, "total_tokens": prompt + gen,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_prompt_tokens if results else 0},
            "completion_tokens_details": {"accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": rejected}}


def finish_reason(c: Completion) -> str:
    if c.finish_reason == "error":
        raise APIError(500, f"generation failed: {c.error}", None, "server_error")
    return c.finish_reason
