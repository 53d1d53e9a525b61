"""Every architecture against transformers with the same weights: float32 logits within 1e-4,
from a whole prompt, token by token from the KV cache, and for batched rows at different
positions."""

from __future__ import annotations

import pytest
import torch
from pairs import PAIRS

from gptj.runtime.kv_cache import KVCache

CASES = [(arch, kw) for arch, (_, configs) in PAIRS.items() for kw in configs]


@pytest.mark.parametrize("fused", [False, True], ids=["hf-layout", "fused"])
@pytest.mark.parametrize(("arch", "kw"), CASES)
def test_prefill_and_cached_decode_match_transformers(arch: str, kw: dict, fused: bool) -> None:
    ref, ours = PAIRS[arch][0](kw)
    if fused:  # what gptj.load serves: q/k/v (and gate/up) stacked into one layer
        ours.fuse_projections()
    ids = torch.randint(0, kw["vocab_size"], (1, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        assert expected.abs().max() > 0.1  # not a trivially tiny comparison
        assert torch.allclose(ours(ids), expected, atol=1e-4, rtol=0)

        cfg = ours.config
        cache = KVCache(cfg.n_layer, 1, cfg.n_kv_heads, 32, cfg.head_dim)
        prompt, rest = ids[:, :7], ids[:, 7:]
        got = [ours(prompt, torch.arange(7)[None], cache)]
        for i in range(rest.shape[1]):  # decode token by token from the cache
            got.append(ours(rest[:, i : i + 1], torch.tensor([[7 + i]]), cache))
        assert torch.allclose(torch.cat(got, dim=1), expected, atol=1e-4, rtol=0)
        assert torch.allclose(ours(ids, last_only=True), expected[:, -1:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", PAIRS)
def test_batched_rows_at_different_positions_match_single(arch: str) -> None:
    make, configs = PAIRS[arch]
    ref, ours = make(configs[0], seed=1)
    cfg = ours.config
    vocab = configs[0]["vocab_size"]
    a = torch.randint(0, vocab, (1, 9))
    b = torch.randint(0, vocab, (1, 5))
    with torch.no_grad():
        ea, eb = ref(a).logits, ref(b).logits
        cache = KVCache(cfg.n_layer, 2, cfg.n_kv_heads, 32, cfg.head_dim)
        ours(a[:, :8], torch.arange(8)[None], cache, rows=slice(0, 1))
        ours(b[:, :4], torch.arange(4)[None], cache, rows=slice(1, 2))
        both = ours(torch.tensor([[a[0, 8]], [b[0, 4]]]), torch.tensor([[8], [4]]), cache, rows=slice(0, 2))
    assert torch.allclose(both[0, -1], ea[0, -1], atol=1e-4, rtol=0)
    assert torch.allclose(both[1, -1], eb[0, -1], atol=1e-4, rtol=0)
