"""A preallocated key/value cache shared by every architecture.

The cache holds `n_rows` independent sequences ("rows"). A forward pass works on a
contiguous range of rows so that reading the cache is a view, never a gather: a gather
would copy the whole cache of every layer at every decode step.

On the CPU its memory comes from an anonymous mapping: zeros that take no memory until a
position is written, so a process holds the cache of the tokens it has seen, not of the whole
context (6B, bf16: 0.47 MB a token, 0.94 GB for 2048).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptj import memory
from gptj.errors import KVCacheTooLarge, ModelLoadError


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_rows: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, n_rows, n_kv_heads, max_len, head_dim)
        self.k, self.v = _zeros(shape, dtype, device), _zeros(shape, dtype, device)
        self.max_len = max_len
        self.n_rows = n_rows

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def view(self, positions: torch.Tensor, rows: slice) -> CacheView:
        return CacheView.of(positions, rows)

    def update(self, layer: int, view: CacheView, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, H, T, D]) at the view's positions and return the keys and values of
        its rows up to the furthest position written."""
        k_rows, v_rows = self.k[layer, view.rows], self.v[layer, view.rows]
        if view.start is not None:
            # Contiguous positions for one sequence: a plain slice copy, the common case.
            end = view.start + k.shape[2]
            k_rows[0, :, view.start : end] = k[0]
            v_rows[0, :, view.start : end] = v[0]
        else:
            b = torch.arange(k.shape[0], device=k.device)[:, None]
            k_rows[b, :, view.positions] = k.transpose(1, 2)
            v_rows[b, :, view.positions] = v.transpose(1, 2)
        return k_rows[:, :, : view.length], v_rows[:, :, : view.length]

    def copy_prefix(self, src_row: int, dst_row: int, length: int) -> None:
        """Reuse the first `length` positions of one row in another (prefix caching)."""
        self.k[:, dst_row, :, :length] = self.k[:, src_row, :, :length]
        self.v[:, dst_row, :, :length] = self.v[:, src_row, :, :length]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor; on the CPU, over an anonymous mapping whose pages the kernel provides (zeroed)
    only when first touched. torch.zeros would write, and so hold, every page at once."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    _, whole = memory.anonymous_mapping(nbytes)
    return whole.view(dtype).view(shape)


def check_kv_cache_fits(
    n_layers: int,
    n_rows: int,
    n_kv_heads: int,
    max_len: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> int:
    """The cache's size in bytes, once checked against the memory free on `device` (the loader's
    probe, gptj.memory.free_bytes).

    Raises KVCacheTooLarge before anything is allocated, saying which --context-length or
    --parallel would fit: a config with 10M positions must not start a 20 GB allocation."""
    if max_len < 1:
        raise ModelLoadError(f"the context length must be at least 1 token, got {max_len} (--context-length)")
    if n_rows < 1:
        raise ModelLoadError(f"the cache needs at least 1 row, got {n_rows} (--parallel)")
    per_token = KVCache.bytes_per_token(n_layers, n_kv_heads, head_dim, dtype)
    need = per_token * n_rows * max_len
    device = torch.device(device)
    have = memory.free_bytes(device)
    if need <= have:
        return need
    gb = memory.GB
    hints = []
    if (fit_len := have // (per_token * n_rows)) >= 1:
        hints.append(f"--context-length {fit_len}" + (f" (with --parallel {n_rows})" if n_rows > 1 else ""))
    if n_rows > 1 and (fit_rows := have // (per_token * max_len)) >= 1:
        hints.append(f"--parallel {fit_rows} (with --context-length {max_len})")
    advice = "use " + " or ".join(hints) if hints else "free memory or use a smaller model"
    raise KVCacheTooLarge(
        f"the KV cache for {n_rows} x {max_len} tokens needs {need / gb:.2f} GB on {device} "
        f"({per_token} bytes a token), but only {max(have, 0) / gb:.2f} GB is available; {advice}"
    )


@dataclass
class CacheView:
    """One forward pass's place in the cache, worked out once per pass rather than in every
    layer: reading a GPU tensor's value from Python waits for the GPU."""

    rows: slice
    positions: torch.Tensor  # [B, T] absolute positions
    start: int | None  # the first position, when one sequence has contiguous positions
    length: int  # keys to attend to: the furthest position written + 1
    mask: torch.Tensor | None  # [B, 1, T, length]: a query at position p sees keys <= p

    @classmethod
    def of(cls, positions: torch.Tensor, rows: slice) -> CacheView:
        host = positions.cpu()
        batch, steps = host.shape
        length = int(host.max()) + 1
        start = int(host[0, 0]) if batch == 1 else None
        mask = None
        if not (batch == 1 and steps == 1):  # one token of one sequence sees every key: no mask
            keys = torch.arange(length, device=positions.device)
            mask = keys[None, None, None, :] <= positions[:, None, :, None]
        return cls(rows, positions, start, length, mask)
