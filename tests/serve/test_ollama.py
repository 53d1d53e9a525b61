"""Ollama's API (gptj.serve.routes.ollama) through the official `ollama` Python package, against
the local app and the upstream front (`api_url`), checked against what the OpenAI routes of
the same server answer for the same settings."""

from __future__ import annotations

import json
import time

import httpx
import ollama
import pytest

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 8}


def openai_chat(local_url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{local_url}/v1/chat/completions", json=body, timeout=120).json()


def openai_completion(local_url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(f"{local_url}/v1/completions", json=body, timeout=120).json()


@pytest.fixture(scope="module")
def client(api_url: str) -> ollama.Client:
    return ollama.Client(host=api_url, timeout=120)


def test_list_show_ps_version_name_the_served_model(client: ollama.Client, api_url: str, bundled_model) -> None:  # noqa: ANN001
    name = f"{bundled_model.name}:latest"
    family = httpx.get(f"{api_url}/api/info").json()["architecture"]  # "remote" in front of an upstream
    (listed,) = client.list().models
    assert listed.model == name and listed.details.family == family
    assert listed.details.parameter_size == ("135M" if family == "llama" else "")
    (loaded,) = client.ps().models
    assert loaded.model == name and loaded.context_length == bundled_model.context_length
    shown = client.show("llama3.2")  # any name: the server holds one model
    assert shown.modelinfo[f"{family}.context_length"] == bundled_model.context_length
    assert "completion" in shown.capabilities
    assert client._client.get("/api/version").json()["version"]


def test_generate_is_the_chat_reply_and_raw_is_the_plain_completion(client: ollama.Client, local_url: str) -> None:
    expected = openai_chat(local_url, [{"role": "user", "content": PROMPT}], 8)
    reply = client.generate(model="anything", prompt=PROMPT, options=GREEDY)
    assert reply.response == expected["choices"][0]["message"]["content"] and reply.response
    assert reply.done and reply.done_reason == expected["choices"][0]["finish_reason"]
    assert reply.eval_count == expected["usage"]["completion_tokens"]
    assert reply.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert reply.total_duration >= reply.eval_duration > 0 and reply.model.startswith("SmolLM2")
    raw = client.generate(model="anything", prompt=PROMPT, raw=True, options=GREEDY)
    plain = openai_completion(local_url, PROMPT, 8)["choices"][0]["text"]
    assert raw.response == plain and "Paris" in plain


def test_generate_streams_what_it_answers_whole(client: ollama.Client) -> None:
    whole = client.generate(model="x", prompt=PROMPT, raw=True, options=GREEDY)
    parts = list(client.generate(model="x", prompt=PROMPT, raw=True, options=GREEDY, stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response
    last = parts[-1]
    assert last.done and last.response == "" and last.done_reason == "length" and last.eval_count == 8


def test_chat_plain_and_streamed(client: ollama.Client, local_url: str) -> None:
    expected = openai_chat(local_url, QUESTION, 12)["choices"][0]["message"]["content"]
    reply = client.chat(model="x", messages=QUESTION, options={"temperature": 0, "num_predict": 12})
    assert reply.message.role == "assistant" and reply.message.content == expected and "Paris" in expected
    parts = list(client.chat(model="x", messages=QUESTION, options={"temperature": 0, "num_predict": 12}, stream=True))
    assert "".join(p.message.content for p in parts) == expected and parts[-1].done


def test_chat_continues_a_final_assistant_message(client: ollama.Client, local_url: str) -> None:
    """As Ollama: a last message of the assistant's is a prefill that the reply goes on with, the
    text that vLLM's continue_final_message gives on the OpenAI route."""
    prefill = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    body = {"messages": prefill, "max_tokens": 8, "temperature": 0, "continue_final_message": True,
            "add_generation_prompt": False}
    r = httpx.post(f"{local_url}/v1/chat/completions", json=body, timeout=120)
    expected = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in expected
    reply = client.chat(model="x", messages=prefill, options={"temperature": 0, "num_predict": 8})
    assert reply.message.content == expected
    parts = list(client.chat(model="x", messages=prefill, options={"temperature": 0, "num_predict": 8}, stream=True))
    assert "".join(p.message.content for p in parts) == expected


def test_options_are_applied(client: ollama.Client) -> None:
    short = client.generate(model="x", prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    stopped = client.generate(model="x", prompt=PROMPT, raw=True,
                              options={"temperature": 0, "num_predict": 8, "stop": ["."]})
    assert stopped.done_reason == "stop" and "." not in stopped.response and "Paris" in stopped.response
    hot = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "num_predict": 12, "seed": 7, "repeat_penalty": 1.1}
    first = client.generate(model="x", prompt="Once upon a time", raw=True, options=hot).response
    again = client.generate(model="x", prompt="Once upon a time", raw=True, options=hot).response
    other = client.generate(model="x", prompt="Once upon a time", raw=True, options={**hot, "seed": 8}).response
    assert first == again and first != other


def test_empty_prompt_loads_and_keep_alive_0_unloads(client: ollama.Client) -> None:
    assert client.generate(model="x").done_reason == "load"
    assert client.generate(model="x", keep_alive=0).done_reason == "unload"
    assert client.chat(model="x", messages=[]).done_reason == "load"


@pytest.mark.parametrize(("body", "field"), [
    ({"options": {"temperature": "hot"}}, "options.temperature"),
    ({"options": {"temperature": 9}}, "options.temperature"),
    ({"options": {"num_predict": 2**40}}, "options.num_predict"),
    ({"options": {"num_predict": 100_000}}, "options.num_predict"),  # past the context window
    ({"options": {"seed": 2**70}}, "options.seed"),
    ({"options": {"stop": ["x"] * 17}}, "options.stop"),
    ({"options": [1, 2]}, "options"),
    ({"options": {"top_k": {"a": [[[[[]]]]]}}}, "options.top_k"),
    ({"stream": "maybe"}, "stream"),
    ({"prompt": ["a list"]}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"format": "yaml"}, "format"),
    ({"format": {"type": "objectx"}}, "format"),  # JSON output works (test_json_output_http.py): a bad schema
    ({"images": ["iVBORw0KGgo="]}, "images"),
    ({"template": "{{ .Prompt }}"}, "template"),
    ({"suffix": "return x"}, "suffix"),
    ({"context": [1, 2, 3]}, "context"),
    ({"think": True}, "think"),
])
def test_bad_generate_bodies_get_400_naming_the_field(local_url: str, body: dict, field: str) -> None:
    data = json.dumps({"model": "x", "prompt": "Hi", **body}).encode("utf-8", "surrogatepass")
    r = httpx.post(f"{local_url}/api/generate", content=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # Ollama's shape: a string, which the ollama package shows
    assert isinstance(error, str) and error.startswith(field), error


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "messages.0.images"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": QUESTION, "options": {"repeat_penalty": 0}}, "options.repeat_penalty"),
])
def test_bad_chat_bodies_get_400_naming_the_field(local_url: str, body: dict, field: str) -> None:
    r = httpx.post(f"{local_url}/api/chat", json={"model": "x", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(field), r.json()


def test_the_ollama_package_reports_our_errors(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="x", prompt="Hi", format={"type": "objectx"})
    assert caught.value.status_code == 400 and "format" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="x", input="Hi")
    assert caught.value.status_code == 501 and "embeddings" in caught.value.error
    r = client._client.post("/api/embeddings", json={"model": "x", "prompt": "Hi"})
    assert r.status_code == 501


COUNTING = ", ".join(str(i) for i in range(1, 30)) + ","  # greedy decoding goes on counting: no end of text soon


def test_leaving_a_stream_stops_the_generation(local_url: str, bundled_model) -> None:  # noqa: ANN001
    engine = bundled_model.engine
    cancelled = engine.finish_reasons.get("cancelled", 0)
    body = {"model": "x", "prompt": COUNTING, "raw": True, "options": {"num_predict": 4000, "temperature": 0}}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{local_url}/api/generate", json=body) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        next(r.iter_lines())
        assert engine.batch_size == 1
    wait_cancelled(engine, cancelled)


def test_a_client_that_leaves_a_whole_answer_stops_the_generation(local_url: str, bundled_model) -> None:  # noqa: ANN001
    engine = bundled_model.engine
    cancelled = engine.finish_reasons.get("cancelled", 0)
    body = {"model": "x", "prompt": COUNTING, "raw": True, "stream": False,
            "options": {"num_predict": 4000, "temperature": 0}}
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 1.5 s and hangs up
        httpx.post(f"{local_url}/api/generate", json=body, timeout=1.5)
    wait_cancelled(engine, cancelled)


def wait_cancelled(engine, before: int, limit: float = 20.0) -> None:  # noqa: ANN001
    """4000 tokens would take minutes on a CPU: the generation must end as cancelled well before."""
    deadline = time.monotonic() + limit
    while engine.finish_reasons.get("cancelled", 0) == before or engine.batch_size:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.05)


def test_requests_are_counted_by_route(local_url: str) -> None:
    httpx.get(f"{local_url}/api/tags")
    metrics = httpx.get(f"{local_url}/metrics").text
    assert 'gptj_requests_total{path="/api/tags"}' in metrics
    assert 'gptj_requests_total{path="/api/generate"}' in metrics
