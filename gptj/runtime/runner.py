"""Runs a model for the engine: a CPU step of a few tokens per row (decode, drafted tokens to
verify, a short prompt) through the fused C++ step where it serves (gptj.cpu_decode), anything
else through the model's own torch forward.

The models (gptj/models) know nothing of the kernels: they expose `embed`, `rotary` (float32
tables), `blocks` and `head`, and the runner puts the C++ step in place of `blocks`."""

from __future__ import annotations

import torch

from gptj import cpu_decode
from gptj.runtime.kv_cache import KVCache


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor | None = None,
    cache: KVCache | None = None,
    rows: slice = slice(0, 1),
    last_only: bool = False,
    logits: bool = True,
) -> torch.Tensor | None:
    """What `model(input_ids, positions, cache, rows, last_only, logits)` returns."""
    if (
        cache is None
        or positions is None
        or input_ids.device.type != "cpu"
        or not exact_step(model, input_ids.numel())
    ):
        return model(input_ids, positions, cache, rows, last_only=last_only, logits=logits)
    x = model.embed(input_ids)
    cos, sin = model.rotary(positions)
    if not cpu_decode.decode_blocks(model, x, cos, sin, positions, cache, rows):
        x = model.blocks(x, cos, sin, positions, cache, rows)
    return model.head(x, last_only) if logits else None


def forward_ragged(
    model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cache: KVCache,
    wanted: torch.Tensor,
) -> torch.Tensor | None:
    """One fused step over tokens of several cache rows, each at its own position (input_ids,
    positions, rows: [N]; a row's tokens consecutive and in order), so a batch's decode tokens
    and a newcomer's prompt chunk share one pass over the weights. Returns the float32 logits of
    the tokens at indices `wanted` [W, vocab], or None (nothing done) where the fused step does
    not serve: the caller then steps as before."""
    if input_ids.device.type != "cpu" or not exact_step(model, input_ids.numel()):
        return None
    x = model.embed(input_ids[None])
    cos, sin = model.rotary(positions[None])
    if not cpu_decode.decode_blocks(model, x, cos, sin, positions[None], cache, rows):
        return None
    return model.head(x[:, wanted])[0] if wanted.numel() else x.new_empty(0)


def exact_step(model: torch.nn.Module, tokens: int) -> bool:
    """Whether a step of `tokens` tokens runs in the fused C++ step, token by token exact."""
    return tokens <= cpu_decode.max_entries() and exact_multi_token(model)


def drafts_share_passes() -> bool:
    """Whether requests decoding together may draft in one shared pass: where a step of several
    rows costs about one row's (cpu_decode.rows_are_cheap). Elsewhere no batch step is
    bandwidth-bound, drafts that miss would cost the batch arithmetic it pays for in time, and
    only a request decoding alone drafts."""
    return cpu_decode.rows_are_cheap()


def exact_multi_token(model: torch.nn.Module) -> bool:
    """Whether a step of several tokens per row gives each token the bits of a one-token step
    (the fused C++ step: decode.h), which speculative decoding needs to keep the text unchanged."""
    return hasattr(model, "blocks") and cpu_decode.enabled() and cpu_decode.serves(model)
