"""The KV cache holds memory for the tokens written into it, not for the whole context."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch

from gptj.runtime.kv_cache import KVCache

_LIBC = ctypes.CDLL(None, use_errno=True)
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's mincore")


def resident_mb(*tensors: torch.Tensor) -> float:
    """The resident memory of exactly the pages under `tensors` (mincore). Not /proc/self/smaps:
    the kernel merges neighbouring anonymous mappings, and a neighbour's pages would count."""
    page = os.sysconf("SC_PAGE_SIZE")
    pages = 0
    for t in tensors:
        start = t.data_ptr() // page * page
        length = t.data_ptr() + t.numel() * t.element_size() - start
        vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
        if _LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        pages += len(vec) - bytes(vec).count(0)
    return pages * page / 2**20


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
