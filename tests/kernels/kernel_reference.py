"""The integer math of the GEMV kernels (gptj/kernels/gemv.h), in plain torch, from the formats'
documented math (gptj/quant.py): activations quantized per block to int8, exact integer dot
products per block, then a fixed sequence of float32 multiplies and adds. Every kernel variant
must give these bits."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _div(a: Tensor, b: Tensor) -> Tensor:
    """a / b elementwise, correctly rounded (tensor by tensor: no reciprocal taken)."""
    return torch.div(a, b.expand_as(a).contiguous())


def quantize_activations(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """xq [M, K] (float32 holding integers in -127..127) and scales xs [M, ceil(K / block)]:
    per block, amax = max |x|, xs = amax / 127, xq = round(x * (127 / amax)) (0 where amax is 0),
    rounding half to even."""
    m, k = x.shape
    nb = math.ceil(k / block)
    xq, xs = torch.empty(m, k), torch.empty(m, nb)
    for b in range(nb):
        part = x[:, b * block : (b + 1) * block]
        amax = part.abs().amax(dim=1)
        xs[:, b] = _div(amax, torch.tensor(127.0))
        inv = torch.where(amax > 0, _div(torch.full_like(amax, 127.0), amax.clamp(min=1e-38)), 0.0)
        xq[:, b * block : (b + 1) * block] = torch.round(part * inv[:, None])
    return xq, xs


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """y = (sum over blocks b of 128, in order: acc = acc + S_b * xs_b) * scales (+ bias), S_b the
    exact block dot product of the int8 weights and activations."""
    x = x.float()
    xq, xs = quantize_activations(x, 128)
    acc = torch.zeros(x.shape[0], qweight.shape[0])
    for b in range(xs.shape[1]):
        cols = slice(b * 128, (b + 1) * 128)
        s = (xq[:, cols].double() @ qweight[:, cols].double().T).float()  # exact: integers below 2^24
        acc = acc + s * xs[:, b : b + 1]
    y = acc * scales[None]
    return y if bias is None else y + bias[None]


def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None) -> Tensor:
    """Per group g of 32 (w = s * q + m): c_g = D_g * (s_g * xs_g) + m_g * xsum_g, D_g the exact
    dot product of q and xq, xsum_g = xs_g * (the sum of xq over g); P_i = the sum of c_g over
    g = i, i + 4, ... in order; y = (P_0 + P_1) + (P_2 + P_3) (+ bias)."""
    x = x.float()
    m, n, ng = x.shape[0], qweight.shape[0], scales.shape[1]
    xq, xs = quantize_activations(x, 32)
    packed = qweight.reshape(n, ng, 16)
    xg = xq.reshape(m, ng, 32)
    d = torch.empty(m, n, ng)
    for g in range(ng):
        q = torch.cat([packed[:, g] & 15, packed[:, g] >> 4], dim=-1).double()  # [n, 32]: values 0..15
        d[:, :, g] = (xg[:, g].double() @ q.T).float()  # exact: integers below 2^24
    xsum = xs * xg.sum(-1)  # the sum of integers is exact
    c = d * (scales.float()[None] * xs[:, None]) + mins.float()[None] * xsum[:, None]
    p = _chunked_sums(c, 4)
    y = (p[..., 0] + p[..., 1]) + (p[..., 2] + p[..., 3])
    return y if bias is None else y + bias[None]


def _chunked_sums(c: Tensor, width: int) -> Tensor:
    """[..., width]: sums of c[..., j], c[..., j + width], ... in order, from 0."""
    pad = -c.shape[-1] % width
    if pad:
        c = torch.cat([c, c.new_zeros(*c.shape[:-1], pad)], dim=-1)
    acc = c.new_zeros(*c.shape[:-1], width)
    for j in range(0, c.shape[-1], width):
        acc = acc + c[..., j : j + width]
    return acc
