"""Constrained JSON output without a model (gptj.runtime.constraints): schemas checked and
refused by name, the bitmask applied to logits, and a matcher walked over our two vocabularies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptj.errors import InvalidRequest
from gptj.runtime import constraints
from gptj.runtime.constraints import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, apply_bitmask, check_schema
from gptj.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module", params=["gpt-j", "smollm2"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return load_tokenizer(request.param)


def test_apply_bitmask_keeps_exactly_the_set_bits() -> None:
    allowed = [0, 5, 31, 32, 63, 64, 99]
    bitmask = torch.zeros(4, dtype=torch.int32)  # 128 ids
    for i in allowed:
        bitmask[i // 32] |= torch.tensor(1 << (i % 32)).to(torch.int32)  # bit 31 makes the word negative
    logits = torch.arange(110, dtype=torch.float32)  # rows past the tokenizer's 100 ids (GPT-J pads its 50400)
    apply_bitmask(logits, bitmask, 100)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == allowed
    assert logits[allowed].tolist() == [float(i) for i in allowed]  # the allowed ones untouched


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(("schema", "words"), [
    ("object", ["a JSON schema (a JSON object; a dict in Python), or True"]),
    ([{"type": "object"}], ["a JSON schema"]),
    ({"type": "object", "default": {1, 2}}, ["must be JSON"]),
    ({"type": "number", "maximum": float("nan")}, ["must be JSON"]),
    ({"enum": ["x" * MAX_SCHEMA_BYTES]}, ["bytes of JSON", "64 KiB"]),
    (nested(MAX_SCHEMA_DEPTH + 1), ["more than 64 deep", "limit"]),
], ids=["a string", "a list", "a set inside", "NaN inside", "over 64 KiB", "too deep"])
def test_schemas_that_are_not_checked_out_name_the_field(schema: object, words: list[str]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_schema(schema)
    assert caught.value.field == "json_schema" and str(caught.value).startswith("json_schema: ")
    for word in words:
        assert word in str(caught.value)


def test_a_deep_schema_within_the_limit_and_true_are_fine() -> None:
    assert check_schema(nested(MAX_SCHEMA_DEPTH))[0] == nested(MAX_SCHEMA_DEPTH)
    assert check_schema(True) == ({"type": "object"}, '{"type":"object"}')
    # the cache key is canonical: key order does not matter
    assert check_schema({"b": 1, "type": "object"})[1] == check_schema({"type": "object", "b": 1})[1]


def test_a_schema_far_deeper_than_the_stack_is_refused_not_a_crash() -> None:
    with pytest.raises(InvalidRequest, match="deep"):
        check_schema(nested(100_000))


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "objectx"}, "objectx"),
    ({"properties": {"a": {"$ref": "#/nope"}}}, "/nope"),
    ({"type": "string", "pattern": "(unclosed"}, "regex"),
    ({"enum": []}, "nsatisfiable"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"not": {"type": "string"}}, "not"),  # refused, not ignored: the output could not be promised to validate
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, '"x-guidance": {"coerce_one_of": true}'),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "no JSON value satisfies it"),  # compiles, allows nothing
], ids=["bad type", "bad ref", "bad pattern", "empty enum", "min over max", "not", "oneOf", "only itself"])
def test_schemas_the_library_refuses_name_the_field(schema: dict, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        constraints.start(load_tokenizer("smollm2"), schema)
    assert caught.value.field == "json_schema" and "cannot be used: " in str(caught.value) and words in str(caught.value)


def test_a_schema_may_set_llguidance_options_but_not_the_separators() -> None:
    tok = load_tokenizer("smollm2")
    either = {"oneOf": [{"type": "integer"}, {"type": "boolean"}], "x-guidance": {"coerce_one_of": True,
                                                                                "item_separator": ",\n"}}
    assert walk(tok, either, "true").is_complete()
    c = walk(tok, {"type": "array", "x-guidance": {"item_separator": ",\n"}}, "[1")
    assert not any(b"\n" in tok.token_bytes(int(i)) for i in c.allowed())  # ", " still, not ",\n"
    assert walk(tok, {"type": "array", "x-guidance": {"item_separator": ",\n"}}, "[1, 2]").is_complete()


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "tags"], "additionalProperties": False}


def walk(tok: Tokenizer, schema: object, text: str) -> constraints.Constraint:
    """Feeds `text`'s tokens one by one; each must be allowed by the mask before it."""
    c = constraints.start(tok, schema)
    special = sorted(set(tok.special_tokens.values()) - set(tok.end_ids))
    for token in tok.encode(text):
        logits = torch.zeros(tok.vocab_size + 48)  # a model may have more rows than the tokenizer has ids
        c.mask(logits)
        assert c.allows(token) and logits[token] == 0, (token, tok.token_bytes(token))
        assert torch.isinf(logits[tok.vocab_size:]).all()
        # special ids (GPT-J's padding, chat markers) never; the end-of-text ones: see below
        assert torch.isinf(logits[special]).all()
        assert c.advance(token) and c.error is None
    return c


def test_a_document_walks_through_and_ends_the_grammar(tok: Tokenizer) -> None:
    c = walk(tok, PERSON, json.dumps({"name": "Ada", "tags": ["math", "poetry \u00e9\u4e2d"]}, ensure_ascii=False))
    assert c.is_complete()
    logits = torch.zeros(tok.vocab_size)
    c.mask(logits)  # complete: only the end-of-text tokens are left
    assert torch.isfinite(logits).nonzero().flatten().tolist() == tok.end_ids


def test_the_json_is_compact_and_free_of_extra_keys(tok: Tokenizer) -> None:
    c = walk(tok, PERSON, '{"name": "Ada"')
    logits = torch.zeros(tok.vocab_size)
    c.mask(logits)
    allowed = [tok.token_bytes(i) for i in torch.isfinite(logits).nonzero().flatten().tolist()]
    after = b', "tags": ["'  # the one way on: the required key, with ", " and ": ", no other space
    assert allowed and all(b[: len(after)] == after[: len(b)] for b in allowed), allowed
    c = walk(tok, True, '{"a": 1')
    logits = torch.zeros(tok.vocab_size)
    c.mask(logits)
    assert not any(tok.token_bytes(i)[:1] in (b" ", b"\n") for i in torch.isfinite(logits).nonzero().flatten().tolist())
    assert not c.is_complete() and walk(tok, True, '{"a": 1}').is_complete()


def test_one_space_may_come_first(tok: Tokenizer) -> None:
    """After a prompt that ends in ":" a model's next token is " {": one space is allowed before the JSON."""
    assert walk(tok, PERSON, ' {"name": "Ada", "tags": []}').is_complete()
    c = walk(tok, PERSON, " ")
    c.mask(torch.zeros(tok.vocab_size))
    assert c.allows(tok.encode('{"')[0]) and not c.allows(tok.encode(" ")[0])


def test_the_end_of_text_token_waits_for_complete_json(tok: Tokenizer) -> None:
    c = walk(tok, {"type": "integer"}, "12")  # a number could go on: not complete, but it may end here
    logits = torch.zeros(tok.vocab_size)
    c.mask(logits)
    assert not c.is_complete() and all(c.allows(i) for i in tok.end_ids) and c.allows(tok.encode("3")[0])
    c = walk(tok, {"type": "integer"}, "-")
    c.mask(torch.zeros(tok.vocab_size))
    assert not any(c.allows(i) for i in tok.end_ids)


def test_compiled_schemas_are_cached_and_matchers_are_independent() -> None:
    tok = load_tokenizer("smollm2")
    a, b = constraints.start(tok, PERSON), constraints.start(tok, dict(reversed(PERSON.items())))
    assert constraints.grammars(tok)._compiled.keys() >= {check_schema(PERSON)[1]}
    for token in tok.encode('{"name": "x"'):
        a.mask(torch.zeros(tok.vocab_size))
        assert a.advance(token)
    a.mask(torch.zeros(tok.vocab_size))
    b.mask(torch.zeros(tok.vocab_size))
    first = tok.encode('{"')[0]
    assert b.allows(first) and not a.allows(first)


def test_importing_gptj_runtime_does_not_import_the_grammar_library() -> None:
    code = "import gptj.runtime.engine, sys; print('llguidance' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
