"""Token healing over HTTP: on by default, `token_healing: false` turns it off, the logprobs'
tokens add up to the text (a healed first token is shown past the prompt's end), echo gives the
prompt as sent, and the EleutherAI endpoints take the field too."""

from __future__ import annotations

import json

import httpx

CODE = "# Python 3\n# Return True if n is a prime number, else False.\ndef is_prime(n):\n"


def complete(url: str, **body: object) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"max_tokens": 12, "temperature": 0, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_completions_heal_by_default_and_say_so_in_logprobs(local_url: str) -> None:
    healed = complete(local_url, prompt=CODE, logprobs=3)
    assert healed["text"].startswith("    if n <= 1:")
    lp = healed["logprobs"]
    assert "".join(lp["tokens"]) == healed["text"]  # the first token's "\n" is the prompt's, not shown again
    assert lp["tokens"][0] == "   " and lp["text_offset"][0] == 0  # the token "\n   ", past its "\n"
    assert all(not k.startswith("\n") for k in lp["top_logprobs"][0])  # its alternatives, past the "\n" too
    unhealed = complete(local_url, prompt=CODE, logprobs=3, token_healing=False)
    assert unhealed["text"].startswith("if n <= 1:")
    assert "".join(unhealed["logprobs"]["tokens"]) == unhealed["text"]
    echoed = complete(local_url, prompt=CODE, echo=True)
    assert echoed["text"] == CODE + healed["text"]


def test_a_streamed_completion_is_the_same_text(local_url: str) -> None:
    with httpx.stream("POST", f"{local_url}/v1/completions", timeout=300,
                      json={"prompt": "The capital of France is ", "max_tokens": 8, "temperature": 0, "stream": True,
                            "logprobs": 1}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    tokens = "".join("".join(c["choices"][0]["logprobs"]["tokens"]) for c in chunks
                     if c["choices"] and c["choices"][0].get("logprobs"))
    assert text.startswith("Paris") and tokens == text
    assert text == complete(local_url, prompt="The capital of France is", max_tokens=8)["text"][1:]


def test_bad_value_and_the_eleutherai_endpoints(local_url: str) -> None:
    r = httpx.post(f"{local_url}/v1/completions", json={"prompt": CODE, "token_healing": "maybe"}, timeout=60)
    assert r.status_code == 400 and "token_healing" in r.text
    body = {"context": CODE, "temp": 0, "length": 8}
    on = httpx.post(f"{local_url}/complete", json=body, timeout=300).json()["completion"]
    off = httpx.post(f"{local_url}/complete", json={**body, "token_healing": False}, timeout=300).json()["completion"]
    assert on.startswith("    if") and off.startswith("if")
    hosted = httpx.post(f"{local_url}/completion", timeout=300,
                        json={"context": CODE, "temp": 0, "responseLength": 8, "tokenHealing": False}).json()
    assert hosted[0]["generated_text"] == CODE + off
