"""Fusing the linears that read the same input (q/k/v; gate/up) into one, after loading.

At batch 1 each linear is one GEMV with a fixed cost besides reading its weight (a kernel
call, waking the threads, Python): one GEMV over the stacked rows instead of three saves that
cost twice. The bundled 30-layer model makes 7 such calls per layer; fused, 4.
Rows are independent in every format here (float, int8 per row, int4 per row-group), so the
fused layer gives exactly what its parts gave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gptj.quant import BF16Linear, QuantizedLinear


def fuse_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One layer whose output is the outputs of `linears` (same input size) side by side."""
    first = linears[0]
    if any(type(m) is not type(first) for m in linears):
        raise TypeError(f"cannot fuse {[type(m).__name__ for m in linears]}: all must be the same kind of layer")
    if isinstance(first, QuantizedLinear):
        parts = [{**m.portable_buffers(), **({"bias": m.bias} if m.bias is not None else {})} for m in linears]
        state = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        return QuantizedLinear.from_state(state)
    if type(first) in (nn.Linear, BF16Linear):
        with_bias = first.bias is not None
        weight = torch.cat([m.weight.detach() for m in linears])
        fused = type(first)(weight.shape[1], weight.shape[0], bias=with_bias, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if with_bias:
            fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
        return fused
    raise TypeError(f"cannot fuse {type(first).__name__} layers")
