"""A request as the engine holds it, what it streams (StreamEvent) and ends with (Completion),
and the handle a caller iterates, in a thread (`for`) or on an event loop (`async for`)."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gptj.runtime.constraints import Constraint
from gptj.runtime.healing import Healing
from gptj.runtime.sampling import SamplingParams
from gptj.runtime.speculative import NgramDrafter
from gptj.runtime.stops import StopMatcher
from gptj.tokenizer import StreamDecoder


class Driver(Protocol):
    """What a handle needs of the engine: one step in the caller's thread, where it may."""

    def drive_once(self) -> bool: ...


@dataclass
class TokenInfo:
    id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    # token healing (gptj.runtime.healing): the prompt's last text, which this token (the first)
    # begins with and the streamed text leaves out; '' for every other token
    healed: str = ""


@dataclass
class StreamEvent:
    text: str  # text that became final with this event ('' while held back)
    tokens: list[TokenInfo]  # tokens sampled since the previous event
    # once, when the prompt is prefilled and its logprobs were asked for (`prompt_logprobs`)
    prompt_logprobs: list[TokenInfo] | None = None


@dataclass
class Completion:
    text: str
    tokens: list[int]
    # "stop" (EOS or a stop sequence), "length", "cancelled", "timeout" (past the request's time
    # limit), "shutdown" (the engine stopped before it finished) or "error"
    finish_reason: str
    prompt_tokens: int
    token_infos: list[TokenInfo] = field(default_factory=list)
    truncated_prompt_tokens: int = 0  # tokens dropped from the left of the prompt
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    time_to_first_token: float | None = None
    error: str | None = None
    # with `prompt_logprobs`: one per prompt token, the first without a logprob (nothing precedes it)
    prompt_logprobs: list[TokenInfo] | None = None
    # speculative decoding: tokens drafted for this request, and how many of them the model kept
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # token healing: the end of the prompt that the first token spelled anew (it begins with it;
    # `text` leaves it out); '' when the prompt was not healed or its own last token came first
    healed: str = ""

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class RequestHandle:
    """A submitted request: iterate it for StreamEvents (`for`, or `async for` in a server),
    or call result(). Without a driver thread, `for` drives the engine (every running request
    advances, not just this one); `async for` waits on the event loop, woken by the engine."""

    def __init__(self, request: _Request, engine: Driver | None = None) -> None:
        self._request = request
        self._events: queue.Queue = request.events
        self._engine = engine
        self._completion: Completion | None = None

    def __iter__(self) -> Iterator[StreamEvent]:
        while self._completion is None:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                if self._engine is not None and self._engine.drive_once():
                    continue
                try:  # another thread drives: its steps fill our queue
                    item = self._events.get(timeout=0.01)
                except queue.Empty:
                    continue
            if isinstance(item, Completion):
                self._completion = item
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        """Events as the driving thread sends them; the last item is the Completion (also kept
        as `completion`), so one loop sees the stream and its end."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._request.waker = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while self._completion is None:
                ready.clear()  # before looking: an event that arrives after the look sets it again
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    continue
                if isinstance(item, Completion):
                    self._completion = item
                yield item
        finally:
            self._request.waker = None

    @property
    def completion(self) -> Completion | None:
        return self._completion

    def result(self) -> Completion:
        for _ in self:
            pass
        assert self._completion is not None
        return self._completion

    def cancel(self) -> None:
        self._request.cancelled = True

    @property
    def done(self) -> bool:
        return self._completion is not None


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    truncated: int
    cache_scope: str | None = None  # prefixes are shared only between requests of one scope
    events: queue.Queue = field(default_factory=queue.Queue)
    waker: Callable[[], None] | None = None  # set while a handle awaits events on an event loop
    cancelled: bool = False
    row: int = -1
    prefilled: int = 0  # prompt tokens already in the cache row
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    infos: list[TokenInfo] = field(default_factory=list)
    pending_infos: list[TokenInfo] = field(default_factory=list)
    prompt_infos: list[TokenInfo] | None = None  # the prompt's logprobs, as its chunks are prefilled
    prompt_sent: bool = False
    text: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None
    stops: StopMatcher | None = None
    drafter: NgramDrafter | None = None  # speculative decoding, made at its first draft
    drafted: int = 0
    accepted: int = 0
    heal: Healing | None = None  # token healing, until the first token is sampled (prompt_ids lack its token)
    healed: str = ""  # what Completion.healed says
    constraint: Constraint | None = None  # JSON output's matcher (gptj.runtime.constraints)

    @property
    def length(self) -> int:
        return self.prefilled + len(self.generated)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens as sent (a healed prompt's last token was taken off prompt_ids)."""
        return len(self.prompt_ids) + (1 if self.heal is not None or self.healed else 0)

    def send(self, item: StreamEvent | Completion) -> None:
        self.events.put(item)
        waker = self.waker
        if waker is not None:
            waker()

    @property
    def next_input(self) -> int:
        """The token a decode step feeds: the last generated one, or the prompt's last."""
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def prefill_target(self) -> int:
        """Prompt tokens that go through prefill chunks: all but the last, which a decode step
        takes like a generated token. A prompt's first logits then come from the same kind of
        step whether its prefix was cached or not, so a seed gives the same text either way
        (with int8 activations, a prefill's and a decode step's logits differ enough to change
        a draw). Where the fused step serves, which gives every token a decode step's bits, the
        last chunk takes the last token too (the engine's `_next_chunk`)."""
        return len(self.prompt_ids) - (1 if self.params.max_new_tokens else 0)
