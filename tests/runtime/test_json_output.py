"""Constrained JSON output on the bundled model (gptj.runtime.constraints): sampled at temperature
1, every completion parses and validates against its schema; logprobs are the constrained ones;
a constrained request neither speculates nor heals, and the grammar ends it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
import torch

import gptj
from gptj.runtime import constraints

NAME = {"type": "string", "pattern": "^[A-Za-z][A-Za-z ]{0,19}$"}
# Strings bounded by their patterns, the integer by its range, the array by maxItems: the longest
# valid document is 155 bytes (with the space allowed before it), and a token is at least a byte,
# so every completion ends by 160 tokens with the grammar complete.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": NAME,
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": NAME,
        "likes_tea": {"type": "boolean"},
        "pets": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,12}$"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "likes_tea", "pets"],
    "additionalProperties": False,
}
MAX_TOKENS = 160
PROMPT = ("<|im_start|>user\nMake up a person: their name, age, city, whether they like tea, and their pets. "
          "Answer in JSON.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def batched(int8_model: gptj.Model) -> Iterator[gptj.Model]:
    """The int8 bundled weights behind an engine with 8 rows and room for 100 queued requests."""
    model = gptj.Model(int8_model.module, int8_model.tokenizer, int8_model.info, max_batch=8, context_length=1024)
    model.engine.max_queue = 128
    yield model
    model.engine.shutdown(grace=0)


def test_100_sampled_completions_all_parse_and_validate(batched: gptj.Model) -> None:
    handles = [batched.submit(PROMPT, json_schema=SCHEMA, temperature=1.0, top_p=1.0, top_k=0, seed=seed,
                              max_new_tokens=MAX_TOKENS) for seed in range(100)]
    results = [h.result() for h in handles]
    for seed, c in enumerate(results):
        assert c.finish_reason == "stop", (seed, c.finish_reason, c.error, c.text)
        jsonschema.validate(json.loads(c.text), SCHEMA)
        # the grammar ended it at the closing brace: no step for an end-of-text token
        assert len(c.token_infos) == len(c.tokens)
    assert len({c.text for c in results}) > 90  # sampled, not one answer 100 times


def test_logprobs_are_those_of_the_constrained_distribution(int8_model: gptj.Model) -> None:
    c = int8_model.generate(PROMPT, json_schema=SCHEMA, temperature=0, logprobs=5, max_new_tokens=MAX_TOKENS)
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.text), SCHEMA)
    walk = constraints.start(int8_model.tokenizer, SCHEMA)
    forced = 0
    for info in c.token_infos:
        walk.mask(torch.zeros(int8_model.config.vocab_size))
        assert info.top_logprobs[0][0] == info.id  # greedy: the likeliest allowed token
        assert all(walk.allows(i) for i, _ in info.top_logprobs), info  # every alternative is allowed
        if len(info.top_logprobs) == 1:  # one token allowed (a key the schema fixes): certain
            assert info.logprob == 0.0
            forced += 1
        assert walk.advance(info.id)
    assert forced >= 3  # the keys after the first: '"age', '"city', ... are forced pieces
    assert walk.is_complete()


def test_a_constrained_request_neither_heals_nor_speculates(int8_model: gptj.Model) -> None:
    # a trailing space would be healed, and text that repeats the prompt is what drafts are made of
    prompt = 'Copy it: {"name": "Ann", "age": 5, "city": "Rome", "likes_tea": true, "pets": []}\nCopy: '
    free = int8_model.generate(prompt, temperature=0, max_new_tokens=40)
    assert free.healed == " " and free.drafted_tokens > 0  # (what the constraint turns off)
    c = int8_model.generate(prompt, json_schema=SCHEMA, temperature=0, max_new_tokens=MAX_TOKENS)
    assert c.healed == "" and c.drafted_tokens == 0 and c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.text), SCHEMA)


def test_the_grammar_ends_the_request_even_with_ignore_eos(int8_model: gptj.Model) -> None:
    c = int8_model.generate(PROMPT, json_schema=True, temperature=0, ignore_eos=True, max_new_tokens=300)
    assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict)


def test_logit_bias_that_bans_what_the_grammar_allows_loses(int8_model: gptj.Model) -> None:
    tok = int8_model.tokenizer
    opening = {i: -100 for i in range(tok.vocab_size)  # every token the JSON (after an optional space) may begin with
               if tok.token_bytes(i).startswith((b"{", b" {")) or tok.token_bytes(i) == b" "}
    c = int8_model.generate(PROMPT, json_schema=SCHEMA, temperature=0, logit_bias=opening, max_new_tokens=MAX_TOKENS)
    assert c.finish_reason == "stop" and c.tokens[0] in opening
    jsonschema.validate(json.loads(c.text), SCHEMA)


def test_streamed_pieces_make_the_json(int8_model: gptj.Model) -> None:
    text = "".join(int8_model.stream(PROMPT, json_schema=SCHEMA, temperature=1.0, seed=3, max_new_tokens=MAX_TOKENS))
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_bad_schema_is_a_value_error_naming_the_setting(int8_model: gptj.Model) -> None:
    for schema, words in (({"type": "objectx"}, "objectx"), ({"enum": ["x" * 70_000]}, "64 KiB"), ("{}", "a JSON schema")):
        with pytest.raises(ValueError, match="^json_schema: ") as caught:
            int8_model.generate("Hi", json_schema=schema, max_new_tokens=2)
        assert words in str(caught.value)
    assert int8_model.engine.in_flight == 0  # refused before it was queued
