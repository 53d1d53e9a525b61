"""Speculative decoding (prompt lookup) changes the speed, never the text: greedy and seeded
sampling give the same tokens, logprobs and finish with it on and off, on the bundled Llama and
on a GPT-J, because a pass over drafted tokens gives each the bits of a one-token step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import gptj
from gptj import kernels
from gptj.loading.random_checkpoint import make_random_checkpoint
from gptj.runtime import runner

CODE = """def add(a, b):
    return a + b


def sub(a, b):
    return a - b

# The same two functions again, with type hints:
def add(a: int, b: int) -> int:
"""


@pytest.fixture(scope="module")
def gptj_int4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[gptj.Model]:
    path = Path(tmp_path_factory.mktemp("gptj")) / "tiny"
    make_random_checkpoint(path, dict(n_embd=128, n_head=4, n_layer=2, rotary_dim=16), "safetensors")
    model = gptj.load(str(path), quantize="int4")
    yield model
    model.engine.shutdown(grace=0)


def generate(model: gptj.Model, mode: str, prompt: str | list[int], **settings: object) -> gptj.Completion:
    model.engine.speculative = mode
    try:
        return model.generate(prompt, **settings)
    finally:
        model.engine.speculative = "ngram"


def same_output(a: gptj.Completion, b: gptj.Completion) -> None:
    assert a.tokens == b.tokens and a.text == b.text and a.finish_reason == b.finish_reason
    assert [(t.id, t.logprob, t.top_logprobs) for t in a.token_infos] == [
        (t.id, t.logprob, t.top_logprobs) for t in b.token_infos
    ]


@pytest.mark.parametrize("settings", [
    dict(temperature=0),
    dict(temperature=1.0, seed=3),
    dict(temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7),
], ids=["greedy", "sampled", "penalties"])  # fmt: skip
def test_same_tokens_with_and_without_drafts(int8_model: gptj.Model, settings: dict) -> None:
    assert runner.exact_multi_token(int8_model.module)
    off = generate(int8_model, "none", CODE, max_new_tokens=48, ignore_eos=True, logprobs=3, **settings)
    on = generate(int8_model, "ngram", CODE, max_new_tokens=48, ignore_eos=True, logprobs=3, **settings)
    same_output(on, off)
    assert off.drafted_tokens == 0
    assert on.drafted_tokens > 0 and on.accepted_tokens <= on.drafted_tokens
    if settings["temperature"] == 0:  # the greedy copy follows its prompt: drafts are kept
        assert on.accepted_tokens > 0


def test_drafts_that_run_past_a_stop_or_the_length_limit(int8_model: gptj.Model) -> None:
    """A stop sequence or max_new_tokens inside an accepted draft ends the text where decoding
    alone ends it."""
    for settings in (dict(stop=["b:"]), dict(max_new_tokens=7), dict(max_new_tokens=1)):
        settings = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True, **settings}
        off, on = generate(int8_model, "none", CODE, **settings), generate(int8_model, "ngram", CODE, **settings)
        same_output(on, off)
        assert len(on.tokens) <= settings["max_new_tokens"]


def test_gptj_same_tokens(gptj_int4: gptj.Model) -> None:
    prompt = list(range(300, 340)) * 3  # a repeated run: drafts keep coming
    for settings in (dict(temperature=0), dict(temperature=1.0, seed=11)):
        off = generate(gptj_int4, "none", prompt, max_new_tokens=40, ignore_eos=True, **settings)
        on = generate(gptj_int4, "ngram", prompt, max_new_tokens=40, ignore_eos=True, **settings)
        same_output(on, off)
        assert on.drafted_tokens > 0


@pytest.mark.parametrize("kernels_rule", ["shared", "alone", "avx2"])
def test_batched_requests_draft_and_keep_their_tokens(kernels_rule: str, monkeypatch: pytest.MonkeyPatch,
                                                     request: pytest.FixtureRequest) -> None:  # fmt: skip
    """Requests decoding together draft in one shared pass (up to MAX_PASS_TOKENS in all) where
    a step of several rows costs about one row's (VNNI, AMX: "shared"); elsewhere ("alone", and
    AVX2's maddubs kernels, whose rule this is) only a request decoding alone drafts. Either way
    each gets the tokens, logprobs and finish it gets alone without drafts."""
    if kernels_rule == "avx2":
        if "avx2" not in kernels.available_variants():
            pytest.skip("no AVX2 here")
        avx2 = kernels.use("avx2")  # every thread's kernels until the test ends
        avx2.__enter__()
        request.addfinalizer(lambda: avx2.__exit__(None, None, None))
    else:
        monkeypatch.setattr(runner, "drafts_share_passes", lambda: kernels_rule == "shared")
    model = gptj.load(quantize="int8", max_batch=3)
    runs = [
        (CODE, dict(temperature=0)),
        (CODE.replace("add", "mul"), dict(temperature=1.0, seed=5)),
        ("Once upon a time", dict(temperature=0.7, seed=2, top_p=0.9)),
    ]
    common = dict(max_new_tokens=40, ignore_eos=True, logprobs=2)
    alone = [generate(model, "none", p, **common, **s) for p, s in runs]
    shared: list[int] = []  # for each pass that checked drafts: how many requests it served
    speculate = model.engine._speculate

    def counting(batch: list) -> bool:
        checked = speculate(batch)
        if checked:
            shared.append(len(batch))
        return checked

    monkeypatch.setattr(model.engine, "_speculate", counting)
    handles = [model.submit(p, **common, **s) for p, s in runs]
    together = [h.result() for h in handles]
    model.engine.shutdown(grace=0)
    for a, b in zip(together, alone, strict=True):
        same_output(a, b)
    if kernels_rule == "shared":
        assert together[0].drafted_tokens > 0 and together[1].drafted_tokens > 0
        assert max(shared, default=0) == 3  # drafts were checked while all three decoded
    else:
        assert max(shared, default=0) <= 1  # never for two requests in one pass


def test_no_drafts_where_a_pass_would_not_be_exact(int8_model: gptj.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the fused step (the torch path), a pass of several tokens may round differently
    from one-token steps: no speculation there, so the text cannot change."""
    monkeypatch.setenv("GPTJ_FAST_DECODE", "0")
    assert not runner.exact_multi_token(int8_model.module)
    on = generate(int8_model, "ngram", CODE, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert on.drafted_tokens == 0


def test_load_and_serve_options(int8_model: gptj.Model) -> None:
    """`gptj.load(speculative=..., speculative_tokens=...)` and `gptj serve --speculative` reach the
    engine; bad values are refused by name; the server reports drafts in usage and /metrics."""
    import httpx
    from servers import running

    from gptj.cli.main import build_parser
    from gptj.errors import InvalidRequest
    from gptj.serve.app import create_app

    for bad in (dict(speculative="medusa"), dict(speculative_tokens=0), dict(speculative_tokens=99)):
        with pytest.raises(InvalidRequest) as e:
            gptj.load(**bad)
        assert next(iter(bad)) in str(e.value)
    args = build_parser().parse_args(["serve", "--speculative", "none", "--speculative-tokens", "3"])
    assert (args.speculative, args.speculative_tokens) == ("none", 3)
    with running(create_app(int8_model)) as base:
        r = httpx.post(f"{base}/v1/completions", timeout=300,
                       json={"prompt": CODE, "max_tokens": 32, "temperature": 0, "model": int8_model.name})
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert r.status_code == 200, r.text
    details = r.json()["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0
    assert details["rejected_prediction_tokens"] >= 0
    drafted = [line for line in metrics.splitlines() if line.startswith("gptj_speculative_drafted_tokens_total")]
    assert drafted and float(drafted[0].split()[1]) > 0
