"""llama.cpp's server API (gptj.serve.routes.llamacpp, routes/tokenize.py): `/completion` with a
`prompt` beside EleutherAI's `/completion` with a `context`, and /tokenize and /detokenize
with llama.cpp's fields, against the local app and the upstream front (`api_url`)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

PROMPT = "The capital of France is"
WEBUI = json.loads((Path(__file__).parents[1] / "data" / "clients" / "llamacpp_webui_completion.json").read_text())
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def client(api_url: str) -> httpx.Client:
    with httpx.Client(base_url=api_url, timeout=120) as c:
        yield c


def openai_text(local_url: str, prompt: str, max_tokens: int) -> dict:
    r = httpx.post(f"{local_url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                   timeout=120)
    return r.json()


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_webui_completion_matches_the_openai_completion(client: httpx.Client, local_url: str, bundled_model) -> None:  # noqa: ANN001
    expected = openai_text(local_url, PROMPT, 8)
    r = client.post("/completion", json=WEBUI)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["content"] == expected["choices"][0]["text"] and "Paris" in got["content"]
    assert got["stop"] is True and got["stop_type"] == "limit" and got["tokens_predicted"] == 8
    assert got["tokens_evaluated"] == expected["usage"]["prompt_tokens"]
    assert got["model"] == bundled_model.name and got["generation_settings"]["n_ctx"] == bundled_model.context_length
    assert got["timings"]["predicted_n"] == 8


def test_streamed_completion(client: httpx.Client) -> None:
    whole = client.post("/completion", json=WEBUI).json()
    with client.stream("POST", "/completion", json={**WEBUI, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert len(events) > 2 and all(e["stop"] is False for e in events[:-1])
    assert "".join(e["content"] for e in events) == whole["content"]
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit" and events[-1]["tokens_predicted"] == 8


def test_stop_types(local_url: str) -> None:
    word = httpx.post(f"{local_url}/completion", json={"prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                                       "stop": ["."]}, timeout=120).json()
    assert word["stop_type"] == "word" and "." not in word["content"]
    eos = httpx.post(f"{local_url}/completion", json={"prompt": CHAT_PROMPT, "temperature": 0}, timeout=120).json()
    assert eos["stop_type"] == "eos" and "Paris" in eos["content"]  # n_predict -1: until the end of text


def test_eleutherai_bodies_keep_their_answers(client: httpx.Client, local_url: str) -> None:
    expected = openai_text(local_url, PROMPT, 4)["choices"][0]["text"]
    hosted = client.post("/completion", json={"context": PROMPT, "response_length": 4, "temp": 0, "top_p": 1})
    assert hosted.json() == [{"generated_text": PROMPT + expected}]
    both = client.post("/completion", json={"context": PROMPT, "prompt": "ignored", "response_length": 4, "temp": 0,
                                            "top_p": 1, "remove_input": True})
    assert both.json() == [{"generated_text": expected}]  # a context makes it EleutherAI's
    assert client.post("/completion", json={}).json()["error"]["param"] == "context"


@pytest.mark.parametrize(("body", "field"), [
    ({"n_predict": "many"}, "n_predict"),
    ({"n_predict": 2**40}, "n_predict"),
    ({"n_predict": 100_000}, "n_predict"),
    ({"temperature": 9}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"stop": "."}, "stop"),
    ({"stop": [""]}, "stop.0"),
    ({"seed": 2**70}, "seed"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"n_probs": 5}, "n_probs"),
    ({"grammar": "root ::= \"a\""}, "grammar"),
    ({"json_schema": {"type": "objectx"}}, "json_schema"),  # JSON output works: a bad schema
    ({"image_data": [{"data": "aGk=", "id": 1}]}, "image_data"),
])
def test_bad_bodies_get_400_naming_the_field(local_url: str, body: dict, field: str) -> None:
    data = json.dumps({"prompt": PROMPT, "n_predict": 2, **body}).encode("utf-8", "surrogatepass")
    r = httpx.post(f"{local_url}/completion", content=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(field), error


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"prompt": "\xff"}', b"[1, 2]", b"null"])
def test_bad_json_gets_400(local_url: str, raw: bytes) -> None:
    r = httpx.post(f"{local_url}/completion", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("body", "context"), r.text


def test_token_id_prompts(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    ids = bundled_model.tokenizer.encode(PROMPT)
    by_ids = client.post("/completion", json={**WEBUI, "prompt": ids}).json()
    assert by_ids["content"] == client.post("/completion", json=WEBUI).json()["content"]


def test_tokenize_follows_llamacpp(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    tok = bundled_model.tokenizer
    text = "Hi<|im_start|>"
    parsed = tok.encode(text, allow_special=True)
    plain = tok.encode(text)
    assert parsed != plain
    assert client.post("/tokenize", json={"content": text}).json()["tokens"] == parsed  # llama.cpp's default
    assert client.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"] == plain
    assert client.post("/tokenize", json={"text": text}).json()["tokens"] == plain  # as before
    assert client.post("/tokenize", json={"text": text, "parse_special": True}).json()["tokens"] == parsed
    bos = client.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert bos == [tok.bos_token_id, *parsed]
    pieces = client.post("/tokenize", json={"content": "Hi 😀", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("Hi 😀")
    assert pieces[0] == {"id": pieces[0]["id"], "piece": "Hi"} and isinstance(pieces[-1]["piece"], list)
    back = client.post("/detokenize", json={"tokens": parsed}).json()
    assert back == {"text": text, "content": text}
