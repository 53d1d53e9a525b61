"""Legacy GGML GPT-J files for tests, in each quantization version's block layout.

Version 2 blocks are gguf.quants' (ggml's today); the older layouts are made from them without
loss (fp16 scales widened to float32; for version 0 the nibbles re-paired: byte i = values 2i,
2i + 1), so every version of a file holds the same weights. The layouts are those of KoboldCpp's
ggml_v2.c (block_q4_0 {float d; qs[16]}, ...), written out here on their own."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

GGML_MAGIC = 0x67676D6C
TTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q4_2": 4, "q4_3": 5, "q5_0": 6, "q5_1": 7, "q8_0": 8}
FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q4_2": 5, "q4_3": 6, "q8_0": 7, "q5_0": 8, "q5_1": 9}
GGUF_TYPE = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0}
TRANSPOSED = (".attn.q_proj.weight", ".attn.k_proj.weight", ".attn.v_proj.weight", ".attn.out_proj.weight",
              ".mlp.fc_in.weight")


def _f32_of_f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32).view(np.uint8).reshape(-1, 4)


def _values(qs: np.ndarray) -> np.ndarray:
    """Version 1/2 nibbles (byte i = values i, i + 16) -> the 32 values of each block."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pair(values: np.ndarray) -> np.ndarray:
    """Values -> version 0 nibbles: byte i = value 2i | value 2i + 1 << 4."""
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def legacy_blocks(blocks: np.ndarray, kind: str, version: int) -> np.ndarray:
    """Version 2 blocks [n, bytes] of `kind` in the layout of `version`."""
    if version == 2:
        return blocks
    if kind == "q8_0":
        return np.concatenate([_f32_of_f16(blocks[:, :2]), blocks[:, 2:]], axis=1)
    if kind in ("q4_0", "q4_1"):
        head = 2 if kind == "q4_0" else 4
        scales = np.concatenate([_f32_of_f16(blocks[:, i : i + 2]) for i in range(0, head, 2)], axis=1)
        qs = blocks[:, head:]
        return np.concatenate([scales, qs if version == 1 else _pair(_values(qs))], axis=1)
    head = 6 if kind == "q5_0" else 8  # d (m) qh: unchanged
    qs = blocks[:, head:]
    return np.concatenate([blocks[:, :head], qs if version == 1 else _pair(_values(qs))], axis=1)


def q4_2_blocks(x: np.ndarray, with_min: bool) -> tuple[np.ndarray, np.ndarray]:
    """Version 0 q4_2 (16 values: fp16 d, 8 bytes, x = d * (q - 8)) or q4_3 (fp16 d, fp16 m, x = d*q + m)
    blocks of x, and the values they stand for."""
    b = x.reshape(-1, 16).astype(np.float32)
    if with_min:
        lo, hi = b.min(axis=1), b.max(axis=1)
        d = ((hi - lo) / 15).astype(np.float16)
        m = lo.astype(np.float16)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.nan_to_num(np.round((b - m.astype(np.float32)[:, None]) / d.astype(np.float32)[:, None])), 0, 15)
        head = np.concatenate([d.view(np.uint8).reshape(-1, 2), m.view(np.uint8).reshape(-1, 2)], axis=1)
        values = q * d.astype(np.float32)[:, None] + m.astype(np.float32)[:, None]
    else:
        amax = np.abs(b).max(axis=1)
        d = (amax / 7).astype(np.float16)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.nan_to_num(np.round(b / d.astype(np.float32)[:, None])) + 8, 0, 15)
        head = d.view(np.uint8).reshape(-1, 2)
        values = (q - 8) * d.astype(np.float32)[:, None]
    q = q.astype(np.uint8)
    return np.concatenate([head, _pair(q)], axis=1), values.reshape(x.shape).astype(np.float32)


def encode(a: np.ndarray, kind: str, version: int) -> tuple[bytes, np.ndarray]:
    """(data, the float32 values it stands for) of a 2-D weight."""
    if kind == "f32":
        return a.astype(np.float32).tobytes(), a.astype(np.float32)
    if kind == "f16":
        return a.astype(np.float16).tobytes(), a.astype(np.float16).astype(np.float32)
    if kind in ("q4_2", "q4_3"):
        data, values = q4_2_blocks(a, kind == "q4_3")
        return data.tobytes(), values
    blocks = gguf.quants.quantize(np.ascontiguousarray(a, np.float32), GGUF_TYPE[kind])
    values = gguf.quants.dequantize(blocks, GGUF_TYPE[kind]).reshape(a.shape)
    size = gguf.GGML_QUANT_SIZES[GGUF_TYPE[kind]][1]
    return legacy_blocks(blocks.reshape(-1, size), kind, version).tobytes(), values


def gptj_pieces(n_vocab: int) -> list[bytes]:
    from gptj.tokenizer import Tokenizer

    tok = Tokenizer.gptj()
    return [tok.token_bytes(i) if i < tok.vocab_size else b"" for i in range(n_vocab)]


def write_ggml_gptj(folder: Path, dst: Path, kind: str = "f16", version: int = 2, transposed: bool = False,
                    pieces: list[bytes] | None = None) -> dict[str, torch.Tensor]:
    """Writes the HF GPT-J checkpoint in `folder` as ggml's gpt-j example file of `kind` in the
    layout of quantization `version`; returns the float32 state dict its data stands for."""
    from gptj.loading.weights import iter_tensors, weight_files

    config = json.loads((folder / "config.json").read_text())
    n_vocab = config["vocab_size"]
    quantized = kind not in ("f32", "f16")
    ftype = version * 1000 + FTYPE[kind] if quantized else FTYPE[kind]
    stands_for: dict[str, torch.Tensor] = {}
    with open(dst, "wb") as f:
        f.write(struct.pack("<I7i", GGML_MAGIC, n_vocab, config["n_positions"], config["n_embd"], config["n_head"],
                            config["n_layer"], config["rotary_dim"], ftype))
        pieces = gptj_pieces(n_vocab) if pieces is None else pieces
        f.write(struct.pack("<i", len(pieces)))
        for p in pieces:
            f.write(struct.pack("<i", len(p)) + p)
        files, fmt = weight_files(folder)
        for name, t in iter_tensors(files, fmt):
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            a = t.float().squeeze().numpy()
            if name.endswith(".weight") and a.ndim == 2:
                stored = a.T.copy() if transposed and name.endswith(TRANSPOSED) else a
                data, values = encode(stored, kind, version)
                ttype = TTYPE[kind]
                values = values.T if transposed and name.endswith(TRANSPOSED) else values
            else:
                stored, ttype = a, 0
                data, values = a.astype(np.float32).tobytes(), a.astype(np.float32)
            encoded = name.encode()
            f.write(struct.pack("<iii", stored.ndim, len(encoded), ttype))
            f.write(struct.pack(f"<{stored.ndim}i", *reversed(stored.shape)))
            f.write(encoded)
            f.write(data)
            stands_for[name] = torch.from_numpy(np.ascontiguousarray(values)).reshape(t.shape)
    return stands_for
