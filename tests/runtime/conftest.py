"""Fixtures of the engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import gptj


@pytest.fixture(scope="session")
def int8_model() -> Iterator[gptj.Model]:
    """The bundled model in int8: its fused C++ step is exact for several tokens at once, which
    speculative decoding needs (one engine row, the defaults)."""
    model = gptj.load(quantize="int8")
    yield model
    model.engine.shutdown(grace=0)


@pytest.fixture
def driver_thread(one_row: gptj.Model) -> Iterator[None]:
    """A driver thread on one_row's engine, as a server gives it: requests advance while a test
    waits without iterating them."""
    one_row.engine.start_background()
    yield
    one_row.engine.shutdown(grace=0)
