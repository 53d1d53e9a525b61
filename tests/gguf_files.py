"""GGUF files for tests, written the way llama.cpp's convert_hf_to_gguf.py writes them (shapes in
ne order, q/k rows permuted for ggml's rope), with any tensor types (K-quants through
tests/kquants.py), from a random transformers Llama; and small tokenizers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from kquants import quantize
from transformers import LlamaConfig, LlamaForCausalLM

HF_TO_GGUF = {  # written out independently of gptj/loading/gguf.py's table
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
KQUANT_CONFIG = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5)
# llama-quantize's choices for Q4_K_M / Q5_K_M (attn_v and ffn_down of some layers, and the
# output, one level up), and an all-Q6_K file
MIXES: dict[str, Callable[[str, int], T]] = {
    "Q4_K_M": lambda part, layer: T.Q6_K if part in ("attn_v", "ffn_down", "output") and layer % 2 == 0 else T.Q4_K,
    "Q5_K_M": lambda part, layer: T.Q6_K if part in ("attn_v", "ffn_down", "output") and layer % 2 == 0 else T.Q5_K,
    "Q6_K": lambda part, layer: T.Q6_K,
}


def random_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**KQUANT_CONFIG, **overrides}, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    return model


def gguf_name(hf: str) -> str:
    stem = hf.removesuffix(".weight")
    if stem.startswith("model.layers."):
        layer, rest = stem.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"
    return HF_TO_GGUF[stem] + ".weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A 'gpt2' tokenizer: the 256 byte tokens, then filler tokens up to vocab_size."""
    from gptj.tokenizer import _byte_to_unicode

    tokens = list(_byte_to_unicode().values()) + ["Ġt"] + [f"<x{i}>" for i in range(257, vocab_size - 1)]
    tokens.append("<|endoftext|>")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab_size - 1) + [3])
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(vocab_size - 1)


def write_llama_gguf(path: Path, ref: LlamaForCausalLM, mix: Callable[[str, int], T] | None = None,
                     tokenizer: Callable[[gguf.GGUFWriter], None] | None = None,
                     arch: str = "llama") -> dict[str, tuple[np.ndarray, T]]:
    """Writes `ref` as llama.cpp would, 2-D weights in `mix(part, layer)`'s type (F32 without it),
    under `arch`'s keys. Returns, per GGUF tensor name, (the data as written, its type)."""
    cfg = ref.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    (tokenizer or (lambda w: byte_vocab(w, cfg.vocab_size)))(writer)
    stored = {}
    for hf, tensor in ref.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:  # as convert_hf_to_gguf.py: no output
            continue
        name = gguf_name(hf)
        array = tensor.numpy()
        if "attn_q" in name:
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif "attn_k" in name:
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        part = name.split(".")[-2]
        layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
        kind = mix(part, layer) if mix and array.ndim == 2 else T.F32
        data = quantize(array, kind)
        writer.add_tensor(name, data, raw_dtype=kind)
        stored[name] = (data, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
