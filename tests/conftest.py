"""Shared fixtures."""

from __future__ import annotations

import pytest

import gptj


@pytest.fixture(scope="session")
def bundled_model() -> gptj.Model:
    """The bundled SmolLM2-135M-Instruct, loaded once per session (4 parallel rows)."""
    model = gptj.load(max_batch=4)
    yield model
    model.engine.shutdown(grace=0)
