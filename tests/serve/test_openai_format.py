"""OpenAI's request formats on `gptj serve` (issue #15): every valid request is accepted, and what
the server does not do is a 400 that names the field, never a 200 that quietly ignores it.

Through the official `openai` client against a real server on the bundled SmolLM2, and with
httpx for the exact bodies lm-evaluation-harness's `local-completions` sends. Each test asserts
what the client relies on."""

from __future__ import annotations

import json
from operator import itemgetter
from pathlib import Path

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from servers import running

import gptj
from gptj.errors import InvalidRequest
from gptj.serve import create_app, create_upstream_app

PROMPT = "The capital of France is"
OTHER = "Once upon a time"
# the bundled model's own name: what the requests send unless a test is about names (any is answered)
NAME = "SmolLM2-135M-Instruct"


def refused(call, param: str, *words: str) -> None:  # noqa: ANN001
    """`call()` raises the client's BadRequestError: a 400 naming `param`, its message the words."""
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    error = exc.value.body
    assert exc.value.status_code == 400 and error["param"] == param, error
    assert error["message"].startswith(f"{param}: "), error
    for word in words:
        assert word in error["message"], (word, error["message"])


def greedy_text(oai: openai.OpenAI, prompt: str | list[int], max_tokens: int = 4) -> str:
    return oai.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


# ---- chat: content parts, the developer role, no tools ------------------------------------------


def test_text_parts_and_the_developer_role_are_accepted(oai: openai.OpenAI) -> None:
    parts = oai.chat.completions.create(model=NAME, max_tokens=8, temperature=0, messages=[
        {"role": "developer", "content": "You answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]},
    ])
    plain = oai.chat.completions.create(model=NAME, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital\nof France?"},
    ])
    # developer is a system message; text parts are joined with newlines (as vLLM joins them)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
], ids=["image", "audio", "file"])
def test_media_parts_are_refused_naming_the_part(oai: openai.OpenAI, part: dict) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    refused(lambda: oai.chat.completions.create(model=NAME, messages=messages, max_tokens=1),
            "messages.0.content.1", part["type"], "only text")


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
ASKED = [{"role": "user", "content": "Weather in Paris?"}]
CALLED = {"role": "assistant", "content": None,
          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [TOOL]}, "tools"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "weather", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"messages": [*ASKED, CALLED]}, "messages.1.tool_calls"),
    ({"messages": [*ASKED, {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}, "messages.1.role"),
    ({"messages": [*ASKED, {"role": "function", "name": "weather", "content": "sunny"}]}, "messages.1.role"),
], ids=["tools", "tools+tool_choice", "tool_choice", "functions", "function_call", "tool_calls", "tool role",
        "function role"])
def test_tools_are_refused_clearly(oai: openai.OpenAI, kwargs: dict, param: str) -> None:
    kwargs = {"messages": ASKED, **kwargs}
    refused(lambda: oai.chat.completions.create(model=NAME, max_tokens=1, **kwargs), param, "function calling is not supported")


def test_tool_fields_that_ask_for_nothing_are_accepted(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=NAME, messages=ASKED, max_tokens=1, tools=[], tool_choice="none",
                                    parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "length"


# ---- the model name ----------------------------------------------------------------------------


def test_any_model_name_is_answered_by_the_model(oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    r = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=1, temperature=0)
    assert r.model == bundled_model.name and r.choices[0].text
    chat = oai.chat.completions.create(model="gpt-4o-mini", messages=ASKED, max_tokens=1)
    assert chat.model == bundled_model.name
    stream = oai.completions.create(model="davinci-002", prompt=PROMPT, max_tokens=2, stream=True)
    assert {c.model for c in stream} == {bundled_model.name}


def test_models_list_the_context_length(client: httpx.Client, oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    (entry,) = client.get("/v1/models").json()["data"]
    assert entry["id"] == bundled_model.name and entry["max_model_len"] == bundled_model.context_length
    assert oai.models.list().data[0].model_extra["max_model_len"] == bundled_model.context_length


def test_served_model_names(bundled_model: gptj.Model) -> None:
    app = create_app(bundled_model, served_model_names=["gpt-3.5-turbo-instruct", "mine"])
    with running(app) as base:
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in oai.models.list()] == ["gpt-3.5-turbo-instruct", "mine", bundled_model.name]
        assert all(m.model_extra["max_model_len"] == bundled_model.context_length for m in oai.models.list())
        # a name of ours comes back as asked; any other is answered by the first
        for asked, named in (("mine", "mine"), (bundled_model.name, bundled_model.name),
                             ("text-davinci-003", "gpt-3.5-turbo-instruct")):
            assert oai.completions.create(model=asked, prompt=PROMPT, max_tokens=1).model == named
        assert oai.chat.completions.create(model="mine", messages=ASKED, max_tokens=1).model == "mine"


def test_served_model_name_flag_is_repeatable_and_takes_vllm_lists() -> None:
    from gptj.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--served-model-name", "c"])
    assert args.served_model_name == ["a", "b", "c"]
    assert build_parser().parse_args(["serve"]).served_model_name is None


def test_a_folder_model_is_named_by_its_folder(tmp_path: Path) -> None:
    from gptj.loading.random_checkpoint import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path / "my-gpt-j", "tiny", "safetensors")
    model = gptj.load(f"{folder}/")
    try:
        assert model.name == "my-gpt-j" and model.info.path == str(folder)
        with TestClient(create_app(model), base_url="http://localhost") as c:
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["my-gpt-j"]
    finally:
        model.engine.shutdown(grace=0)


# ---- prompts: strings, token ids, batches of either ---------------------------------------------


def test_a_batch_of_strings_gives_prompt_times_n_choices(oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    r = oai.completions.create(model=NAME, prompt=[PROMPT, OTHER], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt_i * n + j, as OpenAI answers
    singles = [greedy_text(oai, PROMPT), greedy_text(oai, OTHER)]
    assert [c.text for c in r.choices] == [singles[0], singles[0], singles[1], singles[1]]
    tok = bundled_model.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT)) + len(tok.encode(OTHER))
    assert r.usage.completion_tokens == 4 * 4


def test_a_batch_of_token_id_lists(oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    ids = [bundled_model.tokenizer.encode(PROMPT), bundled_model.tokenizer.encode(OTHER)]
    r = oai.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [greedy_text(oai, PROMPT), greedy_text(oai, OTHER)]
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_a_batch_streams_each_choice_under_its_index(oai: openai.OpenAI) -> None:
    texts = {0: "", 1: ""}
    for chunk in oai.completions.create(model=NAME, prompt=[PROMPT, OTHER], max_tokens=4, temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {0: greedy_text(oai, PROMPT), 1: greedy_text(oai, OTHER)}


# ---- lm-evaluation-harness's local-completions, request for request ------------------------------


def lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm_eval/models/openai_completions.py, LocalCompletionsAPI.parse_logprobs, as it reads us."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=True):
        assert ctxlen > 0, "Context length must be greater than 0"
        logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = True
        for tok, top in zip(tokens_logprobs, top_logprobs, strict=False):
            if tok != max(top.values()):
                is_greedy = False
                break
        res.append((logprobs, is_greedy))
    return res


PAIRS = [(PROMPT, " Paris"), (PROMPT, " Berlin, the capital of Germany"), (OTHER, " there was")]


def pairs_as_ids(model: gptj.Model) -> tuple[list[list[int]], list[int]]:
    tok = model.tokenizer
    inputs, ctxlens = [], []
    for context, continuation in PAIRS:
        ctx = tok.encode(context)
        inputs.append(ctx + tok.encode(continuation))
        ctxlens.append(len(ctx))
    return inputs, ctxlens


def reference_logprobs(model: gptj.Model, ids: list[int]) -> tuple[list[float], list[bool]]:
    """Each token's logprob given those before it (from the first's successor on), and whether
    it is the most likely one there: the model run directly, with the engine's banned rows."""
    logits = model.logits(ids)
    if model.engine.banned.numel():
        logits[:, model.engine.banned] = float("-inf")
    logprobs = logits.log_softmax(-1)
    targets = torch.tensor(ids[1:])
    chosen = logprobs[:-1].gather(1, targets[:, None])[:, 0]
    return chosen.tolist(), (logprobs[:-1].argmax(-1) == targets).tolist()


def test_lm_eval_loglikelihood_request(client: httpx.Client, bundled_model: gptj.Model) -> None:
    inputs, ctxlens = pairs_as_ids(bundled_model)
    # LocalCompletionsAPI._create_payload(generate=False), a batch of three
    payload = {"model": NAME, "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == 200, r.text
    out = r.json()
    results = lm_eval_parse_logprobs(out, ctxlens)
    for ids, ctxlen, (logprob, is_greedy) in zip(inputs, ctxlens, results, strict=True):
        chosen, argmax = reference_logprobs(bundled_model, ids)
        assert logprob == pytest.approx(sum(chosen[ctxlen - 1:]), abs=1e-3)
        assert is_greedy == all(argmax[ctxlen - 1:])
    assert [g for _, g in results] == [True, False, all(reference_logprobs(bundled_model, inputs[2])[1][ctxlens[2] - 1:])]
    for choice, ids in zip(sorted(out["choices"], key=itemgetter("index")), inputs, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["tokens"]) == len(ids) + 1
        assert lp["token_ids"][: len(ids)] == ids


def test_lm_eval_loglikelihood_with_max_tokens_0(client: httpx.Client, bundled_model: gptj.Model) -> None:
    inputs, _ = pairs_as_ids(bundled_model)
    r = client.post("/v1/completions", json={"model": NAME, "prompt": inputs, "temperature": 0, "max_tokens": 0,
                                             "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 0
    for choice, ids in zip(sorted(out["choices"], key=itemgetter("index")), inputs, strict=True):
        lp = choice["logprobs"]
        assert choice["text"] == bundled_model.tokenizer.decode(ids) == "".join(lp["tokens"])
        assert lp["token_ids"] == ids and len(lp["token_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first
        chosen, argmax = reference_logprobs(bundled_model, ids)
        assert lp["token_logprobs"][1:] == pytest.approx(chosen, abs=1e-3)
        for token, logprob, top, best in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], argmax,
                                             strict=True):
            assert len(top) == 1 and (logprob == max(top.values())) == best
            assert best <= (token in top)
        assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]


def test_lm_eval_loglikelihood_with_strings(client: httpx.Client, bundled_model: gptj.Model) -> None:
    # tokenized_requests=False, batch_size > 1: a list of strings
    inputs, ctxlens = pairs_as_ids(bundled_model)
    texts = [context + continuation for context, continuation in PAIRS]
    out = client.post("/v1/completions", json={"model": NAME, "prompt": texts, "temperature": 0, "max_tokens": 1,
                                               "logprobs": 1, "seed": 1234, "echo": True}).json()
    by_ids = client.post("/v1/completions", json={"model": NAME, "prompt": inputs, "temperature": 0, "max_tokens": 1,
                                                  "logprobs": 1, "seed": 1234, "echo": True}).json()
    got, expected = lm_eval_parse_logprobs(out, ctxlens), lm_eval_parse_logprobs(by_ids, ctxlens)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert [g for _, g in got] == [g for _, g in expected]


def test_lm_eval_generate_until_request(client: httpx.Client, oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    ids = [bundled_model.tokenizer.encode(PROMPT), bundled_model.tokenizer.encode(OTHER)]
    # LocalCompletionsAPI._create_payload(generate=True)
    payload = {"prompt": ids, "model": NAME, "max_tokens": 6, "temperature": 0, "stop": ["\n\n"], "seed": 1234}
    out = client.post("/v1/completions", json=payload).json()
    tmp = [None] * len(out["choices"])  # parse_generations
    for choice in out["choices"]:
        tmp[choice["index"]] = choice["text"]
    assert tmp == [greedy_text(oai, PROMPT, 6).split("\n\n")[0], greedy_text(oai, OTHER, 6).split("\n\n")[0]]


# ---- logit_bias ----------------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    tok = bundled_model.tokenizer
    (paris,) = tok.encode(" Paris")
    (london,) = tok.encode(" London")
    assert greedy_text(oai, PROMPT, 1) == " Paris"
    banned = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(paris): -100})
    assert banned.choices[0].text not in ("", " Paris")
    forced = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(london): 100})
    assert forced.choices[0].text == " London"
    sampled = oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, temperature=1, n=8, seed=3,
                                     logit_bias={str(paris): -100})
    assert " Paris" not in [c.text for c in sampled.choices]  # p(Paris) is 0.77 without the ban
    first = oai.chat.completions.create(model=NAME, messages=ASKED, max_tokens=1, temperature=0, logprobs=True)
    (token,) = tok.encode(first.choices[0].logprobs.content[0].token)
    other = oai.chat.completions.create(model=NAME, messages=ASKED, max_tokens=1, temperature=0, logprobs=True,
                                        logit_bias={str(token): -100})
    assert other.choices[0].logprobs.content[0].token != first.choices[0].logprobs.content[0].token


def test_logit_bias_in_the_python_api(bundled_model: gptj.Model) -> None:
    (paris,) = bundled_model.tokenizer.encode(" Paris")
    assert bundled_model.generate(PROMPT, max_new_tokens=1, temperature=0).tokens == [paris]
    assert bundled_model.generate(PROMPT, max_new_tokens=1, temperature=0, logit_bias={paris: -100}).tokens != [paris]
    for bad in ({bundled_model.config.vocab_size: 1.0}, {paris: 101.0}, {"7": 1.0}):
        with pytest.raises(InvalidRequest, match="logit_bias"):
            bundled_model.generate(PROMPT, max_new_tokens=1, logit_bias=bad)


# ---- streams: usage only when asked for ----------------------------------------------------------


def test_stream_usage_comes_last_and_only_when_asked(oai: openai.OpenAI, bundled_model: gptj.Model) -> None:
    chunks = list(oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == len(bundled_model.tokenizer.encode(PROMPT))
    assert all(c.choices and c.usage is None for c in chunks[:-1])
    plain = list(oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in plain)  # OpenAI sends none unless asked

    chat = list(oai.chat.completions.create(model=NAME, messages=ASKED, max_tokens=3, n=2, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 6
    assert all(c.choices and c.usage is None for c in chat[:-1])
    assert all(c.usage is None for c in oai.chat.completions.create(model=NAME, messages=ASKED, max_tokens=3, stream=True))


def test_max_completion_tokens(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=NAME, messages=ASKED, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


# ---- best_of -------------------------------------------------------------------------------------


def test_best_of_returns_the_likeliest_samples(oai: openai.OpenAI) -> None:
    base = {"model": NAME, "prompt": OTHER, "max_tokens": 5, "temperature": 1.0, "seed": 7, "extra_body": {"ignore_eos": True}}
    samples = sorted(oai.completions.create(n=3, logprobs=0, **base).choices, key=lambda c: c.index)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in samples]
    order = sorted(range(3), key=lambda i: means[i], reverse=True)
    assert len({c.text for c in samples}) == 3  # three different samples (seeds 7, 8, 9) to choose from
    one = oai.completions.create(n=1, best_of=3, **base)
    assert [c.text for c in one.choices] == [samples[order[0]].text]
    assert one.choices[0].logprobs is None and one.usage.completion_tokens == 15  # all three were generated
    two = oai.completions.create(n=2, best_of=3, logprobs=0, **base)
    assert [(c.index, c.text) for c in two.choices] == [(0, samples[order[0]].text), (1, samples[order[1]].text)]
    chat = oai.chat.completions.create(model=NAME, messages=ASKED, max_tokens=2, n=1, extra_body={"best_of": 2})
    assert len(chat.choices) == 1 and chat.usage.completion_tokens <= 4


def test_best_of_limits(oai: openai.OpenAI) -> None:
    refused(lambda: oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, n=3, best_of=2), "best_of", "n")
    refused(lambda: oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, best_of=2, stream=True),
            "best_of", "stream")
    same = list(oai.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, n=2, best_of=2, stream=True))
    assert {c.index for chunk in same for c in chunk.choices} == {0, 1}


# ---- known fields: done, harmless, or refused by name --------------------------------------------

REFUSED_FIELDS = [
    ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
    ("modalities", ["text", "audio"], "text"),
    ("prediction", {"type": "content", "content": "Paris"}, "predicted"),
    ("web_search_options", {}, "web search"),
    ("moderation", {"model": "omni-moderation-latest"}, "moderation"),
    ("store", True, "stored"),
    ("verbosity", "low", "medium"),
    ("guided_regex", "[a-z]+", "constrained"),
    ("grammar", "root ::= \"a\"", "constrained"),
    ("min_tokens", 4, "ignore_eos"),
    ("stream_options", {"include_usage": True}, "stream"),  # without stream: true, as OpenAI
    ("top_logprobs", 3, "logprobs"),  # without logprobs: true, as OpenAI
]


@pytest.mark.parametrize(("field", "value", "word"), REFUSED_FIELDS, ids=[f"{f} {json.dumps(v)[:20]}" for f, v, _ in REFUSED_FIELDS])
def test_unsupported_fields_are_refused_by_name(client: httpx.Client, field: str, value: object, word: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": ASKED, "max_tokens": 1, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ") and word in error["message"], error


def test_suffix_is_refused(oai: openai.OpenAI) -> None:
    refused(lambda: oai.completions.create(model=NAME, prompt=PROMPT, suffix=" and that is all.", max_tokens=1),
            "suffix", "not supported")
    assert oai.completions.create(model=NAME, prompt=PROMPT, suffix="", max_tokens=1).choices


ACCEPTED_FIELDS = {
    "user": "u-1", "safety_identifier": "s-1", "metadata": {"k": "v"}, "store": False, "service_tier": "flex",
    "parallel_tool_calls": True, "reasoning_effort": "low", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "30m"}, "response_format": {"type": "text"}, "modalities": ["text"],
    "verbosity": "medium", "audio": None, "tools": None, "stream_options": None,
    "some_vendor_field": {"anything": 1},  # unknown to everyone here: ignored, as OpenAI's SDKs expect
}


def test_harmless_fields_are_accepted(client: httpx.Client) -> None:
    for field, value in ACCEPTED_FIELDS.items():
        r = client.post("/v1/chat/completions", json={"messages": ASKED, "max_tokens": 1, field: value})
        assert r.status_code == 200, (field, r.text)
    r = client.post("/v1/chat/completions", json={"messages": ASKED, "max_tokens": 1, **ACCEPTED_FIELDS})
    assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "name": "ann", "content": "Hi"}],
                                                  "max_tokens": 1})
    assert r.status_code == 200, r.text


# ---- hostile input: a 4xx naming the field, never a 500 ------------------------------------------

JSON = {"content-type": "application/json"}
OK_CHAT = {"messages": ASKED, "max_tokens": 1}
HOSTILE = [
    # (id, path, body (a dict, or raw bytes), param)
    ("bias not an object", "/v1/completions", {"prompt": "x", "logit_bias": "ban"}, "logit_bias"),
    ("bias key not an id", "/v1/completions", {"prompt": "x", "logit_bias": {"Paris": -100}}, "logit_bias.Paris.[key]"),
    ("bias value a string", "/v1/completions", {"prompt": "x", "logit_bias": {"1": "a"}}, "logit_bias.1"),
    ("bias value huge", "/v1/completions", {"prompt": "x", "logit_bias": {"1": 1e308}}, "logit_bias.1"),
    ("bias value infinite", "/v1/completions", b'{"prompt": "x", "logit_bias": {"1": Infinity}}', "logit_bias.1"),
    ("bias id huge", "/v1/completions", {"prompt": "x", "logit_bias": {"9" * 40: 1}}, "logit_bias"),
    ("bias id negative", "/v1/completions", {"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
    ("bias id past the vocabulary", "/v1/chat/completions", {**OK_CHAT, "logit_bias": {"49152": 1}}, "logit_bias"),
    ("bias key a lone surrogate", "/v1/completions", b'{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("best_of huge", "/v1/completions", {"prompt": "x", "best_of": 10**30}, "best_of"),
    ("best_of a string", "/v1/completions", {"prompt": "x", "best_of": "three"}, "best_of"),
    ("prompt nested too deep", "/v1/completions", {"prompt": [[1, [2]]]}, "prompt"),
    ("prompt an empty id list", "/v1/completions", {"prompt": [[]]}, "prompt"),
    ("prompt mixed", "/v1/completions", {"prompt": ["a", [1]]}, "prompt"),
    ("prompt a number", "/v1/completions", {"prompt": 5}, "prompt"),
    ("prompt of booleans", "/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("empty prompt in a batch", "/v1/completions", {"prompt": ["a", ""], "max_tokens": 1}, "prompt.1"),
    ("bad id in a batch", "/v1/completions", {"prompt": [[1], [49152]], "max_tokens": 1}, "prompt.1"),
    ("long prompt in a batch", "/v1/completions", {"prompt": ["a", "hi " * 9000], "max_tokens": 1}, "prompt.1"),
    ("lone surrogate in a batch", "/v1/completions", b'{"prompt": ["ok", "\\ud800"]}', "prompt.1"),
    ("batch past the queue", "/v1/completions", {"prompt": ["a"] * 40, "n": 2, "max_tokens": 1}, "prompt"),
    ("500-deep prompt", "/v1/completions", b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", "prompt"),
    ("100000-deep prompt", "/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    ("content a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 12345}]}, "messages.0.content"),
    ("part text a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text"),
    ("part not an object", "/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]},
     "messages.0.content.0"),
    ("part of no known type", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "x"}]}]},
     "messages.0.content.0"),
    ("deep content", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}", "messages.0.content.0"),
    ("role a number", "/v1/chat/completions", {"messages": [{"role": 1, "content": "x"}]}, "messages.0.role"),
    ("tools a string", "/v1/chat/completions", {**OK_CHAT, "tools": "all"}, "tools"),
    ("stream_options a string", "/v1/chat/completions", {**OK_CHAT, "stream": True, "stream_options": "yes"},
     "stream_options"),
    ("include_usage not a bool", "/v1/chat/completions",
     {**OK_CHAT, "stream": True, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ("response_format type unknown", "/v1/chat/completions", {**OK_CHAT, "response_format": {"type": "xml"}},
     "response_format.type"),
    ("response_format a string", "/v1/chat/completions", {**OK_CHAT, "response_format": "json"}, "response_format"),
    ("model a number", "/v1/chat/completions", {**OK_CHAT, "model": 5}, "model"),
    ("max_completion_tokens huge", "/v1/chat/completions", {**OK_CHAT, "max_completion_tokens": 10**30},
     "max_completion_tokens"),
    ("max_tokens huge", "/v1/completions", {"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_4xx_naming_the_field(client: httpx.Client, path: str, body: dict | bytes, param: str) -> None:
    r = client.post(path, content=body, headers=JSON) if isinstance(body, bytes) else client.post(path, json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}: "), error
    assert client.get("/health").status_code == 200


# ---- in front of another server (--upstream) -----------------------------------------------------


def stand_in(model_ids: list[str]) -> FastAPI:
    """An OpenAI-compatible upstream that says which model it was asked for."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": i, "object": "model"} for i in model_ids]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        return {"model": body["model"], "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}

    return app


def test_upstream_with_one_model_answers_to_any_name() -> None:
    for ids, asked, sent in ((["acme/one-7b"], "gpt-3.5-turbo-instruct", "acme/one-7b"),
                             (["acme/one-7b"], "acme/one-7b", "acme/one-7b"),
                             (["a", "b"], "b", "b"),
                             (["a", "b"], "c", "c")):  # several models: the upstream judges the name
        app = create_upstream_app("http://stand-in/v1", transport=httpx.ASGITransport(app=stand_in(ids)))
        with TestClient(app, base_url="http://localhost") as c:
            r = c.post("/v1/completions", json={"model": asked, "prompt": "x"})
            assert r.status_code == 200 and r.json()["model"] == sent, (ids, asked, r.text)
