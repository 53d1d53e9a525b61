"""One pass per batch step: a newcomer's prompt chunk rides in the batch's decode step, and
every request still gets exactly the tokens it gets alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import gptj
from gptj.runtime import runner

PROMPTS = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    " * 3,
    "A recipe for bread: first, take " * 5,
]


@pytest.fixture(scope="module")
def batched() -> Iterator[gptj.Model]:
    model = gptj.load(quantize="int8", max_batch=3, prefix_cache=False)  # every prompt prefilled anew
    yield model
    model.engine.shutdown(grace=0)


def test_requests_joining_a_running_batch_get_their_tokens_alone(
    batched: gptj.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = [dict(temperature=0), dict(temperature=1.0, seed=5), dict(temperature=0.7, top_p=0.9, seed=9)]
    alone = [batched.generate(p, max_new_tokens=24, ignore_eos=True, **s).tokens for p, s in zip(PROMPTS, settings, strict=True)]
    ragged: list[int] = []
    real = runner.forward_ragged

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kwargs)
        if out is not None:
            ragged.append(args[1].numel())
        return out

    monkeypatch.setattr(runner, "forward_ragged", counting)
    handles = []
    for p, s in zip(PROMPTS, settings, strict=True):  # each arrives while the ones before it decode
        handles.append(batched.submit(p, max_new_tokens=24, ignore_eos=True, **s))
        events = iter(handles[-1])
        next(events)  # its first token: it decodes now
    together = [h.result().tokens for h in handles]
    assert together == alone
    # the newcomers' prompts were prefilled inside the batch's decode steps
    assert len(ragged) >= 2 and max(ragged) > 1
