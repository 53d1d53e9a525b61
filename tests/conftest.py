"""Shared fixtures."""

from __future__ import annotations

import pytest

import gptj


@pytest.fixture(scope="session")
def bundled_model() -> gptj.Model:
    """The bundled SmolLM2-135M-Instruct in float32 (its weights exactly as the GGUF gives
    them), loaded once per session (4 parallel rows)."""
    model = gptj.load(quantize="none", max_batch=4)
    yield model
    model.engine.shutdown(grace=0)
