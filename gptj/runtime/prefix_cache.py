"""Keys and values of earlier prompts, kept for later requests that start the same way.

The engine's cache rows already keep what their last request left there; when a row is taken
by a request with another prefix, what it held moves here first, if it is worth keeping.
The store is bounded in bytes and drops the least recently used entry first.

Admission: a row is kept only when its request's prompt started like an earlier one (a chat
turn resending the conversation, a regenerate, a shared preset). Of a row whose prompt was new,
only a fingerprint is kept (hashes of its prefixes at block boundaries, a few bytes a block),
so one-off prompts never fill the store with keys and values nobody asks for again, and the
first request that does come back shows its prefix recurs.

Every entry and fingerprint belongs to a cache scope (None: the shared one): a request sees
only its own scope's prefixes, so tenants cannot learn each other's prompts from cache hits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

DEFAULT_BYTES = 512 << 20  # the store's bound when nobody sets one (a server sets --prefix-cache)
MIN_STORED_TOKENS = 32  # shorter prefixes are cheaper to recompute than to keep
MAX_FINGERPRINTS = 16_384  # block hashes of rows not kept (under 2 MB)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def block_hashes(tokens: Sequence[int], scope: str | None = None, block: int = MIN_STORED_TOKENS) -> list[int]:
    """hash(tokens[:block]), hash(tokens[:2 * block]), ... within `scope`: equal hashes mean an
    equal prefix."""
    return [hash((scope, tuple(tokens[:end]))) for end in range(block, len(tokens) + 1, block)]


Key = tuple[str | None, tuple[int, ...]]  # (cache scope, tokens)


class PrefixStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.fingerprints: OrderedDict[int, None] = OrderedDict()  # prefixes of rows not kept

    def __len__(self) -> int:
        return len(self.entries)

    def best(self, prompt: Sequence[int], scope: str | None = None) -> tuple[Key | None, int]:
        """The entry of `scope` sharing the longest prefix with `prompt`, and that length."""
        best_key, best_len = None, 0
        for key in self.entries:
            n = common_prefix(key[1], prompt) if key[0] == scope else 0
            if n > best_len:
                best_key, best_len = key, n
        return best_key, best_len

    def get(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        self.entries.move_to_end(key)
        self.hits += 1
        return self.entries[key]

    def seen(self, prompt: Sequence[int], scope: str | None = None) -> int:
        """How many leading tokens of `prompt` (whole blocks) a row not kept began with."""
        n = 0
        for i, h in enumerate(block_hashes(prompt, scope)):
            if h not in self.fingerprints:
                break
            self.fingerprints.move_to_end(h)
            n = (i + 1) * MIN_STORED_TOKENS
        return n

    def remember(self, tokens: Sequence[int], scope: str | None = None) -> None:
        """Keeps the fingerprint of a row that is not kept itself."""
        for h in block_hashes(tokens, scope):
            self.fingerprints[h] = None
            self.fingerprints.move_to_end(h)
        while len(self.fingerprints) > MAX_FINGERPRINTS:
            self.fingerprints.popitem(last=False)

    def put(self, tokens: Sequence[int], k: torch.Tensor, v: torch.Tensor, scope: str | None = None) -> None:
        """Keeps k, v ([layers, heads, len(tokens), head_dim]) for `tokens`, evicting the least
        recently used entries to stay within max_bytes. Entries that are prefixes of the new
        one are dropped: the new one serves them too."""
        size = (k.numel() * k.element_size()) * 2
        if size > self.max_bytes:
            return
        key = (scope, tuple(tokens))
        held = key[1]
        for other in [e for e in self.entries if e[0] == scope and len(e[1]) <= len(held) and held[: len(e[1])] == e[1]]:
            self._drop(other)
        while self.entries and self.nbytes + size > self.max_bytes:
            self._drop(next(iter(self.entries)))
        self.entries[key] = (k, v)
        self.nbytes += size

    def _drop(self, key: Key) -> None:
        k, v = self.entries.pop(key)
        self.nbytes -= (k.numel() * k.element_size()) * 2
