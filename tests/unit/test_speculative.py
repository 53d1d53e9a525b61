"""Prompt-lookup drafting: what it proposes, and how the draft length adapts."""

from __future__ import annotations

from gptj.runtime.speculative import NgramDrafter


def test_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    #          0  1  2  3  4  5  6  7  8  9
    text = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7]
    d = NgramDrafter(text, max_tokens=4)
    # "6 7" last occurred at 6..7, followed by 2 3 5 6; "5 6 7" (longer) at 0..2, followed by 8 9 1 6
    assert d.propose(4) == [8, 9, 1, 6]
    assert d.propose(2) == [8, 9]


def test_nothing_recurs_nothing_proposed() -> None:
    d = NgramDrafter([1, 2, 3, 4, 5, 6])
    assert d.propose(5) == []
    d.extend([1])  # one token is too weak a hint
    assert d.propose(5) == []
    d.extend([2])
    assert d.propose(5) == [3, 4, 5, 6, 1]  # bounded by the limit
    assert d.propose(50) == [3, 4, 5, 6, 1, 2]  # and by its budget, which starts at max_tokens


def test_extending_finds_newly_repeated_runs() -> None:
    d = NgramDrafter([10, 11, 12, 13, 14, 15], max_tokens=3)
    d.extend([99, 12, 13])
    assert d.propose(8) == [14, 15, 99]


def test_budget_halves_after_a_miss_and_grows_after_full_hits() -> None:
    d = NgramDrafter(list(range(20)) + [3, 4], max_tokens=8)
    assert len(d.propose(100)) == 8
    d.accepted(8, 0)
    assert len(d.propose(100)) == 4
    d.accepted(4, 0)
    d.accepted(2, 0)
    d.accepted(1, 0)
    assert len(d.propose(100)) == 1  # never below one
    d.accepted(1, 1)
    d.accepted(2, 2)
    assert len(d.propose(100)) == 4
    d.accepted(4, 2)  # a partial hit keeps the length
    assert len(d.propose(100)) == 4
