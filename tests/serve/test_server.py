"""HTTP tests of `gptj serve` against a real uvicorn server on the bundled SmolLM2 model,
through httpx and the official openai client."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from servers import running

import gptj
from gptj.serve import create_app
from gptj.serve.guard import MAX_BODY_BYTES, check_bind
from gptj.serve.protocol import JSON_SLICE, MAX_N, json_in_slices

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy(client: httpx.Client) -> dict:
    """One greedy completion of PROMPT that several tests compare against."""
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---- OpenAI: models and completions ------------------------------------------------------------


def test_models(client: httpx.Client, oai: openai.OpenAI, bundled_model) -> None:  # noqa: ANN001
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [bundled_model.name]
    assert [m.id for m in oai.models.list()] == [bundled_model.name]


def test_completion_greedy(greedy: dict, bundled_model) -> None:  # noqa: ANN001
    assert greedy["object"] == "text_completion"
    (choice,) = greedy["choices"]
    assert "Paris" in choice["text"]
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    usage = greedy["usage"]
    assert usage["prompt_tokens"] == len(bundled_model.tokenizer.encode(PROMPT, allow_special=True))
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


def test_completion_stop_sequence(client: httpx.Client, greedy: dict) -> None:
    full = greedy["choices"][0]["text"]
    assert "." in full  # " Paris. ..."
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": ["."]})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[: full.index(".")]  # the stop text itself is left out
    assert r.json()["usage"]["completion_tokens"] < 8


def test_completion_stream_matches_greedy(oai: openai.OpenAI, greedy: dict) -> None:
    stream = oai.completions.create(model="gpt-j", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    pieces, finish = [], []
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason:
                finish.append(c.finish_reason)
    assert len(pieces) > 2  # really streamed, not one blob
    assert "".join(pieces) == greedy["choices"][0]["text"]
    assert finish == ["length"]


def test_completion_n2_with_seed(oai: openai.OpenAI) -> None:
    def run() -> list[str]:
        r = oai.completions.create(model="default", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                   n=2, seed=123)
        assert sorted(c.index for c in r.choices) == [0, 1]
        assert 0 < r.usage.completion_tokens <= 2 * 6
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = run()
    assert all(first)
    assert run() == first  # the same seed gives the same samples


def test_completion_echo(client: httpx.Client, greedy: dict) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == PROMPT + greedy["choices"][0]["text"]


def test_completion_logprobs(client: httpx.Client, greedy: dict) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == greedy["choices"][0]["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert logprob <= 0
        assert 1 <= len(top) <= 3  # the alternatives are there
        assert max(top, key=top.get) == token  # greedy picked the top-1
        assert top[token] == pytest.approx(logprob, abs=1e-4)


def test_completion_echo_logprobs(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "echo": True,
                                             "logprobs": 1})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    n_prompt = len(bundled_model.tokenizer.encode(PROMPT))
    assert len(lp["tokens"]) == n_prompt + 2
    assert "".join(lp["tokens"]) == r.json()["choices"][0]["text"]
    assert lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])


def test_completion_echo_logprobs_streamed(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    # The first chunk carries the prompt and its logprobs; the rest, as without echo
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1, "stream": True}
    whole = client.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == PROMPT
    lp = first["logprobs"]
    n_prompt = len(bundled_model.tokenizer.encode(PROMPT))
    assert "".join(lp["tokens"]) == PROMPT and len(lp["token_logprobs"]) == n_prompt
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"] == pytest.approx(whole["token_logprobs"][:n_prompt], abs=1e-4)
    generated = [c["choices"][0]["logprobs"] for c in chunks[1:] if c["choices"][0]["logprobs"]]
    assert sum(len(g["tokens"]) for g in generated) == 2
    assert generated[0]["text_offset"][0] == len(PROMPT)


def test_completion_token_ids(client: httpx.Client, greedy: dict, bundled_model) -> None:  # noqa: ANN001
    ids = bundled_model.tokenizer.encode(PROMPT)
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == len(ids)


# ---- OpenAI: chat ------------------------------------------------------------------------------


def test_chat(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="gpt-j", messages=QUESTION, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.model_extra["gptj"]["dropped_messages"] == 0

    stream = oai.chat.completions.create(model="gpt-j", messages=QUESTION, max_tokens=24, temperature=0, stream=True)
    pieces, finish = [], []
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            if c.finish_reason:
                finish.append(c.finish_reason)
    assert "".join(pieces) == choice.message.content
    assert finish == [choice.finish_reason]


def test_chat_drops_old_messages_in_a_small_context(bundled_model) -> None:  # noqa: ANN001
    # The same weights behind a second engine with a 256-token window.
    small = gptj.Model(bundled_model.module, bundled_model.tokenizer, bundled_model.info, max_batch=1,
                       context_length=256)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(12):
        messages.append({"role": "user", "content": f"Tell me fact number {i} about the city of Paris, please."})
        messages.append({"role": "assistant", "content": f"Fact {i}: Paris is the capital of France and on the Seine."})
    messages.append({"role": "user", "content": "Thanks! And what is the capital of Italy?"})
    try:
        with running(create_app(small)) as base, httpx.Client(base_url=base, timeout=120) as c:
            assert c.get("/api/info").json()["context_length"] == 256
            r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["gptj"]["dropped_messages"] > 0
            assert body["usage"]["prompt_tokens"] + 4 <= 256

            with c.stream("POST", "/v1/chat/completions",
                          json={"messages": messages, "max_tokens": 2, "temperature": 0, "stream": True}) as s:
                first = json.loads(next(line for line in s.iter_lines() if line.startswith("data: "))[6:])
            assert first["gptj"]["dropped_messages"] == body["gptj"]["dropped_messages"]
    finally:
        small.engine.shutdown(grace=0)


# ---- EleutherAI --------------------------------------------------------------------------------


def test_eleutherai_complete(client: httpx.Client, greedy: dict) -> None:
    r = client.post("/complete", json={"context": PROMPT, "top_p": 0.9, "temp": 0, "length": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["completion"]
    assert body["completion"] == greedy["choices"][0]["text"]  # the continuation only


def test_eleutherai_hosted_completion(client: httpx.Client, greedy: dict) -> None:
    cont = greedy["choices"][0]["text"]
    base = {"context": PROMPT, "top_p": 0.9, "temp": 0, "response_length": 8}
    r = client.post("/completion", json=base)
    assert r.status_code == 200, r.text
    assert r.json() == [{"generated_text": PROMPT + cont}]
    r = client.post("/completion", json={**base, "remove_input": True})
    assert r.json() == [{"generated_text": cont}]
    # The camelCase names the hosted API's clients sent.
    camel = {"context": PROMPT, "topP": 0.9, "temp": 0, "responseLength": 8, "removeInput": True}
    r = client.post("/completion", json=camel)
    assert r.status_code == 200, r.text
    assert r.json() == [{"generated_text": cont}]
    r = client.post("/completion", json={**camel, "topP": 1.5})  # topP is read, and checked
    assert r.status_code == 400
    assert "topP" in r.json()["error"]["message"]


# ---- tokenizer ---------------------------------------------------------------------------------


def test_tokenize(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    text = "Hello 😀 world"
    body = client.post("/tokenize", json={"text": text}).json()
    assert body["tokens"] == bundled_model.tokenizer.encode(text)
    assert body["count"] == len(body["tokens"])
    pieces = body["pieces"]
    assert [p["id"] for p in pieces] == body["tokens"]
    assert b"".join(bytes(p["bytes"]) for p in pieces) == text.encode()
    assert any(p["text"] is None for p in pieces)  # the emoji is split over tokens
    for p in pieces:
        if p["text"] is not None:
            assert p["text"].encode() == bytes(p["bytes"])

    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"text": text, "content": text}


def test_long_tokenize_answers_whole(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    """A text of many more tokens than the answer is encoded per slice: every token and piece
    there, in order, in valid JSON, in both shapes."""
    text = "".join(f"word{i} ünï \"q\" 😀\n" for i in range(JSON_SLICE // 2))
    want = bundled_model.tokenizer.encode(text)
    assert len(want) > 2 * JSON_SLICE
    r = client.post("/tokenize", json={"text": text})
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["tokens"] == want and body["count"] == len(want) and len(body["pieces"]) == len(want)
    assert b"".join(bytes(p["bytes"]) for p in body["pieces"]) == text.encode()
    llama = client.post("/tokenize", json={"content": text, "with_pieces": True}).json()
    assert [t["id"] for t in llama["tokens"]] == want


@pytest.mark.parametrize("n", [0, 1, JSON_SLICE, JSON_SLICE + 1, 2 * JSON_SLICE + 3])
def test_json_in_slices_is_json(n: int) -> None:
    value = {"ids": list(range(n)), "pieces": [{"t": f"é\"{i}", "b": [i, None]} for i in range(n)],
             "nested": {"deep": [list(range(3))] * n, "x": 1.5, "none": None, "ok": True}}
    assert json.loads(json_in_slices(value)) == value


def test_tokenize_gptj(client: httpx.Client) -> None:
    body = client.post("/tokenize", json={"text": "Hello world", "tokenizer": "gpt-j"}).json()
    assert body["tokens"] == [15496, 995]
    back = client.post("/detokenize", json={"tokens": body["tokens"], "tokenizer": "gpt-j"}).json()
    assert back == {"text": "Hello world", "content": "Hello world"}


# ---- info, metrics, schema ---------------------------------------------------------------------


def test_health_info_presets(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == bundled_model.name
    info = client.get("/api/info").json()
    assert info["name"] == bundled_model.name
    assert info["context_length"] == bundled_model.context_length == 8192
    assert info["parallel"] == 4
    assert set(info["defaults"]) >= {"temperature", "top_p", "max_new_tokens"}
    from gptj.kernels import available_variants

    assert info["kernels"] in available_variants()  # the instruction-set build in use (GPTJ_ISA)
    presets = client.get("/api/presets").json()
    assert presets["presets"] and all(p["name"] for p in presets["presets"])


def test_metrics(client: httpx.Client) -> None:
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE gptj_generated_tokens_total counter" in r.text
    before = metric(client, "gptj_generated_tokens_total")
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert metric(client, "gptj_generated_tokens_total") >= before + 3
    assert metric(client, "gptj_batch_size") == 0

def test_metrics_report_what_the_prefix_cache_holds(client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    assert metric(client, "gptj_prefix_cache_bytes") == bundled_model.engine.prefix_store.nbytes


def test_openapi_lists_endpoints(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/complete", "/completion",
                 "/tokenize", "/detokenize", "/health", "/api/info", "/api/presets", "/metrics"):
        assert path in paths, path


# ---- bad input ---------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
OK = {"prompt": "Hi", "max_tokens": 1}
BAD = [
    # (id, path, request kwargs, status, param, words the message must contain)
    ("empty prompt", "/v1/completions", {"json": {"prompt": ""}}, 400, "prompt", ["prompt", "empty"]),
    ("non-UTF-8 body", "/v1/completions", {"content": b'{"prompt": "\xff\xfe"}', "headers": JSON}, 400, "body",
     ["body", "UTF-8"]),
    ("invalid JSON", "/v1/completions", {"content": b'{"prompt": ', "headers": JSON}, 400, "body", ["body", "JSON"]),
    ("temperature 6", "/v1/completions", {"json": {**OK, "temperature": 6}}, 400, "temperature",
     ["temperature", "5"]),
    ("top_p 0", "/v1/completions", {"json": {**OK, "top_p": 0}}, 400, "top_p", ["top_p", "0"]),
    ("top_p 1.5", "/v1/completions", {"json": {**OK, "top_p": 1.5}}, 400, "top_p", ["top_p", "1"]),
    ("max_tokens over the window", "/v1/completions", {"json": {**OK, "max_tokens": 100_000}}, 400, "max_tokens",
     ["max_tokens", "8192"]),
    ("prompt over the window", "/v1/completions", {"json": {"prompt": "hi " * 9000, "max_tokens": 1}}, 400,
     "prompt", ["prompt", "8192"]),
    ("body over 1 MB", "/v1/completions",
     {"content": b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}', "headers": JSON}, 413, "body",
     ["body", str(MAX_BODY_BYTES)]),
    ("chunked body over 1 MB", "/v1/completions",  # no Content-Length: the bytes themselves are counted
     {"content": [b'{"prompt": "', b"a" * MAX_BODY_BYTES, b'"}'], "headers": JSON}, 413, "body",
     ["body", str(MAX_BODY_BYTES)]),
    ("model not a string", "/v1/completions", {"json": {**OK, "model": 17}}, 400, "model", ["model", "string"]),
    ("n too large", "/v1/completions", {"json": {**OK, "n": MAX_N + 1}}, 400, "n", ["n", str(MAX_N)]),
    ("token id too large", "/v1/completions", {"json": {"prompt": [1, 49152], "max_tokens": 1}}, 400, "prompt",
     ["prompt", "49152", "49151"]),
    ("negative token id", "/v1/completions", {"json": {"prompt": [-1], "max_tokens": 1}}, 400, "prompt",
     ["prompt", "-1", "49151"]),
    ("logprobs 21", "/v1/completions", {"json": {**OK, "logprobs": 21}}, 400, "logprobs", ["logprobs", "20"]),
    ("no messages", "/v1/chat/completions", {"json": {"messages": []}}, 400, "messages", ["messages", "1"]),
    ("bad role", "/v1/chat/completions", {"json": {"messages": [{"role": "robot", "content": "hi"}]}}, 400,
     "messages.0.role", ["role", "user", "assistant"]),
    ("chat max_tokens over the window", "/v1/chat/completions",
     {"json": {"messages": QUESTION, "max_tokens": 100_000}}, 400, "max_tokens", ["max_tokens", "8192"]),
    ("empty context", "/complete", {"json": {"context": ""}}, 400, "context", ["context", "empty"]),
    ("temp 3", "/complete", {"json": {"context": "Hi", "temp": 3, "length": 1}}, 400, "temp", ["temp", "2"]),
    ("hosted top_p 0", "/completion", {"json": {"context": "Hi", "top_p": 0}}, 400, "top_p", ["top_p", "0"]),
    ("tokenize without text", "/tokenize", {"json": {}}, 400, "text", ["text"]),
    ("unknown tokenizer", "/tokenize", {"json": {"text": "a", "tokenizer": "nope"}}, 400, "tokenizer",
     ["tokenizer", "nope"]),
    ("detokenize bad id", "/detokenize", {"json": {"tokens": [49152]}}, 400, "tokens", ["tokens", "49151"]),
]


@pytest.mark.parametrize(("path", "kwargs", "status", "param", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(client: httpx.Client, path: str, kwargs: dict, status: int, param: str, words: list[str]) -> None:
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["code"] == status
    for word in words:
        assert word in error["message"], (word, error["message"])


def test_unknown_route_is_a_json_error(client: httpx.Client) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404
    assert "error" in r.json()


def test_serves_after_bad_input(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["text"]


# ---- cancellation ------------------------------------------------------------------------------


def wait_until_stopped(engine, start: int, limit: int) -> None:  # noqa: ANN001
    """The engine goes idle and its token count stops growing, well short of `limit` new tokens."""
    deadline = time.monotonic() + 20
    while engine.batch_size or engine.queue_depth:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    stopped_at = engine.stats["generated_tokens"]
    time.sleep(1.0)
    assert engine.stats["generated_tokens"] == stopped_at
    assert stopped_at - start < limit


def test_disconnect_cancels_streaming_generation(url: str, client: httpx.Client, bundled_model) -> None:  # noqa: ANN001
    engine = bundled_model.engine
    body = {"prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
    start = engine.stats["generated_tokens"]
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
                if chunks == 2:
                    break
        assert engine.batch_size == 1  # still generating while we listen
    # The connection is closed: the generation must stop, not run on to 2000 tokens.
    wait_until_stopped(engine, start, 2000)
    assert metric(client, "gptj_batch_size") == 0


def test_disconnect_cancels_plain_generation(url: str, bundled_model) -> None:  # noqa: ANN001
    engine = bundled_model.engine
    body = json.dumps({"prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True}).encode()
    start = engine.stats["generated_tokens"]
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while engine.stats["generated_tokens"] < start + 3:  # it is generating
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.02)
    # The client hung up before any response: the generation must stop.
    wait_until_stopped(engine, start, 2000)


# ---- API key and binding -----------------------------------------------------------------------


def test_api_key(bundled_model) -> None:  # noqa: ANN001
    with running(create_app(bundled_model, api_key="k")) as base, httpx.Client(base_url=base, timeout=60) as c:
        body = {"prompt": "Hi", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200, r.text
        assert c.get("/health").status_code == 200  # stays open for health checks
        assert c.post("/tokenize", json={"text": "a"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0).models.list()
        assert [m.id for m in models] == [bundled_model.name]


def test_check_bind() -> None:
    with pytest.raises(SystemExit) as exc:
        check_bind("0.0.0.0", None, False)
    assert "API key" in str(exc.value) or "api-key" in str(exc.value)
    with pytest.raises(SystemExit):
        check_bind("192.168.1.10", "", False)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None, False)
    check_bind("0.0.0.0", None, True)
    check_bind("0.0.0.0", "secret", False)


def test_one_temperature_limit_on_every_surface(bundled_model) -> None:  # noqa: ANN001
    """Python, the CLI and every HTTP API take temperatures up to the same limit (5)."""
    import pytest

    from gptj.cli.main import build_parser
    from gptj.errors import InvalidRequest
    from gptj.runtime.sampling import MAX_TEMPERATURE

    assert MAX_TEMPERATURE == 5
    with pytest.raises(InvalidRequest, match="temperature"):
        bundled_model.generate("Hi", temperature=5.5, max_new_tokens=1)
    assert build_parser().parse_args(["generate", "Hi", "--temperature", "4"]).temperature == 4
    with running(create_app(bundled_model)) as base:
        for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "temperature": 4}),
                           ("/api/generate", {"model": "x", "prompt": "Hi", "stream": False,
                                              "options": {"temperature": 4, "num_predict": 1}}),
                           ("/api/v1/generate", {"prompt": "Hi", "max_length": 1, "temperature": 4})):
            r = httpx.post(base + path, json=body, timeout=120)
            assert r.status_code == 200, (path, r.text)
        r = httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 5.5}, timeout=60)
        assert r.status_code == 400 and "temperature" in r.text
