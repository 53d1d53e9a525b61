"""GPT-J (Wang & Komatsuzaki, 2021) in plain PyTorch.

Module names follow the Hugging Face checkpoints (`transformer.h.0.attn.q_proj`, ...) so a
state dict loads without renaming. What sets GPT-J apart from GPT-2/NeoX:
  * one LayerNorm feeds attention and the MLP, which run in parallel:
        h = ln_1(x);  x = x + attn(h) + mlp(h)
  * rotary position embedding on the first `rotary_dim` dims of each head only, rotating
    adjacent pairs (2i, 2i+1) -- "rotate every two", not NeoX's two halves;
  * q/k/v/out projections have no bias; `lm_head` has a bias and is not tied to `wte`.
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
class GPTJConfig:
    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int = 64
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTJConfig:
        act = d.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise ValueError(f"config.json: activation_function {act!r} is not supported (GPT-J uses 'gelu_new')")
        fields = cls.__dataclass_fields__
        cfg = cls(**{k: v for k, v in d.items() if k in fields and v is not None})
        if cfg.rotary_dim is None or cfg.rotary_dim > cfg.head_dim:
            cfg.rotary_dim = cfg.head_dim
        return cfg

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def context_length(self) -> int:
        return self.n_positions

    @property
    def n_kv_heads(self) -> int:
        return self.n_head


def rotary_tables(
    positions: torch.Tensor, rotary_dim: int, head_dim: int, dtype: torch.dtype, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] in `dtype`, each frequency repeated for the two members of its
    pair. Past `rotary_dim`, cos is 1 and sin 0: those dims pass through unchanged, with no
    slicing and concatenating in every layer."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device) / rotary_dim))
    angles = (positions.to(torch.float32)[..., None] * inv_freq).repeat_interleave(2, dim=-1)  # [B, T, rotary_dim]
    cos = F.pad(angles.cos(), (0, head_dim - rotary_dim), value=1.0)
    sin = F.pad(angles.sin(), (0, head_dim - rotary_dim), value=0.0)
    return cos[:, None].to(dtype), sin[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent pairs (x[2i], x[2i+1]): x * cos + rotate_every_two(x) * sin."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
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

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, steps, self.n_head, self.head_dim).transpose(1, 2)

        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(h).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = apply_rotary(heads(q), cos, sin)
        k = apply_rotary(heads(k), cos, sin)
        v = heads(v)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=steps > 1)
        else:
            k, v = cache.update(self.layer, view, k, v)
            out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=view.mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.fc_in = nn.Linear(cfg.n_embd, inner)
        self.fc_out = nn.Linear(inner, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(h), approximate="tanh"))  # gelu_new


class Block(nn.Module):
    def __init__(self, cfg: GPTJConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, view) -> torch.Tensor:  # noqa: ANN001
        h = self.ln_1(x)
        return x + self.attn(h, cos, sin, cache, view) + self.mlp(h)


class Transformer(nn.Module):
    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)


class GPTJ(nn.Module):
    architecture = "gptj"

    def __init__(self, cfg: GPTJConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)  # biased, untied

    def fuse_projections(self) -> None:
        """Stacks q/k/v into one layer, for speed (see gptj.fusion); the state dict then no
        longer has the Hugging Face names."""
        for block in self.transformer.h:
            block.attn.fuse_projections()

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
        """The token embeddings [B, T, n_embd], in the model's compute dtype."""
        return self.transformer.wte(input_ids).to(self.transformer.ln_f.weight.dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables cos/sin [B, 1, T, head_dim] for `positions`, in float32."""
        return rotary_tables(positions, self.config.rotary_dim, self.config.head_dim, torch.float32)

    def blocks(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        rows: slice,
    ) -> torch.Tensor:
        """Every block on x (the rotary tables cast to x's dtype)."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        view = cache.view(positions, rows) if cache is not None else None
        for block in self.transformer.h:
            x = block(x, cos, sin, cache, view)
        return x

    def head(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Float32 logits of x (its last position only with `last_only`)."""
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x)).float()


def skip_checkpoint_key(name: str) -> bool:
    """Old checkpoints carry the causal-mask buffers `attn.bias` and `attn.masked_bias`."""
    return name.endswith(("attn.bias", "attn.masked_bias"))
