"""The engine's admission and ending without HTTP: the bounded queue under concurrent submits,
time limits while queued, and shutdown ending every request with a reason (bundled model)."""

from __future__ import annotations

import threading
import time

import pytest

import gptj
from gptj.runtime.engine import QueueFull, ShuttingDown
from gptj.runtime.sampling import SamplingParams

LONG = {"max_tokens": 1000}  # the blocker's length: a request that keeps its batch row until ended


def wait_for(condition, what: str, limit: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def idle(engine) -> bool:  # noqa: ANN001
    return engine.batch_size == 0 and engine.queue_depth == 0 and engine.in_flight == 0


# ---- the bounded queue -------------------------------------------------------------------------


@pytest.mark.usefixtures("driver_thread")  # the cancelled ones leave at a step nobody waits on
def test_queue_limit_counts_exactly_under_concurrent_submits(one_row: gptj.Model) -> None:
    engine = one_row.engine
    engine.max_queue = 3
    ids = one_row.tokenizer.encode("Hello")
    blocker = engine.submit(ids, SamplingParams(max_new_tokens=1000, ignore_eos=True, temperature=0))
    try:
        next(iter(blocker))  # it is in the batch
        accepted, refused = [], []
        barrier = threading.Barrier(12)

        def submit() -> None:
            barrier.wait()
            try:
                accepted.append(engine.submit(ids, SamplingParams(max_new_tokens=1, temperature=0)))
            except QueueFull:
                refused.append(1)

        threads = [threading.Thread(target=submit) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (len(accepted), len(refused)) == (3, 9)
        assert engine.queue_depth == 3
        # Cancelled waiting requests give their places back at the next step.
        for h in accepted:
            h.cancel()
        wait_for(lambda: engine.queue_depth == 0 and engine.in_flight == 1, "the cancelled ones left")
        assert all(h.result().finish_reason == "cancelled" for h in accepted)
        again = [engine.submit(ids, SamplingParams(max_new_tokens=1, temperature=0)) for _ in range(3)]
        with pytest.raises(QueueFull):
            engine.submit(ids, SamplingParams(max_new_tokens=1, temperature=0))
    finally:
        blocker.cancel()
        engine.max_queue = 1
    assert blocker.result().finish_reason == "cancelled"
    assert all(h.result().finish_reason == "length" for h in again)
    wait_for(lambda: idle(engine), "the engine is idle")


# ---- time limits -------------------------------------------------------------------------------


def test_timeout_while_queued(one_row: gptj.Model) -> None:
    engine = one_row.engine
    ids = one_row.tokenizer.encode("Hello")
    blocker = engine.submit(ids, SamplingParams(max_new_tokens=1000, ignore_eos=True, temperature=0))
    try:
        next(iter(blocker))
        queued = engine.submit(ids, SamplingParams(max_new_tokens=4, temperature=0), timeout=0.3)
        result = queued.result()  # ends while the blocker still holds the batch
        assert result.finish_reason == "timeout" and result.tokens == []
        assert not blocker.done
    finally:
        blocker.cancel()
    blocker.result()
    wait_for(lambda: idle(engine), "the engine is idle")


# ---- shutdown of the engine --------------------------------------------------------------------


def test_engine_shutdown_ends_every_request_with_a_reason(one_row: gptj.Model) -> None:
    engine = one_row.engine
    ids = one_row.tokenizer.encode("Hello")
    running_one = engine.submit(ids, SamplingParams(max_new_tokens=1000, ignore_eos=True, temperature=0))
    next(iter(running_one))
    queued = engine.submit(ids, SamplingParams(max_new_tokens=4, temperature=0))
    stopper = threading.Thread(target=engine.shutdown, kwargs={"grace": 3.0})
    stopper.start()
    wait_for(lambda: engine.draining, "the shutdown began")
    with pytest.raises(ShuttingDown, match="shutting down"):  # during the grace period: refused
        engine.submit(ids, SamplingParams(max_new_tokens=1))
    stopper.join()
    first, second = running_one.result(), queued.result()
    assert first.finish_reason == "shutdown" and 0 < len(first.tokens) < LONG["max_tokens"]
    assert second.finish_reason == "shutdown"
    assert engine.in_flight == 0
    # The engine starts again on the next request.
    assert (
        one_row.generate("Hello", max_new_tokens=2, temperature=0, ignore_eos=True).finish_reason == "length"
    )
