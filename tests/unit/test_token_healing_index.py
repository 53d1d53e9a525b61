"""Token healing without a model: the prefix index over a vocabulary, the rule that decides when
a prompt's end is healed (gptj.runtime.healing.plan), and the decoder's skipped bytes."""

from __future__ import annotations

import pytest
import torch

from gptj.runtime.healing import PrefixIndex, _after, plan, prefix_index
from gptj.runtime.sampling import SamplingParams
from gptj.tokenizer import StreamDecoder, Tokenizer, load_tokenizer


@pytest.fixture(scope="module", params=["gpt-j", "smollm2"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return load_tokenizer(request.param)


def brute_force(tok: Tokenizer, prefix: bytes) -> set[int]:
    return {i for i in range(tok.vocab_size)
            if not tok.is_special(i) and tok.token_bytes(i) and tok.token_bytes(i).startswith(prefix)}


def test_after_bounds_every_string_with_the_prefix() -> None:
    assert _after(b"ab") == b"ac"
    assert _after(b"a\xff") == b"b" and _after(b"a\xff\xff") == b"b"
    assert _after(b"\xff") is None and _after(b"\xff\xff") is None
    for prefix in (b"ab", b"a\xff", b"\x00"):
        end = _after(prefix)
        assert all(prefix + tail < end for tail in (b"", b"\x00", b"\xff\xff\xff", b"zz"))


@pytest.mark.parametrize("prefix", [b" ", b"\n", b":", b"):", b".", b" the", b"\xe2\x80", b"\xff", b"zzzzzz"])
def test_index_finds_exactly_the_tokens_that_begin_with_the_bytes(tok: Tokenizer, prefix: bytes) -> None:
    index = prefix_index(tok)
    found = index.starting_with(prefix).tolist()
    assert len(found) == len(set(found))
    assert set(found) == brute_force(tok, prefix)
    assert set(index.longer(prefix).tolist()) == {i for i in found if tok.token_bytes(i) != prefix}


def test_index_leaves_out_special_tokens_and_is_built_once() -> None:
    tok = Tokenizer.gptj()
    index = prefix_index(tok)
    assert prefix_index(tok) is index  # cached per tokenizer
    specials = set(tok.special_tokens.values())
    assert not specials & set(index.starting_with(b"<").tolist())  # not <|endoftext|>, <|extratoken_1|>
    assert len(index) == tok.vocab_size - len(specials)


def test_a_small_vocabulary() -> None:
    """The index over a made-up vocabulary: runs, equal keys, and bytes past 0x7f."""

    class Vocab:
        pieces = [b"a", b"ab", b"abc", b"b", b"", b"a\xff", b"a\xff\x00", b"<s>", b"\xff", b"ac"]
        vocab_size = len(pieces)

        def is_special(self, i: int) -> bool:
            return i == 7

        def token_bytes(self, i: int) -> bytes:
            return self.pieces[i]

    index = PrefixIndex(Vocab())  # type: ignore[arg-type]
    assert sorted(index.starting_with(b"a").tolist()) == [0, 1, 2, 5, 6, 9]
    assert sorted(index.longer(b"a").tolist()) == [1, 2, 5, 6, 9]
    assert sorted(index.starting_with(b"a\xff").tolist()) == [5, 6]
    assert index.starting_with(b"\xff").tolist() == [8]
    assert index.starting_with(b"<").tolist() == []  # special: not in the index
    assert index.starting_with(b"x").tolist() == []


# ---- the rule -------------------------------------------------------------------------------


def smollm2() -> Tokenizer:
    return load_tokenizer("smollm2")


@pytest.mark.parametrize(("text", "healed"), [
    ("def is_prime(n):\n", "\n"),  # "\n" + the indent is one token ("\n    ")
    ("The capital of France is ", " "),
    ("The url is http:", ":"),
    ("She said.", "."),
    ("Hello world", None),  # a word: maybe whole, healing could change it
    ("in 1984", None),  # a digit
    ("x", None),  # one token: nothing left to condition on
    ("Hi 😀", None),
])  # fmt: skip
def test_which_prompt_ends_are_healed(text: str, healed: str | None) -> None:
    tok = smollm2()
    plan_ = plan(tok, tok.encode(text), SamplingParams())
    assert (plan_.text if plan_ else None) == healed
    if plan_ is not None:
        ids = tok.encode(text)
        assert plan_.token == ids[-1] and plan_.prefix == tok.token_bytes(ids[-1])
        allowed = plan_.allowed.tolist()
        assert allowed[0] == ids[-1] and len(allowed) > 1
        assert all(tok.token_bytes(i).startswith(plan_.prefix) for i in allowed)


def test_settings_and_tokens_that_turn_healing_off() -> None:
    tok = smollm2()
    ids = tok.encode("def is_prime(n):\n")
    assert plan(tok, ids, SamplingParams()) is not None
    assert plan(tok, ids, SamplingParams(token_healing=False)) is None
    assert plan(tok, ids, SamplingParams(max_new_tokens=0)) is None
    assert plan(tok, ids, SamplingParams(prompt_logprobs=0)) is None  # the prompt is scored as sent
    im_end = tok.special_tokens["<|im_end|>"]
    assert plan(tok, [*ids, im_end], SamplingParams()) is None  # a special token
    assert plan(tok, [*ids[:-1], tok.vocab_size + 5], SamplingParams()) is None  # outside the tokenizer
    half = tok.encode("😀")
    assert len(half) > 1 and plan(tok, [*ids, half[0]], SamplingParams()) is None  # part of a character


def test_token_healing_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="token_healing"):
        SamplingParams(token_healing="no").validate()  # type: ignore[arg-type]


def test_the_mask_keeps_only_the_allowed_logits() -> None:
    tok = smollm2()
    h = plan(tok, tok.encode("The capital of France is "), SamplingParams())
    assert h is not None
    logits = torch.randn(tok.vocab_size)
    masked = h.mask(logits.clone())
    keep = torch.zeros(tok.vocab_size, dtype=torch.bool)
    keep[h.allowed] = True
    assert torch.equal(masked[keep], logits[keep])
    assert bool((masked[~keep] == float("-inf")).all())
    paris = tok.encode(" Paris")[0]
    assert h.allows(paris) and h.allows(h.token) and not h.allows(tok.encode("Paris")[0])


def test_stream_decoder_skips_the_healed_bytes() -> None:
    tok = smollm2()
    (indent,) = tok.encode("\n    ")
    stream = StreamDecoder(tok)
    assert stream.push(indent, skip=1) == "    "
    assert stream.push(tok.encode("return")[0]) == "return"
