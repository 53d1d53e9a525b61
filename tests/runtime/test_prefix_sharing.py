"""A prefix in use is a prefix to share: a request whose prompt continues what a running request
holds copies those keys and values instead of prefilling them again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import gptj

PROMPT = "Here is a long few-shot preset that two users share at once. " * 12


@pytest.fixture
def served(bundled_model: gptj.Model) -> Iterator[gptj.Model]:
    bundled_model.engine.start_background()  # as a server drives it: requests run side by side
    yield bundled_model
    bundled_model.engine.shutdown(grace=0)


def test_next_turn_while_the_last_still_runs(served: gptj.Model) -> None:
    ids = served.encode_prompt(PROMPT)
    # (PROMPT ends in a space: token healing would let the first token re-spell it, and the row
    # would hold all of the prompt but that space)
    first = served.submit(ids, max_new_tokens=400, temperature=0, ignore_eos=True, token_healing=False)
    events = iter(first)
    next(events)  # the first request is decoding
    second = served.submit(ids + served.encode_prompt(" And one more line."), max_new_tokens=4, temperature=0)
    done = second.result()
    first.cancel()
    assert done.cached_prompt_tokens >= len(ids)


def test_stop_then_send_at_once(served: gptj.Model) -> None:
    """A UI's Stop and the next turn arrive together: the cancelled request's row is free, with
    its prefix, when the next one is admitted."""
    ids = served.encode_prompt(PROMPT + "Stop here:")
    first = served.submit(ids, max_new_tokens=400, temperature=0, ignore_eos=True)
    events = iter(first)
    next(events)
    first.cancel()
    second = served.submit(ids + served.encode_prompt(" a new turn"), max_new_tokens=4, temperature=0)
    assert second.result().cached_prompt_tokens >= len(ids)
