"""A preallocated key/value cache shared by every architecture.

The cache holds `n_rows` independent sequences ("rows"). A forward pass works on a
contiguous range of rows so that reading the cache is a view, never a gather: a gather
would copy the whole cache of every layer at every decode step.
"""

from __future__ import annotations

import torch


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
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.n_rows = n_rows

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def update(
        self, layer: int, rows: slice, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store k, v ([B, H, T, D]) at `positions` ([B, T]) and return the keys and values
        of `rows` up to the furthest position written, plus that length."""
        k_rows, v_rows = self.k[layer, rows], self.v[layer, rows]
        batch, steps = positions.shape
        if batch == 1:
            start = int(positions[0, 0])
            # Contiguous positions for one sequence: a plain slice copy, the common case.
            k_rows[0, :, start : start + steps] = k[0]
            v_rows[0, :, start : start + steps] = v[0]
            length = start + steps
        else:
            b = torch.arange(batch, device=positions.device)[:, None]
            k_rows[b, :, positions] = k.transpose(1, 2)
            v_rows[b, :, positions] = v.transpose(1, 2)
            length = int(positions.max()) + 1
        return k_rows[:, :, :length], v_rows[:, :, :length], length

    def copy_prefix(self, src_row: int, dst_row: int, length: int) -> None:
        """Reuse the first `length` positions of one row in another (prefix caching)."""
        self.k[:, dst_row, :, :length] = self.k[:, src_row, :, :length]
        self.v[:, dst_row, :, :length] = self.v[:, src_row, :, :length]


def attention_mask(positions: torch.Tensor, length: int) -> torch.Tensor | None:
    """Boolean mask [B, 1, T, L]: a query at position p sees keys at positions <= p.

    Returns None when every query may see every key (one-token decode of one sequence),
    which lets SDPA take its fastest path."""
    batch, steps = positions.shape
    if batch == 1 and steps == 1 and int(positions[0, 0]) == length - 1:
        return None
    keys = torch.arange(length, device=positions.device)
    return (keys[None, None, None, :] <= positions[:, None, :, None])
