"""K-quant encoders (Q4_K, Q5_K, Q6_K) for tests: the `gguf` package dequantizes these types but
cannot quantize to them. Simple min/max scales (not llama.cpp's search), blocks laid out as
ggml-common.h's block_q4_K / block_q5_K / block_q6_K, which `gguf.quants` reads; `quantize`
checks its own output against gguf's dequantization.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_scales_mins(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12 bytes get_scale_min_k4 unpacks."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1)


def _affine(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: per 32-value sub-block x = d*sc*q - dmin*m (sc, m 6-bit, q in 0..levels)."""
    sub = blocks.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    scale = (sub.max(axis=-1) - lo) / levels
    d = _f16(scale.max(axis=-1) / 63)
    dmin = _f16((-lo).max(axis=-1) / 63)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.round(scale / d.astype(np.float32)[:, None])), 0, 63)
        mn = np.clip(np.nan_to_num(np.round(-lo / dmin.astype(np.float32)[:, None])), 0, 63)
        eff = d.astype(np.float32)[:, None] * sc
        off = dmin.astype(np.float32)[:, None] * mn
        q = np.nan_to_num(np.round((sub + off[..., None]) / eff[..., None]))
    q = np.clip(q, 0, levels).astype(np.uint8)
    return d, dmin, _pack_scales_mins(sc, mn), q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """8 sub-blocks of 32 -> 128 bytes: byte c*32 + l = q[2c][l] | q[2c + 1][l] << 4."""
    q = q.reshape(-1, 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _affine(blocks, 15)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, _nibbles(q)],
                          axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _affine(blocks, 31)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh,
                           _nibbles(q)], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = _f16(scale.max(axis=-1) / 127)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.round(scale / d.astype(np.float32)[:, None])), -128, 127)
        eff = d.astype(np.float32)[:, None] * sc
        q = np.nan_to_num(np.round(sub / eff[..., None]))
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(-1, 8, 32)  # chunk k = h*4 + s*2 + p
    ql_k, qh_k = q & 0x0F, q >> 4
    ql = np.zeros((q.shape[0], 128), np.uint8)
    qh = np.zeros((q.shape[0], 64), np.uint8)
    for h in range(2):
        for p in range(2):
            ql[:, h * 64 + p * 32 : h * 64 + p * 32 + 32] = ql_k[:, h * 4 + p] | (ql_k[:, h * 4 + 2 + p] << 4)
        for t in range(4):
            qh[:, h * 32 : h * 32 + 32] |= qh_k[:, h * 4 + t] << (2 * t)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


ENCODERS = {T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}


def quantize(x: np.ndarray, kind: T) -> np.ndarray:
    """Rows of float32 (length a multiple of 256) -> uint8 [rows, bytes per row] of `kind`."""
    if kind not in ENCODERS:
        return gguf.quants.quantize(x, kind)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    data = ENCODERS[kind](rows.reshape(-1, QK_K)).reshape(rows.shape[0], -1)
    back = gguf.quants.dequantize(data, kind).reshape(rows.shape)
    err = np.abs(back - rows).max(axis=-1)
    assert (err <= 0.2 * np.abs(rows).max(axis=-1) + 1e-6).all(), f"{kind.name} encoder is off: {err.max()}"
    return data.reshape(*x.shape[:-1], -1)
