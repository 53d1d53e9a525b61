"""The KV cache's rows between requests: which free row a request takes and what it may skip,
kept apart from the step loop so that the prefix policy can be read and tested on its own."""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from gptj.runtime.kv_cache import KVCache
from gptj.runtime.prefix_cache import MIN_STORED_TOKENS, PrefixStore, common_prefix


class Rows:
    """The row table of a cache with `n` rows. `reuse`: rows keep their tokens for later
    requests (prefix caching); `store`: where a taken row's prefix goes (None: nowhere).

    A row keeps the tokens its last request left in it. A request takes the free row of its own
    cache scope that shares the longest prefix with its prompt (the least recently used one when
    none does) and skips prefilling that prefix. When the row held something else worth keeping,
    that moves to the store first if its prompt was one that recurs (else only its fingerprint
    is kept), and a longer prefix found in the store, or in a busy row (a request still running
    whose prompt or text this one continues), is copied into the row."""

    def __init__(self, n: int, reuse: bool = True, store: PrefixStore | None = None) -> None:
        self.reuse, self.store = reuse, store
        self.tokens: list[list[int]] = [[] for _ in range(n)]  # what each row's cache holds
        self.last_used = [0.0] * n
        self.recurs = [False] * n  # its request's prompt began like an earlier one
        self.scope: list[str | None] = [None] * n  # the cache scope of what each row holds

    def take(
        self,
        busy: Collection[int],
        prompt: Sequence[int],
        scope: str | None,
        cache: KVCache,
        full_prefill: bool = False,
    ) -> tuple[int, int]:
        """Gives a free row (not in `busy`) to a request with `prompt` in `scope`, and returns it
        with how many leading prompt tokens its cache holds now (never the last: its logits pick
        the first new token). `full_prefill`: every prompt position is computed anew (the
        prompt's logprobs are wanted), but the row still moves to the store as for any prompt."""
        free = [i for i in range(len(self.tokens)) if i not in busy]
        if not self.reuse:
            row = min(free, key=lambda i: self.last_used[i])
            self.tokens[row] = []
            return row, 0

        def shared_with(i: int) -> int:
            return common_prefix(self.tokens[i], prompt) if self.scope[i] == scope else 0

        row = max(free, key=lambda i: (shared_with(i), -self.last_used[i]))
        shared = shared_with(row)
        store = self.store
        store_key, store_shared = store.best(prompt, scope) if store is not None else (None, 0)
        held = self.tokens[row]
        if store is not None and len(held) - max(shared, store_shared) >= MIN_STORED_TOKENS:
            # This request overwrites what the row holds: keep it for a later request when its
            # prompt was a recurring one (a conversation, a regenerate), else its fingerprint.
            if self.recurs[row]:
                n = len(held)
                store.put(
                    held, cache.k[:, row, :, :n].clone(), cache.v[:, row, :, :n].clone(), self.scope[row]
                )
            else:
                store.remember(held, self.scope[row])
        seen = store.seen(prompt, scope) if store is not None else 0
        self.recurs[row] = max(shared, store_shared, seen) >= MIN_STORED_TOKENS
        self.scope[row] = scope
        if full_prefill:
            shared = store_shared = 0
        busy_row, busy_shared = max(((i, shared_with(i)) for i in busy), key=lambda p: p[1], default=(-1, 0))
        if full_prefill:
            busy_shared = 0
        if busy_shared > max(shared, store_shared):
            # a running request holds more of this prompt: its keys and values up to there are final
            cache.copy_prefix(busy_row, row, busy_shared)
            shared = busy_shared
        elif store_key is not None and store_shared > shared:
            k, v = store.get(store_key)
            cache.k[:, row, :, :store_shared] = k[:, :, :store_shared]
            cache.v[:, row, :, :store_shared] = v[:, :, :store_shared]
            shared = store_shared
        # The last prompt token is always recomputed: its logits pick the first new token.
        reuse = min(shared, len(prompt) - 1)
        self.tokens[row] = list(prompt[:reuse])
        return row, reuse

    def release(self, row: int) -> None:
        """The row's request ended: its tokens stay for later requests, and it ages from now."""
        self.last_used[row] = time.monotonic()

    def forget(self, row: int) -> None:
        """What the row's cache holds is unknown (a step failed): nothing of it is reused."""
        self.tokens[row] = []

    def spare_position(self, row: int, limit: int) -> int:
        """Where a batched step may write a throwaway key in free row `row` without touching
        the prefix it keeps: just past it (its last token is given up when the row is full)."""
        held = self.tokens[row]
        if len(held) >= limit:
            del held[-1]
        return len(held)
