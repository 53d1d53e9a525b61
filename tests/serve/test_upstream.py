"""`gptj serve --upstream URL`: the front (gptj.serve.backends.upstream) before a real `gptj serve` of the bundled
model, checked against what that upstream answers directly; plus a stand-in upstream (in
process) for the paths a gptj upstream does not take, and one CLI run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from servers import free_port, running

import gptj
from gptj.serve import create_app, create_upstream_app
from gptj.serve.backends.upstream import known_tokenizer

UPKEY = "upstream-secret"
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "SmolLM2-135M-Instruct"




def wait_until_up(url: str, headers: dict | None = None, alive=lambda: True) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, headers=headers, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive() and time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.05)



@pytest.fixture(scope="module")
def upstream(bundled_model: gptj.Model) -> Iterator[str]:
    """A real gptj serve (bundled SmolLM2) that wants an API key."""
    with running(create_app(bundled_model, api_key=UPKEY)) as url:
        yield url


@pytest.fixture(scope="module")
def direct(upstream: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream, timeout=120, headers={"Authorization": f"Bearer {UPKEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def front(upstream: str) -> Iterator[str]:
    with running(create_upstream_app(f"{upstream}/v1", UPKEY)) as url:
        yield url


@pytest.fixture(scope="module")
def url(front: str) -> str:
    """conftest's `client` and `oai` talk to the upstream front here."""
    return front


# ---- through a real gptj upstream --------------------------------------------------------------


def test_completions_plain_and_streamed_match_the_upstream(oai: openai.OpenAI, direct: httpx.Client) -> None:
    expected = direct.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    plain = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert plain.choices[0].text == expected["choices"][0]["text"] and plain.choices[0].text
    assert plain.usage.completion_tokens == expected["usage"]["completion_tokens"]
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks if c.choices) == expected["choices"][0]["text"]
    assert chunks[-1].choices[0].finish_reason == expected["choices"][0]["finish_reason"]


def test_a_client_that_leaves_a_stream_stops_the_upstream_generation(front: str, bundled_model: gptj.Model) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{front}/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        next(r.iter_lines())  # the first event arrived: the upstream is generating
        assert bundled_model.engine.batch_size == 1
    deadline = time.monotonic() + 30  # 4000 tokens would take minutes on a CPU
    while bundled_model.engine.batch_size or bundled_model.engine.queue_depth:
        assert time.monotonic() < deadline, "the upstream kept generating for a client that left"
        time.sleep(0.05)


def test_a_body_without_model_gets_the_upstream_one(client: httpx.Client, direct: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_chat_plain_and_streamed(oai: openai.OpenAI, direct: httpx.Client) -> None:
    expected = direct.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8, "temperature": 0}).json()
    reply = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    stream = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected["choices"][0]["message"]["content"]


def test_eleutherai_endpoints_are_translated(client: httpx.Client, direct: httpx.Client) -> None:
    body = {"context": PROMPT, "temp": 0, "length": 8}
    got = client.post("/complete", json=body)
    assert got.status_code == 200, got.text
    assert got.json() == direct.post("/complete", json=body).json() and got.json()["completion"]
    hosted = client.post("/completion", json={"context": PROMPT, "temp": 0, "response_length": 8})
    assert hosted.json() == [{"generated_text": PROMPT + got.json()["completion"]}]
    removed = client.post("/completion", json={"context": PROMPT, "temp": 0, "responseLength": 8, "remove_input": True})
    assert removed.json() == [{"generated_text": got.json()["completion"]}]
    bad = client.post("/complete", json={"context": PROMPT, "temp": 5})  # validated here, as gptj serve does
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temp"
    assert client.post("/complete", json={"context": ""}).json()["error"]["message"] == "context: must not be empty"


def test_tokenize_uses_the_upstream_or_a_named_tokenizer(client: httpx.Client, bundled_model: gptj.Model) -> None:
    r = client.post("/tokenize", json={"text": "Hello world 👋"})
    assert r.status_code == 200, r.text
    ids = bundled_model.tokenizer.encode("Hello world 👋")
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids) and len(r.json()["pieces"]) == len(ids)
    local = client.post("/tokenize", json={"text": "Hello world", "tokenizer": "gpt-j"}).json()
    assert local["tokens"] == [15496, 995] and local["pieces"][1]["text"] == " world"
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"text": "Hello world 👋", "content": "Hello world 👋"}
    assert client.post("/tokenize", json={}).status_code == 400


def test_api_info_reports_the_remote_model(client: httpx.Client, front: str, upstream: str, bundled_model: gptj.Model) -> None:
    info = client.get("/api/info").json()
    assert info["name"] == MODEL and info["architecture"] == "remote"
    assert info["upstream"] == f"{upstream}/v1" and info["context_length"] == bundled_model.context_length
    assert info["defaults"]["temperature"] == gptj.SamplingParams().temperature
    assert client.get("/api/presets").json()["presets"]
    assert client.get("/health").json()["model"] == MODEL
    assert 'gptj_requests_total{path="/api/info"}' in client.get("/metrics").text


def test_the_page_is_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../server.py").status_code == 404


def test_upstream_errors_pass_through(client: httpx.Client, direct: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 6}
    expected = direct.post("/v1/completions", json=body)
    got = client.post("/v1/completions", json=body)
    assert got.status_code == expected.status_code == 400
    assert got.json() == expected.json() and "temperature" in got.json()["error"]["message"]
    streamed = client.post("/v1/chat/completions", json={"messages": [], "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "messages"
    assert client.get("/v1/nope").status_code == 404


def test_the_upstream_key_is_sent_as_bearer_and_the_client_key_is_not(upstream: str) -> None:
    with running(create_upstream_app(f"{upstream}/v1", None)) as keyless:  # the upstream refuses it
        r = httpx.get(f"{keyless}/v1/models", timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with running(create_upstream_app(upstream, UPKEY, api_key="front-key")) as guarded:  # no /v1: added
        assert httpx.get(f"{guarded}/v1/models", timeout=30).status_code == 401
        ok = httpx.get(f"{guarded}/v1/models", headers={"Authorization": "Bearer front-key"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
        assert httpx.get(f"{guarded}/", timeout=30).status_code == 200  # the page needs no key


# ---- a down upstream and a stand-in one ----------------------------------------------------------


def test_an_upstream_that_is_down_gives_502() -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with TestClient(create_upstream_app(dead), base_url="http://localhost") as c:
        for r in (c.post("/v1/completions", json={"model": "m", "prompt": "x"}),
                  c.post("/v1/chat/completions", json={"messages": QUESTION}),
                  c.get("/api/info"), c.post("/complete", json={"context": "x"}),
                  c.post("/tokenize", json={"text": "x"})):
            assert r.status_code == 502, r.text
            error = r.json()["error"]
            assert error["type"] == "upstream_unreachable" and dead in error["message"] and "running" in error["message"]


def stand_in(model_id: str, seen: list) -> FastAPI:
    """An OpenAI-compatible upstream with /v1 only (no /tokenize), recording Authorization."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        seen.append(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": model_id, "object": "model", "max_model_len": 2048}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        seen.append(request.headers.get("authorization"))
        body = await request.json()
        return {"choices": [{"index": 0, "text": f" [{body['model']}:{body['max_tokens']}]", "finish_reason": "length"}]}

    return app


def test_a_stand_in_upstream_without_tokenize(tmp_path) -> None:  # noqa: ANN001
    seen: list = []
    app = create_upstream_app("http://stand-in/v1", "k1", transport=httpx.ASGITransport(app=stand_in("acme/unknown-7b", seen)))
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/tokenize", json={"text": "Hello"})
        assert r.status_code == 501 and "acme/unknown-7b" in r.json()["error"]["message"]
        assert c.post("/detokenize", json={"tokens": [1]}).status_code == 501
        assert c.post("/tokenize", json={"text": "Hello world", "tokenizer": "gpt-j"}).json()["tokens"] == [15496, 995]
        assert c.post("/complete", json={"context": "Hi", "length": 5}).json() == {"completion": " [acme/unknown-7b:5]"}
        info = c.get("/api/info").json()
        assert info["context_length"] == 2048 and info["architecture"] == "remote" and info["tokenizer"] is None
    assert seen and set(seen) == {"Bearer k1"}


def test_gpt_j_upstreams_tokenize_here() -> None:
    assert known_tokenizer("EleutherAI/gpt-j-6b") == known_tokenizer("gptj") == "gpt-j"
    assert known_tokenizer("meta-llama/Llama-3-8B") is None
    seen: list = []
    app = create_upstream_app("http://stand-in", None, transport=httpx.ASGITransport(app=stand_in("EleutherAI/gpt-j-6b", seen)))
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/tokenize", json={"text": "Hello world"})
        assert r.json()["tokens"] == [15496, 995] and r.json()["pieces"][0]["text"] == "Hello"
        assert c.post("/detokenize", json={"tokens": [15496, 995]}).json()["text"] == "Hello world"
        assert c.get("/api/info").json()["tokenizer"] == "gpt-j"
    assert set(seen) == {None}  # no key configured: no Authorization header


def test_cli_serve_upstream_loads_no_model(upstream: str, tmp_path) -> None:  # noqa: ANN001
    port = free_port()
    env = {**os.environ, "GPTJ_UPSTREAM_KEY": UPKEY}
    proc = subprocess.Popen([sys.executable, "-m", "gptj.cli", "serve", "--upstream", f"{upstream}/v1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/info", alive=lambda: proc.poll() is None)
        info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=30).json()
        assert info["architecture"] == "remote" and info["name"] == MODEL
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"in front of {upstream}/v1" in out and f"the upstream serves {MODEL}" in out
    assert "gptj: serving SmolLM2" not in out  # the local-model banner of gptj serve
