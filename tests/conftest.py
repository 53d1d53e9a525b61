"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import gptj


@pytest.fixture(scope="session")
def bundled_model() -> gptj.Model:
    """The bundled SmolLM2-135M-Instruct in float32 (its weights exactly as the GGUF gives
    them), loaded once per session (4 parallel rows)."""
    model = gptj.load(quantize="none", max_batch=4)
    yield model
    model.engine.shutdown(grace=0)


@pytest.fixture(scope="module")
def one_row(bundled_model) -> Iterator[gptj.Model]:  # noqa: ANN001
    """The bundled weights behind an engine with one batch row and a queue of one."""
    model = gptj.Model(
        bundled_model.module, bundled_model.tokenizer, bundled_model.info, max_batch=1, context_length=1024
    )
    model.engine.max_queue = 1
    yield model
    model.engine.shutdown(grace=0)
