"""JSON output over HTTP (gptj.runtime.constraints): OpenAI's response_format through the official
`openai` client, vLLM's guided_json, llama.cpp's json_schema, Ollama's format; a bad or oversized
schema is a 400 naming the field that sent it, never a 500."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

NAME = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Make up a person: name, age and city. Answer in JSON."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
HUGE = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(700)}}


def test_json_object_through_the_openai_client(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=NAME, messages=ASK, response_format={"type": "json_object"},
                                    max_tokens=200, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


def test_json_schema_sampled_and_streamed(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=NAME, messages=ASK, response_format=FORMAT, max_tokens=100, n=3, seed=1,
                                    temperature=1.0)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    # the legacy completions endpoint: response_format is ours there (vLLM's too), not in OpenAI's client
    chunks = list(oai.completions.create(model=NAME, prompt="A person as JSON: ", extra_body={"response_format": FORMAT},
                                         max_tokens=100, stream=True, seed=2, temperature=1.0))
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in chunks if c.choices)), PERSON)


def test_other_servers_fields_for_json_work_too(url: str) -> None:
    for extra in ({"guided_json": PERSON}, {"guided_json": json.dumps(PERSON)}, {"json_schema": PERSON}):
        body = {"messages": ASK, "max_tokens": 100, "temperature": 0, **extra}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), PERSON)
    r = httpx.post(f"{url}/completion", json={"prompt": "A person as JSON: ", "n_predict": 100, "json_schema": PERSON},
                   timeout=120)  # llama.cpp's own route
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["content"]), PERSON)


@pytest.mark.parametrize("api", ["local", "upstream"])
def test_ollama_format_json_and_schema(request: pytest.FixtureRequest, api: str) -> None:
    client = ollama.Client(host=request.getfixturevalue(f"{api}_url"), timeout=120)
    reply = client.chat(model="x", messages=ASK, format="json", options={"temperature": 0, "num_predict": 200})
    assert reply.done_reason == "stop" and isinstance(json.loads(reply.message.content), dict)
    reply = client.generate(model="x", prompt="A person as JSON:", format=PERSON, options={"num_predict": 100})
    jsonschema.validate(json.loads(reply.response), PERSON)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format.json_schema", ["objectx"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}}},
     "response_format.json_schema", ["a JSON schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HUGE}}},
     "response_format.json_schema", ["bytes of JSON", "limit of 64 KiB"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["required"]),
    ({"guided_json": {"properties": {"a": {"$ref": "#/nope"}}}}, "guided_json", ["nope"]),
    ({"guided_json": "{not json"}, "guided_json", ["JSON text"]),
    ({"json_schema": HUGE}, "json_schema", ["64 KiB"]),
    ({"json_schema": PERSON, "response_format": {"type": "json_object"}}, "json_schema", ["only one"]),
    ({"guided_regex": "[a-z]+"}, "guided_regex", ["not supported", "response_format"]),
], ids=["invalid", "not an object", "oversized", "no json_schema", "bad ref", "guided_json not JSON",
        "llama.cpp's oversized", "two at once", "a regex"])
def test_a_bad_schema_is_a_400_naming_the_field(url: str, body: dict, param: str, words: list[str]) -> None:
    for path, base in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "Hi"})):
        r = httpx.post(f"{url}{path}", json={**base, "max_tokens": 5, **body}, timeout=120)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: "), error
        for word in words:
            assert word in error["message"], (word, error)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_bad_schema_through_the_openai_client(oai: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=NAME, messages=ASK, response_format=bad, max_tokens=5)  # type: ignore[arg-type]
    assert caught.value.status_code == 400 and caught.value.body["param"] == "response_format.json_schema"
