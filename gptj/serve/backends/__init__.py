"""What the routers need of whatever generates: this machine's engine (local) or another
OpenAI-compatible server (upstream). Routers written against it work in both modes.

`generate` is the one generation call of the API families that are not OpenAI's own (Ollama,
KoboldAI, llama.cpp): text in, text deltas out, then one `Generated`. Its `settings` use the
engine's names (`gptj.runtime.sampling.SamplingParams`: max_new_tokens, temperature, top_p,
top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop; also
truncate_prompt and ignore_eos); a name left out takes the backend's default, and
`max_new_tokens: None` means "until the context window is full" (upstream: whatever the
upstream does with `max_tokens: null`; vLLM fills the context)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from gptj.serve.guard import APIError
from gptj.serve.protocol import DetokenizeBody, TokenizeBody
from gptj.tokenizer import TOKENIZER_NAMES, Tokenizer, named_tokenizer

MAX_TOKENIZER_NAME = 100  # characters; the longest of TOKENIZER_NAMES is 35


@dataclass
class Generated:
    """The end of a generation: `text` is every delta joined (nothing held back)."""

    text: str
    # "stop" (end of text or a stop sequence), "length", "cancelled" (aborted), "timeout",
    # "shutdown" or "error" (then `error` says what went wrong)
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    time_to_first_token: float | None = None  # seconds from submission (queueing included)
    seconds: float = 0.0  # from submission to the end
    stop_type: str | None = None  # with finish_reason "stop", when known: "eos" or "word" (a stop sequence)
    error: str | None = None


class Backend(Protocol):
    async def health(self) -> dict: ...

    async def info(self) -> dict: ...

    def metrics_text(self) -> str: ...

    async def tokenize(self, body: TokenizeBody, text: str) -> dict: ...

    async def detokenize(self, body: DetokenizeBody) -> dict: ...

    async def generate_text(self, request: Request, context: str, temp: float, top_p: float, length: int,
                            token_healing: bool = True) -> str: ...

    def generate(self, request: Request, *, prompt: str | None = None, messages: list[dict] | None = None,
                 settings: dict, abort: asyncio.Event | None = None,
                 continue_final_message: bool = False) -> AsyncIterator[str | Generated]:
        """Text deltas, then one Generated. The first item is an empty delta, sent once the
        request is accepted: bad settings, a full queue or an upstream error raise before it,
        so a router can still answer with an HTTP error. `prompt` is continued as it is;
        `messages` ({role, content}) go through the model's chat template, the last one, the
        assistant's, left open with `continue_final_message` (vLLM's). Setting `abort`, or
        the client disconnecting, stops the generation (finish_reason "cancelled"; a
        disconnect raises ClientDisconnected at the end instead). Close it (`aclosing`) when
        leaving early: that cancels the generation too."""
        ...

    def chat_template(self) -> bool:
        """Whether prompts can be laid out as a chat (the model has a chat template, or the
        upstream is trusted to have one)."""
        ...


class Interruption:
    """Watches for the client going away (an http.disconnect on the request's channel) and for
    `abort`; `event` is set on either. Close it when the generation ends."""

    def __init__(self, request: Request, abort: asyncio.Event | None = None) -> None:
        self.event = asyncio.Event()
        self.disconnected = False
        self.tasks = [asyncio.ensure_future(self._disconnect(request))]
        if abort is not None:
            self.tasks.append(asyncio.ensure_future(self._abort(abort)))

    async def _disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.event.set()

    async def _abort(self, abort: asyncio.Event) -> None:
        await abort.wait()
        self.event.set()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nothing left unretrieved


async def until(items: AsyncIterator, event: asyncio.Event) -> AsyncIterator:
    """The items of `items` until `event` is set (then the pending read is cancelled)."""
    iterator = aiter(items)
    stopped = asyncio.ensure_future(event.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                    await step
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stopped.cancel()


async def requested_tokenizer(name: str) -> Tokenizer:
    """The tokenizer a request's `tokenizer` field names: one of the package's (TOKENIZER_NAMES),
    never a path on this machine (a client could otherwise make the server read any file, and
    learn which exist). Built off the event loop: the first use of one reads its vocabulary."""
    if len(name) > MAX_TOKENIZER_NAME:
        raise APIError(400, f"tokenizer: {len(name)} characters is over the limit of {MAX_TOKENIZER_NAME}",
                       "tokenizer")
    try:
        tokenizer = await asyncio.to_thread(named_tokenizer, name)
    except (ValueError, OSError) as exc:  # a package that ships a vocabulary is missing
        raise APIError(400, f"tokenizer: {exc}", "tokenizer") from None
    if tokenizer is None:
        raise APIError(400, f"tokenizer: unknown tokenizer {name!r}: the server takes one of "
                       f"{', '.join(TOKENIZER_NAMES)} (not paths)", "tokenizer")
    return tokenizer


async def detokenize_json(tokenizer: Tokenizer, ids: list[int]) -> dict:
    """/detokenize's answer; an id outside the vocabulary is a 400. A worker thread: a 1 MB body
    holds ~170k ids."""

    def decode() -> str:
        bad = next((i for i in ids if not 0 <= i < tokenizer.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside 0..{tokenizer.vocab_size - 1}", "tokens")
        return tokenizer.decode(ids)

    return {"text": await asyncio.to_thread(decode)}
