"""Fixtures shared by the server tests: the bundled model served locally (`local_url`, also
as `url`, with an httpx and an openai client on it), and the upstream front before it for
the API families that run over either backend (Ollama, KoboldAI, llama.cpp)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from servers import running

from gptj.serve import create_app, create_upstream_app


@pytest.fixture(scope="module")
def local_url(bundled_model) -> Iterator[str]:  # noqa: ANN001
    with running(create_app(bundled_model)) as url:
        yield url


@pytest.fixture(scope="module")
def url(local_url: str) -> str:
    return local_url


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


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

