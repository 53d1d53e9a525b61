"""The KV cache holds memory for the tokens written into it, not for the whole context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptj.runtime.kv_cache import KVCache

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="needs Linux's /proc/self/status")


def anonymous_mb() -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_cache_memory_follows_the_tokens_written() -> None:
    """A 6B-shaped cache of 2048 positions (bf16: 940 MB) starts empty; 128 positions of one
    row take their share (~59 MB), as a 512-token prompt on a 2048 context must not pay for 2048."""
    before = anonymous_mb()
    cache = KVCache(28, 1, 16, 2048, 256, torch.bfloat16)
    assert cache.nbytes > 900e6
    assert torch.count_nonzero(cache.k[:, :, :, 1000]) == 0  # zeros, also where nothing was written
    assert anonymous_mb() - before < 50
    cache.k[:, 0, :, :128] = 1.0
    cache.v[:, 0, :, :128] = 1.0
    grown = anonymous_mb() - before
    assert 50 < grown < 120, grown
    assert cache.k[:, 0, :, :128].float().mean() == 1.0 and torch.count_nonzero(cache.v[:, 0, :, 128:]) == 0


def test_views_keep_the_cache_alive() -> None:
    cache = KVCache(2, 2, 2, 16, 8)
    k = cache.k[1]
    k[0, 0, 3] = 2.0
    del cache
    assert k[0, 0, 3].sum() == 16.0 and k.sum() == 16.0
