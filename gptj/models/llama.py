"""Llama-style decoders (Llama 2/3, SmolLM2, TinyLlama, ...) in plain PyTorch.

Module names follow the Hugging Face checkpoints (`model.layers.0.self_attn.q_proj`, ...) so
a state dict loads without renaming. What sets Llama apart from GPT-J:
  * pre-norm with RMSNorm (no mean, no bias), attention then MLP in sequence:
        x = x + attn(input_layernorm(x));  x = x + mlp(post_attention_layernorm(x))
  * rotary embedding over the whole head in HF's "rotate_half" convention: dim i is paired
    with dim i + head_dim/2 (two halves), not GPT-J's adjacent pairs; base `rope_theta`;
  * grouped-query attention: `n_kv_heads` key/value heads, each shared by
    n_head / n_kv_heads consecutive query heads; the KV cache stores only the kv heads;
  * SwiGLU MLP: down(silu(gate(x)) * up(x)); no biases anywhere;
  * `lm_head` may be tied to `embed_tokens` (`tie_word_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptj.fusion import fuse_linears
from gptj.runtime.kv_cache import CacheView, KVCache


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face `config.json` dict (transformers 4.x or 5.x layout)."""
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (Llama uses 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config.json: {flag}=true is not supported")
        # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if scaling is not None or rope_type != "default":
            raise ValueError(
                f"config.json: rope scaling {scaling or rope!r} is not supported (only rope_scaling=None)"
            )
        fields = cls.__dataclass_fields__
        cfg = cls(**{k: v for k, v in d.items() if k in fields and v is not None})
        if "rope_theta" in rope:
            cfg.rope_theta = float(rope["rope_theta"])
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_key_value_heads}"
            )
        if cfg.head_dim is None:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        return cfg

    # The names every architecture exposes to the engine.
    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # same sum, fewer ops
        # Normalise in float32 even for half weights, as HF does (the mean square overflows fp16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] in `dtype`: frequency i serves dims i and i + head_dim/2."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated_half * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv_heads = layer, cfg.n_head, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or cfg.hidden_size // cfg.n_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one layer, after fuse_projections()

    def fuse_projections(self) -> None:
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        view: CacheView | None,
    ) -> torch.Tensor:
        batch, steps, _ = h.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, steps, n, self.head_dim).transpose(1, 2)

        if self.qkv_proj is not None:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(h).split([self.n_head * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = apply_rotary(heads(q, self.n_head), cos, sin)
        k = apply_rotary(heads(k, self.n_kv_heads), cos, sin)
        v = heads(v, self.n_kv_heads)
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer, view, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            mask = view.mask
        # SDPA pairs query head j with kv head j // (n_head / n_kv_heads), as HF's repeat_kv,
        # without materialising the repeated keys and values of the whole cache.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=cache is None and steps > 1, enable_gqa=self.n_kv_heads != self.n_head
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one layer, after fuse_projections()

    def fuse_projections(self) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, view) -> torch.Tensor:  # noqa: ANN001
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, view)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    architecture = "llama"

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            # One Parameter under both names: state dicts with or without `lm_head.weight`
            # load, and .to(dtype) keeps them shared.
            self.lm_head.weight = self.model.embed_tokens.weight
            self.register_load_state_dict_pre_hook(_fill_tied_lm_head)
            self.register_load_state_dict_post_hook(_retie_lm_head)

    def fuse_projections(self) -> None:
        """Stacks q/k/v and gate/up into one layer each, for speed (see gptj.fusion); the
        state dict then no longer has the Hugging Face names."""
        for block in self.model.layers:
            block.self_attn.fuse_projections()
            block.mlp.fuse_projections()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: slice = slice(0, 1),
        last_only: bool = False,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Float32 logits [B, T, vocab] (or [B, 1, vocab] with `last_only`; None without
        `logits`: a prefill that only fills the cache skips the head).

        `positions` [B, T] are absolute positions; with a cache, `rows` picks the cache
        rows of this batch (B consecutive rows). The engine runs a model through gptj.runtime.runner,
        which may replace `blocks` by a fused C++ decode step."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        x = self.embed(input_ids)
        cos, sin = self.rotary(positions)
        x = self.blocks(x, cos, sin, positions, cache, rows)
        return self.head(x, last_only) if logits else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings [B, T, hidden_size]."""
        return self.model.embed_tokens(input_ids)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables cos/sin [B, 1, T, head_dim] for `positions`, in float32."""
        cfg = self.config
        return rotary_tables(positions, cfg.head_dim or cfg.hidden_size // cfg.n_head, cfg.rope_theta, torch.float32)

    def blocks(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        rows: slice,
    ) -> torch.Tensor:
        """Every block on x (the rotary tables cast to x's dtype, as HF does)."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        view = cache.view(positions, rows) if cache is not None else None
        for block in self.model.layers:
            x = block(x, cos, sin, cache, view)
        return x

    def head(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Float32 logits of x (its last position only with `last_only`)."""
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()


def _fill_tied_lm_head(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Tied checkpoints (and GGUF files) omit `lm_head.weight`; take it from the embeddings so
    a strict load succeeds. `load_state_dict` works on its own copy of the dict."""
    embed, head = prefix + "model.embed_tokens.weight", prefix + "lm_head.weight"
    if head not in state_dict and embed in state_dict:
        state_dict[head] = state_dict[embed]


def _retie_lm_head(module: nn.Module, incompatible_keys: Any) -> None:
    """`load_state_dict(assign=True)` (meta-device loading) replaces the two Parameters one
    by one, which would leave two objects: share one again."""
    module.lm_head.weight = module.model.embed_tokens.weight


def skip_checkpoint_key(name: str) -> bool:
    """Old checkpoints carry the rotary buffer `rotary_emb.inv_freq`, recomputed here."""
    return name.endswith("rotary_emb.inv_freq")
