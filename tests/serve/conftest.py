"""Fixtures shared by the tests of the API families that run over either backend (Ollama,
KoboldAI, llama.cpp): the bundled model served locally, and the upstream front before it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import running

from gptj.serve import create_app, create_upstream_app


@pytest.fixture(scope="module")
def local_url(bundled_model) -> Iterator[str]:  # noqa: ANN001
    with running(create_app(bundled_model)) as url:
        yield url


@pytest.fixture(scope="module")
def upstream_url(local_url: str) -> Iterator[str]:
    """`gptj serve --upstream` in front of the local server: every generation goes through
    the upstream backend's /v1 streams."""
    with running(create_upstream_app(f"{local_url}/v1")) as url:
        yield url


@pytest.fixture(scope="module", params=["local", "upstream"])
def api_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs against the local app and once against the upstream front."""
    return request.getfixturevalue(f"{request.param}_url")

