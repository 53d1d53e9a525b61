"""Our GPT-J against transformers' GPTJForCausalLM: float32 logits within 1e-4."""

import pytest
import torch
from transformers import GPTJConfig as HFConfig
from transformers import GPTJForCausalLM

from gptj.kv_cache import KVCache
from gptj.models.gptj import GPTJ, GPTJConfig

CONFIGS = [
    dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, vocab_size=120),
    dict(n_embd=60, n_head=5, n_layer=3, rotary_dim=6, vocab_size=97),  # odd head count
    dict(n_embd=48, n_head=3, n_layer=2, rotary_dim=16, vocab_size=50, n_inner=100),  # rotary = whole head
]


def make_pair(kw: dict, seed: int = 0) -> tuple[GPTJForCausalLM, GPTJ]:
    torch.manual_seed(seed)
    hf_cfg = HFConfig(n_positions=64, **kw)
    ref = GPTJForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random biases and norms too, so a missing one shows
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.normal_(0, 0.2)
    ours = GPTJ(GPTJConfig.from_dict(hf_cfg.to_dict())).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing, missing
    assert all(k.endswith(("attn.bias", "attn.masked_bias")) for k in unexpected), unexpected
    return ref, ours


@pytest.mark.parametrize("fused", [False, True], ids=["hf-layout", "fused"])
@pytest.mark.parametrize("kw", CONFIGS)
def test_prefill_and_cached_decode_match_transformers(kw: dict, fused: bool) -> None:
    ref, ours = make_pair(kw)
    if fused:  # what gptj.load serves: q/k/v (and gate/up) stacked into one layer
        ours.fuse_projections()
    vocab = kw["vocab_size"]
    ids = torch.randint(0, vocab, (1, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        assert torch.allclose(ours(ids), expected, atol=1e-4, rtol=0)

        cfg = ours.config
        cache = KVCache(cfg.n_layer, 1, cfg.n_kv_heads, 32, cfg.head_dim)
        prompt, rest = ids[:, :7], ids[:, 7:]
        got = [ours(prompt, torch.arange(7)[None], cache)]
        for i in range(rest.shape[1]):  # decode token by token from the cache
            got.append(ours(rest[:, i : i + 1], torch.tensor([[7 + i]]), cache))
        assert torch.allclose(torch.cat(got, dim=1), expected, atol=1e-4, rtol=0)


def test_batched_rows_at_different_positions_match_single() -> None:
    ref, ours = make_pair(CONFIGS[0], seed=1)
    cfg = ours.config
    a = torch.randint(0, 120, (1, 9))
    b = torch.randint(0, 120, (1, 5))
    with torch.no_grad():
        ea, eb = ref(a).logits, ref(b).logits
        cache = KVCache(cfg.n_layer, 2, cfg.n_kv_heads, 32, cfg.head_dim)
        ours(a[:, :8], torch.arange(8)[None], cache, rows=slice(0, 1))
        ours(b[:, :4], torch.arange(4)[None], cache, rows=slice(1, 2))
        both = ours(torch.tensor([[a[0, 8]], [b[0, 4]]]), torch.tensor([[8], [4]]), cache, rows=slice(0, 2))
    assert torch.allclose(both[0, -1], ea[0, -1], atol=1e-4, rtol=0)
    assert torch.allclose(both[1, -1], eb[0, -1], atol=1e-4, rtol=0)
