"""The samplers and the stop matcher on their own: no model, no engine."""

from __future__ import annotations

import math

import pytest
import torch

from gptj.runtime.engine import StopMatcher
from gptj.runtime.sampling import SamplingParams, candidates, choose_token

# ---- samplers -----------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The samplers' definition, over the whole vocabulary: temperature, then top-k, top-p
    (nucleus) and min-p, setting dropped ids to -inf. `candidates` must keep the same set.
    In float64, as the sampler: the top-p cut then does not depend on summation order."""
    logits = logits.double() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest set whose mass reaches top_p: drop a token when the mass before it
        # already reaches top_p. The most likely token always stays.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False  # also when top_p rounds to 0 in float32 (5e-324)
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return logits



def kept(logits: list[float], **kw: object) -> set[int]:
    params = SamplingParams(**{"temperature": 1.0, "top_k": 0, **kw})  # type: ignore[arg-type]
    out = filter_logits(torch.tensor(logits), params)
    masked = {i for i, v in enumerate(out.tolist()) if v != -math.inf}
    assert set(candidates(torch.tensor(logits), params)[0].tolist()) == masked  # the sampler's set
    return masked


@pytest.mark.parametrize("settings", [
    dict(top_k=40, top_p=0.95), dict(top_k=0, top_p=0.9), dict(top_k=0, top_p=1.0),
    dict(top_k=0, top_p=0.999, temperature=2.0), dict(top_k=100, top_p=1.0, min_p=0.05), dict(top_k=5000, top_p=0.5),
])
def test_sampler_candidates_equal_masking_the_whole_vocabulary(settings: dict) -> None:
    # What choose_token samples from (found without sorting 50k logits) is softmax(filter_logits).
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50400, generator=gen) * 4  # peaked, like a language model's
    params = SamplingParams(**{"temperature": 0.8, **settings})
    expected = filter_logits(logits, params).softmax(-1)
    ids, probs = candidates(logits, params)
    got = torch.zeros_like(expected)
    got[ids] = probs
    assert set(ids.tolist()) == set(expected.nonzero().flatten().tolist())
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_sampler_draws_follow_the_distribution() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    draws = [choose_token(logits, params, gen) for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), freq


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert kept(logits, top_p=0.5) == {0}
    assert kept(logits, top_p=0.7) == {0, 1}
    assert kept(logits, top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(logits, top_p=0.81) == {0, 1, 2}
    assert kept(logits, top_p=1.0) == {0, 1, 2, 3}
    assert kept(logits, top_p=0.01) == {0}  # the most likely token always stays


def test_top_k_and_min_p() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().tolist()
    out = filter_logits(torch.tensor(logits), SamplingParams(temperature=1.0, top_k=2, top_p=1.0))
    assert {i for i, v in enumerate(out.tolist()) if v != -math.inf} == {0, 1}
    assert kept(logits, min_p=0.6, top_p=1.0) == {0, 1}  # p >= 0.6 * 0.4


def test_stop_matcher_across_pieces_never_leaks_the_stop() -> None:
    m = StopMatcher(["\nYou:"])
    out = []
    for piece in ["Hello", " there\n", "Yo", "u:", " more"]:
        text, hit = m.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello there" and hit
    m = StopMatcher(["END"])
    assert m.push("abcE") == ("abc", False)  # "E" may start the stop: held back
    assert m.push("x") == ("Ex", False)
    assert m.flush() == ""
