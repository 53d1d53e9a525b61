"""The row table's choices, without a model: which free row a request takes, how much of its
prompt it skips, and what moves to the prefix store when a row is taken."""

from __future__ import annotations

import torch

from gptj.runtime.kv_cache import KVCache
from gptj.runtime.prefix_cache import PrefixStore
from gptj.runtime.rows import Rows

A = list(range(100, 140))  # 40 tokens: longer than the store's smallest prefix (32)
B = list(range(200, 240))
C = list(range(300, 310))


def table(n: int, store: PrefixStore | None = None, reuse: bool = True) -> tuple[Rows, KVCache]:
    return Rows(n, reuse=reuse, store=store), KVCache(1, n, 1, 128, 2)


def finish(rows: Rows, cache: KVCache, row: int, tokens: list[int], tag: float = 0.0) -> None:
    """What a request leaves behind: the row's cache holds its tokens (keys and values `tag`)."""
    cache.k[:, row, :, : len(tokens)] = tag
    cache.v[:, row, :, : len(tokens)] = tag
    rows.tokens[row] = list(tokens)
    rows.release(row)


def test_a_prompt_sharing_a_prefix_with_a_free_row_takes_it_and_skips_the_shared_tokens() -> None:
    rows, cache = table(3)  # row 2 is never used: the least recently used one
    finish(rows, cache, 0, A)
    finish(rows, cache, 1, B)
    assert rows.take(set(), B + C, None, cache) == (1, len(B))
    assert rows.tokens[1] == B  # the row holds what was skipped; prefill appends the rest
    assert rows.take({1}, A[:10] + C, None, cache) == (0, 10)  # a shorter shared prefix counts too


def test_the_last_prompt_token_is_never_skipped() -> None:
    rows, cache = table(1)
    finish(rows, cache, 0, A)
    assert rows.take(set(), A, None, cache) == (0, len(A) - 1)  # its logits pick the first new token
    finish(rows, cache, 0, A)
    assert rows.take(set(), A, None, cache, full_prefill=True) == (0, 0)  # prompt logprobs: all computed


def test_rows_of_another_cache_scope_are_never_shared() -> None:
    rows, cache = table(2)
    finish(rows, cache, 1, [1, 2, 3])
    assert rows.take(set(), A, "alice", cache) == (0, 0)  # row 0, never used, is the least recently used
    finish(rows, cache, 0, A)  # now row 1 is
    assert rows.take(set(), A + C, "bob", cache) == (1, 0)  # alice's row holds the same prefix
    assert rows.take(set(), A + C, None, cache) == (1, 0)  # nor does the shared scope see it
    assert rows.take(set(), A + C, "alice", cache) == (0, len(A))


def test_the_least_recently_used_row_is_taken_when_none_shares_a_prefix() -> None:
    rows, cache = table(3)
    for row in (2, 0, 1):  # ended in this order: row 2 longest ago
        finish(rows, cache, row, [row + 1] * 5)
    assert rows.take(set(), [9] * 5, None, cache) == (2, 0)
    assert rows.take({2}, [9] * 5, None, cache) == (0, 0)
    off, _ = table(3, reuse=False)  # without prefix caching: the same order, nothing skipped
    for row in (2, 0, 1):
        finish(off, cache, row, [9] * 5)
    assert off.take(set(), [9] * 5, None, cache) == (2, 0)


def test_a_busy_row_is_never_taken() -> None:
    rows, cache = table(2)
    finish(rows, cache, 0, A)
    finish(rows, cache, 1, B)
    row, _ = rows.take({0}, A + C, None, cache)  # row 0 shares all of A, but is running
    assert row == 1
    off, _ = table(2, reuse=False)
    finish(off, cache, 1, [9])  # row 0, never used, is the least recently used
    assert off.take({0}, [9], None, cache) == (1, 0)


def test_a_recurring_prompt_displaced_from_its_row_comes_back_from_the_store() -> None:
    store = PrefixStore(1 << 20)
    rows, cache = table(1, store)
    rows.take(set(), A, None, cache)
    finish(rows, cache, 0, A, tag=1)
    rows.take(set(), B, None, cache)  # A was new: only its fingerprint is kept
    assert len(store) == 0 and len(store.fingerprints) > 0
    finish(rows, cache, 0, B, tag=2)
    assert rows.take(set(), A + C, None, cache) == (0, 0)  # A comes back: it recurs
    finish(rows, cache, 0, A + C, tag=3)
    assert rows.take(set(), B, "bob", cache) == (0, 0)  # A + C goes to the store, keys and all
    assert len(store) == 1
    finish(rows, cache, 0, B, tag=4)
    assert rows.take(set(), A + C + [7], "bob", cache) == (0, 0)  # another scope: not from the store
    finish(rows, cache, 0, A + C + [7], tag=5)
    assert rows.take(set(), A + C + [7], None, cache) == (0, len(A + C))
    assert store.hits == 1
    assert torch.equal(cache.k[:, 0, :, : len(A + C)], torch.full_like(cache.k[:, 0, :, : len(A + C)], 3.0))
    assert torch.equal(cache.v[:, 0, :, : len(A + C)], torch.full_like(cache.v[:, 0, :, : len(A + C)], 3.0))


def test_a_prefix_held_by_a_busy_row_is_copied_not_recomputed() -> None:
    """The next turn of a chat sent while the last one still runs (or before its cancellation
    reached the engine), or two users of one few-shot preset: the running row's keys and values
    for the shared prefix are final, and are copied into the new request's row."""
    rows, cache = table(3)
    finish(rows, cache, 0, A + B, tag=7.0)  # now running: its request continues A + B
    finish(rows, cache, 1, A[:5], tag=1.0)
    row, skipped = rows.take({0}, A + B + C, None, cache)
    assert row != 0 and skipped == len(A + B)
    assert torch.equal(cache.k[:, row, :, :skipped], cache.k[:, 0, :, :skipped])
    assert torch.equal(cache.v[:, row, :, :skipped], cache.v[:, 0, :, :skipped])
    assert rows.tokens[row] == A + B
    assert rows.take({0, row}, A + C, "bob", cache)[1] == 0  # never across scopes
    finish(rows, cache, 2, [])
    assert rows.take({0}, A + B + C, None, cache, full_prefill=True)[1] == 0
