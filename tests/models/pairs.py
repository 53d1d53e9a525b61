"""Our models beside transformers' with the same random weights, for the parity tests."""

from __future__ import annotations

import torch
from transformers import GPTJConfig as HFGPTJConfig
from transformers import GPTJForCausalLM, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from gptj.models.gptj import GPTJ, GPTJConfig
from gptj.models.llama import Llama, LlamaConfig

GPTJ_CONFIGS = [
    dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, vocab_size=120),
    dict(n_embd=60, n_head=5, n_layer=3, rotary_dim=6, vocab_size=97),  # odd head count
    dict(n_embd=48, n_head=3, n_layer=2, rotary_dim=16, vocab_size=50, n_inner=100),  # rotary = whole head
]


def gptj_pair(kw: dict, seed: int = 0) -> tuple[GPTJForCausalLM, GPTJ]:
    torch.manual_seed(seed)
    hf_cfg = HFGPTJConfig(n_positions=64, **kw)
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


LLAMA_CONFIGS = [
    # GQA 6 query heads on 2 kv heads, untied lm_head
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
         intermediate_size=80, vocab_size=120),
    # odd head count, one kv head (MQA), tied embeddings, unusual rope base
    dict(hidden_size=30, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=3,
         intermediate_size=64, vocab_size=97, tie_word_embeddings=True, rope_theta=500.0),
    # plain MHA with an explicit head_dim != hidden/heads
    dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, num_hidden_layers=2,
         intermediate_size=72, vocab_size=50, head_dim=12, rms_norm_eps=1e-5, tie_word_embeddings=True),
]


def random_hf_llama(kw: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(HFLlamaConfig(max_position_embeddings=64, **kw)).eval()
    with torch.no_grad():  # larger weights than HF's init, and random norms, so errors show
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.15)
    return ref


def llama_pair(kw: dict, seed: int = 0) -> tuple[LlamaForCausalLM, Llama]:
    ref = random_hf_llama(kw, seed)
    ours = Llama(LlamaConfig.from_dict(ref.config.to_dict())).eval()
    state = ref.state_dict()
    if ours.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # as tied checkpoints ship: the load must fill it
    ours.load_state_dict(state)  # strict
    return ref, ours


PAIRS = {"gptj": (gptj_pair, GPTJ_CONFIGS), "llama": (llama_pair, LLAMA_CONFIGS)}
