"""The KoboldAI API as KoboldCpp serves it (gptj.serve.routes.kobold), with request bodies in the
shapes KoboldAI Lite and SillyTavern send (tests/data/clients/), against the local app and the
upstream front (`api_url`), checked against the OpenAI routes of the same server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

CLIENTS = Path(__file__).parents[1] / "data" / "clients"
LITE = json.loads((CLIENTS / "kobold_lite_generate.json").read_text())
TAVERN = json.loads((CLIENTS / "sillytavern_kobold_generate.json").read_text())


@pytest.fixture(scope="module")
def client(api_url: str) -> httpx.Client:
    with httpx.Client(base_url=api_url, timeout=120) as c:
        yield c


def openai_text(local_url: str, **body: object) -> dict:
    r = httpx.post(f"{local_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def events(response: httpx.Response) -> list[dict]:
    """KoboldCpp's stream: `event: message` then `data: {...}` for each event."""
    lines = [line for line in response.iter_lines() if line]
    assert lines[0::2] == ["event: message"] * (len(lines) // 2)
    return [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]


def test_info_endpoints(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    assert client.get("/api/v1/model").json() == {"result": f"koboldcpp/{bundled_model.name}"}
    assert client.get("/api/latest/model").json() == {"result": f"koboldcpp/{bundled_model.name}"}
    assert client.get("/api/v1/info/version").json() == {"result": "1.2.5"}
    assert client.get("/api/v1/config/max_context_length").json() == {"value": bundled_model.context_length}
    assert client.get("/api/extra/true_max_context_length").json() == {"value": bundled_model.context_length}
    assert 0 < client.get("/api/v1/config/max_length").json()["value"] <= bundled_model.context_length
    version = client.get("/api/extra/version").json()
    assert version["result"] == "KoboldCpp" and version["version"] and version["protected"] is False


def test_lite_generate_matches_the_openai_completion(client: httpx.Client, local_url: str) -> None:
    expected = openai_text(local_url, prompt=LITE["memory"] + LITE["prompt"], max_tokens=12, temperature=0,
                           top_p=0.92, top_k=100, repetition_penalty=1.07, stop=LITE["stop_sequence"])
    r = client.post("/api/v1/generate", json=LITE)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["text"] == expected["text"] and "Paris" in result["text"]
    assert result["finish_reason"] == expected["finish_reason"]
    assert result["completion_tokens"] > 0 and result["prompt_tokens"] > 0


def test_lite_stream_sends_what_generate_answers(client: httpx.Client) -> None:
    whole = client.post("/api/v1/generate", json=LITE).json()["results"][0]
    with client.stream("POST", "/api/extra/generate/stream", json=LITE) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert len(got) > 2 and "".join(e["token"] for e in got) == whole["text"]
    assert all(e["finish_reason"] is None for e in got[:-1])
    assert got[-1] == {"token": "", "finish_reason": whole["finish_reason"]}


def test_sillytavern_body_seed_and_stops(client: httpx.Client) -> None:
    first = client.post("/api/v1/generate", json=TAVERN)
    assert first.status_code == 200, first.text
    text = first.json()["results"][0]["text"]
    assert client.post("/api/v1/generate", json=TAVERN).json()["results"][0]["text"] == text  # sampler_seed
    assert text and not any(s in text for s in TAVERN["stop_sequence"])
    stopped = client.post("/api/v1/generate", json={**TAVERN, "temperature": 0, "stop_sequence": ["\n"],
                                                     "prompt": "Line one\nLine two\nLine"})
    (result,) = stopped.json()["results"]
    assert "\n" not in result["text"] and result["finish_reason"] == "stop"


def test_max_length_and_memory(client: httpx.Client, local_url: str) -> None:
    r = client.post("/api/v1/generate", json={"prompt": " capital of France is", "memory": "The",
                                              "max_length": 3, "temperature": 0})
    (result,) = r.json()["results"]
    assert result["completion_tokens"] == 3 and result["finish_reason"] == "length"
    assert result["text"] == openai_text(local_url, prompt="The capital of France is", max_tokens=3, temperature=0,
                                         top_p=0.92, top_k=100)["text"]


def test_tokencount(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    text = "Hello world <|im_start|>"
    r = client.post("/api/extra/tokencount", json={"prompt": text})
    ids = bundled_model.tokenizer.encode(text, allow_special=True)  # as generation reads a prompt
    assert r.json() == {"value": len(ids), "ids": ids}


def test_abort_by_genkey_returns_the_text_so_far(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    body = {"prompt": "Once upon a time", "max_length": 4000, "use_default_badwordsids": True, "genkey": "KCPP77"}
    answer: dict = {}

    def generate() -> None:
        answer["response"] = client.post("/api/v1/generate", json=body)

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 30
    while not client.post("/api/extra/generate/check", json={"genkey": "KCPP77"}).json()["results"][0]["text"]:
        assert time.monotonic() < deadline, "the generation did not start"
        time.sleep(0.05)
    assert client.post("/api/extra/abort", json={"genkey": "someone-else"}).json()["success"] == "false"
    assert client.post("/api/extra/abort", json={"genkey": "KCPP77"}).json() == {"success": "true", "done": "true"}
    thread.join(timeout=30)
    assert not thread.is_alive(), "abort did not end the generation"
    (result,) = answer["response"].json()["results"]
    assert result["text"] and result["finish_reason"] == "cancelled" and result["completion_tokens"] < 4000
    deadline = time.monotonic() + 30
    while bundled_model.engine.batch_size:
        assert time.monotonic() < deadline, "the engine kept generating"
        time.sleep(0.05)


def test_abort_without_genkey_stops_the_callers_streams(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    body = {"prompt": "Once upon a time", "max_length": 4000, "use_default_badwordsids": True}
    with client.stream("POST", "/api/extra/generate/stream", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        assert client.post("/api/extra/abort").json()["success"] == "true"
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert rest[-1]["finish_reason"] == "cancelled"
    assert client.post("/api/extra/abort").json()["success"] == "false"  # nothing left to stop


@pytest.mark.parametrize(("body", "field"), [
    ({"max_length": "long"}, "max_length"),
    ({"max_length": 2**40}, "max_length"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"rep_pen": 0}, "rep_pen"),
    ({"stop_sequence": "You:"}, "stop_sequence"),
    ({"stop_sequence": ["x"] * 17}, "stop_sequence"),
    ({"stop_sequence": ["x" * 300]}, "stop_sequence"),
    ({"sampler_seed": 2**70}, "sampler_seed"),
    ({"sampler_seed": "abc"}, "sampler_seed"),
    ({"prompt": {"a": [[[[[[[]]]]]]]}}, "prompt"),
    ({"prompt": "\udcff"}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"images": ["aGk="]}, "images"),
    ({"grammar": "root ::= \"a\""}, "grammar"),
    ({"genkey": 5}, "genkey"),
])
def test_bad_bodies_get_400_naming_the_field(local_url: str, body: dict, field: str) -> None:
    data = json.dumps({"prompt": "Hi", "max_length": 2, **body}).encode("utf-8", "surrogatepass")
    r = httpx.post(f"{local_url}/api/v1/generate", content=data, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["error"]["param"] == field, error
    assert error["detail"]["msg"].startswith(field) and error["detail"]["type"] == "bad_input"


def test_bad_json_and_bad_tokencount(local_url: str) -> None:
    r = httpx.post(f"{local_url}/api/v1/generate", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(f"{local_url}/api/extra/tokencount", json={"prompt": ["not", "text"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{local_url}/api/extra/abort", json={"genkey": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "genkey"
