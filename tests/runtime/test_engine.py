"""Generation behaviour users rely on: samplers, seeds, stops, limits, batching, prefix reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gptj
from gptj.loading.random_checkpoint import make_random_checkpoint
from gptj.runtime import runner
from gptj.runtime.sampling import InvalidRequest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "gptj", "tiny", "bin", n_positions=128)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> gptj.Model:
    return gptj.load(str(tiny_dir), dtype=torch.float32, max_batch=3)


PROMPT = "The quick brown fox"


# ---- sampling through the engine ----------------------------------------------------------------


def test_greedy_equivalents(tiny: gptj.Model) -> None:
    greedy = tiny.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert len(greedy.tokens) == 12
    near_zero = tiny.generate(PROMPT, max_new_tokens=12, temperature=1e-6, top_k=0, top_p=1.0, seed=3, ignore_eos=True)
    top_k_1 = tiny.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_k=1, seed=4, ignore_eos=True)
    assert near_zero.tokens == greedy.tokens
    assert top_k_1.tokens == greedy.tokens


def test_seed_reproduces_and_differs(tiny: gptj.Model) -> None:
    settings = dict(max_new_tokens=20, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True)
    a = tiny.generate(PROMPT, seed=1, **settings)
    b = tiny.generate(PROMPT, seed=1, **settings)
    c = tiny.generate(PROMPT, seed=2, **settings)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_repetition_penalty_changes_repeats(tiny: gptj.Model) -> None:
    plain = tiny.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True)
    penalised = tiny.generate(PROMPT, max_new_tokens=30, temperature=0, repetition_penalty=5.0, ignore_eos=True)
    prompt_ids = set(tiny.tokenizer.encode(PROMPT))
    repeats = lambda toks: len(toks) - len(set(toks) - prompt_ids)  # noqa: E731
    assert repeats(penalised.tokens) <= repeats(plain.tokens)
    assert penalised.tokens != plain.tokens


def test_gptj_padding_ids_are_never_sampled(tiny_dir: Path) -> None:
    model = gptj.load(str(tiny_dir), dtype=torch.float32)
    with torch.no_grad():  # make the 143 padding rows by far the most likely
        model.module.lm_head.bias[50257:] = 50.0
    out = model.generate(PROMPT, max_new_tokens=30, temperature=1.0, top_k=0, top_p=1.0, seed=0, ignore_eos=True)
    assert len(out.tokens) == 30
    assert max(out.tokens) < 50257
    assert model.logits(model.tokenizer.encode(PROMPT)).shape[-1] == 50400


def test_logprobs_on_request(tiny: gptj.Model) -> None:
    out = tiny.generate(PROMPT, max_new_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    assert len(out.token_infos) == 5
    for info in out.token_infos:
        assert info.logprob is not None and info.logprob <= 0
        assert len(info.top_logprobs) == 3
        assert info.top_logprobs[0][0] == info.id  # greedy picks the top-1
    assert tiny.generate(PROMPT, max_new_tokens=2, temperature=0).token_infos[0].logprob is None


def test_invalid_settings_name_the_field(tiny: gptj.Model) -> None:
    for field, value in [("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("repetition_penalty", 0)]:
        with pytest.raises(InvalidRequest) as err:
            tiny.generate(PROMPT, **{field: value})
        assert err.value.field == field and field in str(err.value)
    with pytest.raises(InvalidRequest, match="unknown setting"):
        tiny.generate(PROMPT, temprature=0.5)


def test_bad_token_id_prompts_name_the_field(tiny: gptj.Model) -> None:
    rows = tiny.config.vocab_size  # 50400: past the tokenizer's 50257, still an embedding row
    for ids, says in [([1, rows], f"token id {rows} is outside 0..{rows - 1}"), ([-1], "token id -1 is outside"),
                      ([], "must not be empty"), ([1, 2.5], "must be integers"), ([True], "must be integers")]:
        with pytest.raises(InvalidRequest) as err:
            tiny.generate(ids, max_new_tokens=2)
        assert err.value.field == "prompt" and says in str(err.value)
    assert len(tiny.generate([1, rows - 1], max_new_tokens=2, ignore_eos=True).tokens) == 2
    assert len(tiny.generate(torch.tensor([1, 2]), max_new_tokens=2, ignore_eos=True).tokens) == 2


# ---- stops and limits ----------------------------------------------------------------------------


def test_stop_sequence_in_generation(tiny: gptj.Model) -> None:
    full = tiny.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True)
    assert len(full.text) > 12
    stop = full.text[5:12]  # a stop in the middle of the text, most likely spanning tokens
    cut = tiny.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(tiny.stream(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    assert streamed == cut.text


def test_eos_stops_generation(tiny_dir: Path) -> None:
    model = gptj.load(str(tiny_dir), dtype=torch.float32)
    with torch.no_grad():
        model.module.lm_head.bias[50256] = 100.0  # <|endoftext|>
    out = model.generate(PROMPT, max_new_tokens=10, temperature=0)
    assert out.finish_reason == "stop" and out.tokens == [] and out.text == ""


def test_max_new_tokens_and_context_window(tiny: gptj.Model) -> None:
    out = tiny.generate(PROMPT, max_new_tokens=7, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.tokens) == 7
    long_prompt = "word " * 200  # 200+ tokens against a 128-token window
    with pytest.raises(InvalidRequest) as err:
        tiny.generate(long_prompt, max_new_tokens=10)
    assert err.value.field == "prompt" and "128" in str(err.value)
    out = tiny.generate(long_prompt, max_new_tokens=10, temperature=0, truncate_prompt=True, ignore_eos=True)
    n_prompt = len(tiny.tokenizer.encode(long_prompt))
    assert out.prompt_tokens == 118 and out.truncated_prompt_tokens == n_prompt - 118
    assert len(out.tokens) == 10
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        tiny.generate(PROMPT, max_new_tokens=500)


def test_stream_pieces_join_to_the_generated_text(tiny: gptj.Model) -> None:
    settings = dict(max_new_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    pieces = list(tiny.stream(PROMPT, **settings))
    full = tiny.generate(PROMPT, **settings)
    assert "".join(pieces) == full.text
    assert len(pieces) > 1


# ---- the engine: batching, prefix reuse, cancellation --------------------------------------------


def test_concurrent_requests_equal_their_results_alone(tiny: gptj.Model) -> None:
    prompts = ["Once upon a time", "def fibonacci(n):", "The capital of France is the city of"]
    alone = [tiny.generate(p, max_new_tokens=15, temperature=0, ignore_eos=True).tokens for p in prompts]
    handles = [tiny.submit(p, max_new_tokens=15, temperature=0, ignore_eos=True) for p in prompts]
    together = [h.result().tokens for h in handles]
    assert together == alone


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_requests_batched_equal_their_results_alone(mode: str) -> None:
    # Batched rows take other kernel loops than one row (AMX tiles for int8 here); the bundled
    # model's 30 layers would turn any rounding difference into other tokens within a few dozen
    model = gptj.load(quantize=mode, max_batch=4)
    prompts = ["Once upon a time", "def fibonacci(n):", "The capital of France is", "My favourite soup"]
    settings = dict(max_new_tokens=40, temperature=0, ignore_eos=True)
    alone = [model.generate(p, **settings).tokens for p in prompts]
    handles = [model.submit(p, **settings) for p in prompts]
    assert [h.result().tokens for h in handles] == alone


def test_prefix_cache_reuses_the_common_prefix_and_changes_nothing(tiny_dir: Path) -> None:
    model = gptj.load(str(tiny_dir), dtype=torch.float32, max_batch=2)
    turn1 = "You: hello there\nGPT-J: hi, how are you?\nYou: fine\nGPT-J:"
    first = model.generate(turn1, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert first.cached_prompt_tokens == 0
    turn2 = turn1 + first.text + "\nYou: tell me more\nGPT-J:"
    second = model.generate(turn2, max_new_tokens=8, temperature=0, ignore_eos=True)
    n1 = len(model.tokenizer.encode(turn1))
    assert second.cached_prompt_tokens >= n1
    fresh = gptj.load(str(tiny_dir), dtype=torch.float32, max_batch=1).generate(
        turn2, max_new_tokens=8, temperature=0, ignore_eos=True
    )
    assert fresh.cached_prompt_tokens == 0
    assert second.tokens == fresh.tokens


def test_cancel_stops_a_request(tiny: gptj.Model) -> None:
    handle = tiny.submit(PROMPT, max_new_tokens=100, temperature=0, ignore_eos=True)
    events = iter(handle)
    next(events)
    handle.cancel()
    result = handle.result()
    assert result.finish_reason == "cancelled"
    assert len(result.tokens) < 100


def test_prefix_store_keeps_a_displaced_conversation(tiny_dir: Path) -> None:
    """One cache row, two conversations taking turns. A row goes to the store when another
    request takes it, once its prompt has shown it recurs (here: from the second turn on); a
    later turn then finds its conversation there, and greedy results equal those without any
    cache."""
    cached = gptj.load(str(tiny_dir), dtype=torch.float32, max_batch=1)
    plain = gptj.load(str(tiny_dir), dtype=torch.float32, max_batch=1, prefix_cache=False)
    a = "You: " + "tell me about the sea and the sky " * 6 + "\nGPT-J:"
    b = "You: " + "what is the weather like in the hills " * 6 + "\nGPT-J:"
    settings = dict(max_new_tokens=6, temperature=0, ignore_eos=True)
    for prompt in (a, b, a + " more", b + " more"):  # the first turns leave only fingerprints
        cached.generate(prompt, **settings)
    assert cached.engine.prefix_store.hits == 0 and len(cached.engine.prefix_store) == 1
    again = cached.generate(a + " more and more", **settings)  # a's second turn, from the store
    assert again.cached_prompt_tokens >= len(cached.tokenizer.encode(a + " more")) - 1
    assert cached.engine.prefix_store.hits == 1
    assert again.tokens == plain.generate(a + " more and more", **settings).tokens
    assert plain.generate(a + " more and more", **settings).cached_prompt_tokens == 0


def test_prompts_that_never_recur_leave_the_store_empty(tiny_dir: Path) -> None:
    # A server under one-off prompts (the load test) must not grow toward the store's bound.
    model = gptj.load(str(tiny_dir), dtype=torch.float32, max_batch=1)
    for topic in ("the sea", "a dragon", "the moon", "a robot", "an old house"):
        model.generate(f"Write a long story about {topic}. " * 8, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert model.engine.prefix_store.nbytes == 0
    assert len(model.engine.prefix_store.fingerprints) > 0


def test_prefix_store_is_bounded_and_evicts_least_recently_used() -> None:
    from gptj.runtime.prefix_cache import PrefixStore

    def kv(n: int) -> torch.Tensor:
        return torch.zeros(2, 1, n, 4)  # 2 layers, 1 head, n tokens, 4 dims: 32 bytes a token each for k and v

    store = PrefixStore(max_bytes=64 * 10 * 2)
    store.put([1] * 10, kv(10), kv(10))
    store.put([2] * 10, kv(10), kv(10))
    assert len(store) == 2 and store.nbytes == 2 * 640
    store.get(store.best([1] * 10)[0])  # 1 is now the most recently used
    store.put([3] * 10, kv(10), kv(10))  # no room: 2 goes
    assert store.best([2] * 10) == (None, 0)
    assert store.best([1] * 12)[1] == 10 and store.best([3, 3, 4])[1] == 2
    store.put([1] * 10 + [5], kv(11), kv(11))  # extends entry 1: replaces it
    assert store.best([1] * 10)[0] == (None, tuple([1] * 10 + [5]))  # (the shared scope, its tokens)
    assert store.nbytes <= store.max_bytes
    # another scope sees none of it
    assert store.best([1] * 10, scope="tenant") == (None, 0)
    store.put([1] * 10, kv(10), kv(10), scope="tenant")
    assert store.best([1] * 10, scope="tenant")[0] == ("tenant", tuple([1] * 10))


@pytest.mark.parametrize("mode", ["int8", "none"])
def test_same_seed_same_text_with_and_without_a_cached_prefix(mode: str) -> None:
    # The playground's "regenerate": the second run finds its prompt in the cache. Its first
    # logits must come from the same kind of step as the first run's (with int8 activations a
    # prefill's and a decode step's logits differ enough to change a draw).
    model = gptj.load(quantize=mode)
    try:
        prompt = "The old lighthouse keeper climbed the stairs and"
        settings = dict(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
        first = model.generate(prompt, **settings)
        again = model.generate(prompt, **settings)
        assert again.cached_prompt_tokens == first.prompt_tokens - 1  # all but the last token reused
        assert again.text == first.text
    finally:
        model.engine.shutdown(grace=0)


def test_the_first_token_rides_in_the_prompts_last_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the fused step serves (every token gets a one-token step's bits), the prompt's last
    token goes in with its last chunk: the first token costs one pass over the weights, not a
    chunk's pass and then a decode step's. Its logits are those of the separate step, which a
    cached prefix still takes."""
    model = gptj.load(quantize="int8", speculative="none")
    passes: list[int] = []  # tokens per pass over the weights

    def counting(real):  # noqa: ANN001, ANN202
        def step(model_, ids, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            passes.append(ids.numel())
            return real(model_, ids, *args, **kwargs)

        return step

    monkeypatch.setattr(runner, "forward", counting(runner.forward))
    monkeypatch.setattr(runner, "forward_ragged", counting(runner.forward_ragged))
    try:
        prompt = "The old lighthouse keeper climbed the stairs and"
        settings = dict(max_new_tokens=3, temperature=0.8, seed=11, logprobs=4, ignore_eos=True)
        first = model.generate(prompt, **settings)
        assert passes == [first.prompt_tokens, 1, 1]  # the whole prompt, then a step per token
        passes.clear()
        again = model.generate(prompt, **settings)
        assert again.cached_prompt_tokens == first.prompt_tokens - 1 and passes == [1, 1, 1]
        assert again.token_infos == first.token_infos  # the same logprobs, to the last bit
    finally:
        model.engine.shutdown(grace=0)


@pytest.mark.parametrize("settings", [dict(top_k=0, top_p=1.0), dict(top_k=329400, top_p=1.0, min_p=1e-6),
                                      dict(top_k=0, top_p=0.9), dict(top_k=0, top_p=5e-324, temperature=0.4)])
def test_settings_at_the_edge_of_float_take_the_most_likely_token(tiny: gptj.Model, settings: dict) -> None:
    # 2.2e-309 (a schemathesis find): logits / temperature overflow, no distribution is left
    settings = {"temperature": 2.225073858507203e-309, **settings}  # top_p 5e-324 is 0 in float32
    out = tiny.generate(PROMPT, max_new_tokens=4, ignore_eos=True, **settings)
    greedy = tiny.generate(PROMPT, max_new_tokens=4, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length" and out.tokens == greedy.tokens
