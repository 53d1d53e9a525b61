"""Fused projections (gptj.fusion) give exactly what their parts gave, in every weight format."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptj.fusion import fuse_linears
from gptj.quant import quantize_linear


@pytest.mark.parametrize("mode", [None, "bf16", "int8", "int4"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64])  # the decode kernel and the prefill GEMM
def test_fused_output_is_the_parts_side_by_side(mode: str | None, bias: bool, rows: int) -> None:
    torch.manual_seed(0)
    parts: list[nn.Module] = [nn.Linear(256, n, bias=bias) for n in (256, 64, 64)]
    if mode is not None:
        parts = [quantize_linear(p, mode) for p in parts]
    fused = fuse_linears(parts)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        expected = torch.cat([p(x) for p in parts], dim=-1)
        got = fused(x)
    assert got.shape == (rows, 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixed_layers_are_refused() -> None:
    a = nn.Linear(64, 64)
    with pytest.raises(TypeError, match="same kind"):
        fuse_linears([a, quantize_linear(nn.Linear(64, 64), "int8")])
