"""The KV cache holds memory for the tokens written into it, not for the whole context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptj.runtime.kv_cache import KVCache

SMAPS = Path("/proc/self/smaps")
pytestmark = pytest.mark.skipif(not SMAPS.exists(), reason="needs Linux's /proc/self/smaps")


def resident_mb(*tensors: torch.Tensor) -> float:
    """The resident memory of the mappings that hold `tensors` (each counted once: the kernel
    may merge neighbouring mappings), whatever else the process does."""
    addresses = [t.data_ptr() for t in tensors]
    total, inside = 0, False
    for line in SMAPS.read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            start, end = (int(a, 16) for a in first.split("-"))
            inside = any(start <= a < end for a in addresses)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / 1024


def test_cache_memory_follows_the_tokens_written() -> None:
    """A 6B-shaped cache of 2048 positions (bf16: 940 MB) starts empty; 128 positions of one
    row take their share (~59 MB), as a 512-token prompt on a 2048 context must not pay for 2048."""
    cache = KVCache(28, 1, 16, 2048, 256, torch.bfloat16)
    assert cache.nbytes > 900e6
    assert torch.count_nonzero(cache.k[:, :, :, 1000]) == 0  # zeros, also where nothing was written
    assert resident_mb(cache.k, cache.v) < 10
    cache.k[:, 0, :, :128] = 1.0
    cache.v[:, 0, :, :128] = 1.0
    grown = resident_mb(cache.k, cache.v)
    assert 50 < grown < 70, grown
    assert cache.k[:, 0, :, :128].float().mean() == 1.0 and torch.count_nonzero(cache.v[:, 0, :, 128:]) == 0


def test_views_keep_the_cache_alive() -> None:
    cache = KVCache(2, 2, 2, 16, 8)
    k = cache.k[1]
    k[0, 0, 3] = 2.0
    del cache
    assert k[0, 0, 3].sum() == 16.0 and k.sum() == 16.0
