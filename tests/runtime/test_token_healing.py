"""Token healing on the bundled model (gptj.runtime.healing): a prompt that ends inside what would
be one token ("\\n" before an indent, a trailing space) is continued as the model would have
written it; the text still continues the prompt exactly, a seed still gives the same text, and
speculative decoding and the prefix cache change nothing."""

from __future__ import annotations

import pytest

import gptj
from gptj.chat import ChatSession, PlayScript
from gptj.presets import apply_preset
from gptj.runtime import healing

# The code preset's example: SmolLM2 writes a newline with the next line's indent ("\n   " +
# " if"), so a prompt that ends in "\n" ends on the lone "\n" token, which its training text has
# only before a line at column 0.
CODE = "# Python 3\n# Return True if n is a prime number, else False.\ndef is_prime(n):\n"


def reads_right(model: gptj.Model, prompt: str, c: gptj.Completion) -> None:
    """The prompt's tokens (less the healed one) and the tokens generated spell prompt + text:
    nothing of the prompt is said again or lost."""
    ids = model.tokenizer.encode(prompt)
    assert c.prompt_tokens == len(ids)
    kept = ids[:-1] if c.healed else ids
    assert model.tokenizer.decode(kept + c.tokens) == prompt + c.text
    if c.healed:
        assert c.healed == model.tokenizer.decode(ids[-1:])
        assert model.tokenizer.decode(c.tokens[:1]).startswith(c.healed)
        assert c.token_infos[0].healed == c.healed and not any(t.healed for t in c.token_infos[1:])


@pytest.mark.parametrize("settings", [dict(seed=1), dict(temperature=0)], ids=["seed-1", "greedy"])
def test_the_code_preset_writes_indented_code(bundled_model: gptj.Model, settings: dict) -> None:
    healed = bundled_model.generate(CODE, preset="code", **settings)
    assert healed.text.startswith("    if n <= 1:\n        return False\n")  # the body, indented
    assert healed.healed == "\n"
    assert all(line.startswith("    ") for line in healed.text.splitlines() if line.strip())
    compile(CODE + healed.text, "is_prime.py", "exec")  # valid Python
    assert healed.finish_reason in ("stop", "length")
    # Without healing the model starts at column 0: the body is not inside the function.
    unhealed = bundled_model.generate(CODE, preset="code", token_healing=False, **settings)
    assert unhealed.healed == "" and unhealed.text.startswith("if n <= 1:")
    with pytest.raises(SyntaxError):
        compile(CODE + unhealed.text, "is_prime.py", "exec")
    # a seed gives the same text
    assert bundled_model.generate(CODE, preset="code", **settings).text == healed.text


def test_a_trailing_space_is_like_none(bundled_model: gptj.Model) -> None:
    """The old GPT-J advice, "no trailing spaces in the prompt", is not needed any more."""
    settings = dict(temperature=0, max_new_tokens=16)
    spaced = bundled_model.generate("The capital of France is ", **settings)
    plain = bundled_model.generate("The capital of France is", **settings)
    assert plain.text.startswith(" Paris")
    assert spaced.text == plain.text[1:] and spaced.healed == " "
    assert spaced.tokens == plain.tokens  # the same tokens: " Paris" begins with the prompt's space
    reads_right(bundled_model, "The capital of France is ", spaced)
    unhealed = bundled_model.generate("The capital of France is ", token_healing=False, **settings)
    assert not unhealed.text.startswith("Paris")  # the lone " " token: the model goes elsewhere


@pytest.mark.parametrize("prompt", [
    "She opened the door.",  # healed: the first token may be "." or one that begins with it
    "1. Apples\n2.",
    "Dear John,\n",
    "Q: What is 2+2?\nA:",
    "Once upon a time",  # a word: never healed
])  # fmt: skip
def test_a_prompt_that_ends_on_a_token_boundary_gives_the_same_text(bundled_model: gptj.Model, prompt: str) -> None:
    """Where the model's best first token is the prompt's own last one, healing changes nothing:
    that token goes back onto the prompt, unreported, and decoding goes on as without healing."""
    settings = dict(temperature=0, max_new_tokens=16, logprobs=2)
    on = bundled_model.generate(prompt, **settings)
    off = bundled_model.generate(prompt, token_healing=False, **settings)
    assert on.text == off.text and on.tokens == off.tokens and on.finish_reason == off.finish_reason
    assert on.prompt_tokens == off.prompt_tokens and on.completion_tokens == off.completion_tokens
    assert [(t.id, t.top_logprobs[0][0]) for t in on.token_infos] == [(t.id, t.top_logprobs[0][0]) for t in off.token_infos]
    assert on.healed == ""
    ids = bundled_model.tokenizer.encode(prompt)
    was_healed = healing.plan(bundled_model.tokenizer, ids, gptj.SamplingParams()) is not None
    assert was_healed == (prompt != "Once upon a time")


def test_max_new_tokens_counts_real_tokens(bundled_model: gptj.Model) -> None:
    """The prompt's own last token, chosen again, is not a generated token: one token asked for
    is one token of text."""
    on = bundled_model.generate("She opened the door.", temperature=0, max_new_tokens=1)
    off = bundled_model.generate("She opened the door.", temperature=0, max_new_tokens=1, token_healing=False)
    assert on.tokens == off.tokens and len(on.tokens) == 1 and on.text == off.text != ""


@pytest.mark.parametrize("prompt", [CODE, "The capital of France is ", "Dear John,\n"])
def test_the_stream_never_says_the_healed_text_again(bundled_model: gptj.Model, prompt: str) -> None:
    handle = bundled_model.submit(prompt, temperature=0, max_new_tokens=24, logprobs=3)
    pieces, infos = [], []
    for event in handle:
        pieces.append(event.text)
        infos += event.tokens
    c = handle.completion
    assert "".join(pieces) == c.text
    assert [t.id for t in infos[: len(c.tokens)]] == c.tokens
    reads_right(bundled_model, prompt, c)
    if c.healed:  # the healed step's alternatives all begin with the removed text
        first = c.token_infos[0]
        assert first.top_logprobs and all(
            bundled_model.tokenizer.token_bytes(i).startswith(c.healed.encode()) for i, _ in first.top_logprobs)
        assert first.logprob is not None and first.logprob <= 0
    # the Python API's stream is the same text
    assert "".join(bundled_model.stream(prompt, temperature=0, max_new_tokens=24)) == c.text


def test_sampled_and_seeded(bundled_model: gptj.Model) -> None:
    """Sampling with a seed: the same text each time, and it reads right."""
    for seed in (1, 2, 3):
        a = bundled_model.generate("The capital of France is ", temperature=1.0, seed=seed, max_new_tokens=12)
        b = bundled_model.generate("The capital of France is ", temperature=1.0, seed=seed, max_new_tokens=12)
        assert a.text == b.text and a.tokens == b.tokens
        reads_right(bundled_model, "The capital of France is ", a)


def test_the_healed_prompt_is_what_the_prefix_cache_keeps(bundled_model: gptj.Model) -> None:
    first = bundled_model.generate(CODE, temperature=0, max_new_tokens=12)
    again = bundled_model.generate(CODE, temperature=0, max_new_tokens=12)
    assert again.text == first.text and again.healed == "\n"
    assert again.cached_prompt_tokens >= first.prompt_tokens - 2  # all of the healed prompt but its last token


def test_logit_bias_that_bans_every_healed_token_keeps_the_prompt(bundled_model: gptj.Model) -> None:
    tok = bundled_model.tokenizer
    ids = tok.encode("The url is http:")
    plan = healing.plan(tok, ids, gptj.SamplingParams())
    assert plan is not None
    ban = {int(i): -100 for i in plan.allowed}
    c = bundled_model.generate("The url is http:", temperature=0, max_new_tokens=4, logit_bias=ban)
    assert c.healed == "" and not any(t in ban for t in c.tokens)
    reads_right(bundled_model, "The url is http:", c)


def test_chat_prompts_are_not_healed(bundled_model: gptj.Model) -> None:
    """A chat template's generation prompt ends in "\n", a play script's in ":": both are where
    the model's reply begins in its training, as they stand."""
    session = ChatSession(bundled_model)
    assert session.template is not None
    prompt, settings, _ = session.prepare([{"role": "user", "content": "Hi"}], {"max_new_tokens": 8})
    assert prompt.endswith("assistant\n") and settings["token_healing"] is False
    prompt, settings, _ = ChatSession(bundled_model, PlayScript()).prepare([{"role": "user", "content": "Hi"}], {})
    assert prompt.endswith(":") and settings["token_healing"] is False
    prompt, settings = apply_preset("chat", "Hi", {})
    assert prompt.endswith(":") and settings["token_healing"] is False


def test_speculative_decoding_gives_the_same_text(int8_model: gptj.Model) -> None:
    """The first token's mask applies to the fused pass over drafted tokens as to a one-token
    step: the same text with drafts and without. The prompt's tail recurs in it, so the very
    first step is a drafted one."""
    prompt = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
    engine = int8_model.engine
    results = {}
    for mode in ("none", "ngram"):
        engine.speculative = mode
        try:
            for settings in (dict(temperature=0), dict(temperature=1.0, seed=5)):
                results[mode, settings["temperature"]] = int8_model.generate(
                    prompt, max_new_tokens=24, ignore_eos=True, logprobs=2, **settings)
        finally:
            engine.speculative = "ngram"
    for temperature in (0, 1.0):
        off, on = results["none", temperature], results["ngram", temperature]
        assert on.text == off.text and on.tokens == off.tokens and on.healed == off.healed == "\n"
        assert [(t.id, t.logprob, t.top_logprobs) for t in on.token_infos] == [
            (t.id, t.logprob, t.top_logprobs) for t in off.token_infos]
        assert off.drafted_tokens == 0 and on.drafted_tokens > 0
        reads_right(int8_model, prompt, on)
    assert results["ngram", 0].text.startswith("    return a - b")
