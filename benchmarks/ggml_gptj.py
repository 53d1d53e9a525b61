"""A Hugging Face GPT-J folder -> the legacy GGML file of ggml's gpt-j example (f16, q8_0, q4_0),
the file KoboldCpp and ctransformers (model_type="gptj") run ggml's GPT-J graph on.

    .venv/bin/python benchmarks/ggml_gptj.py CHECKPOINT_DIR OUT.bin --type q8_0   # or q4_0, f16

What it writes is what ggml's ``examples/gpt-j/convert-h5-to-ggml.py`` followed by
``examples/gpt-j/quantize`` writes, in one pass and without transformers:

* uint32 magic 0x67676d6c ("ggml"), then int32 n_vocab, n_ctx, n_embd, n_head, n_layer, n_rot,
  ftype. Quantized files carry ``GGML_QNT_VERSION * 1000 + ftype`` as the quantize tool writes
  it (2002 = q4_0, 2007 = q8_0); f16 files carry 1, as the converter does.
* the vocab: int32 count (= n_vocab), then per id an int32 length and the token's raw bytes
  (GPT-2's byte-level spelling undone); ids the tokenizer lacks are written as empty tokens.
* every tensor but ``attn.bias`` / ``attn.masked_bias``: int32 n_dims, int32 name length, int32
  ggml type, the dims innermost first (ne[0] = a row's length: a (out, in) weight is written
  ``in, out``), the name, then the data with no padding. 2-D ``*.weight`` tensors (wte and
  lm_head included) get the file's type; 1-D ones (LayerNorm, biases) stay float32.

The quantization layouts are those of GGML_QNT_VERSION 2, the ggml that ctransformers 0.2.27
vendors (models/ggml/ggml.c; ggml's gpt-j loader rejects nothing by version, so an older
layout would load and give garbage): blocks of 32 values along a row,

* q4_0 (18 bytes): fp16 d, then 16 bytes; byte j holds value j in its low nibble and value
  j + 16 in its high one (not the interleaved pairs of versions 0/1). d = (the signed value of
  largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)): quantize_row_q4_0_reference.
* q8_0 (34 bytes): fp16 d = amax / 127, then 32 int8 q = roundf(x / d) (half away from zero):
  quantize_row_q8_0_reference (version 2 dropped the float32 d of version 1).

Both compute as the vendored C does (x * (1/d), not x / d; q4_0's x * id + 8.5 fused into one
rounding, as GCC contracts it there), so the blocks are bit-for-bit those of ctransformers'
own ``ggml_quantize_q4_0`` / ``ggml_quantize_q8_0`` on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repository's gptj package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GGML_FILE_MAGIC = 0x67676D6C
GGML_QNT_VERSION = 2
GGML_QNT_VERSION_FACTOR = 1000
QK = 32  # values per q4_0 / q8_0 block
# file type -> (ftype in the header, ggml type of the 2-D weights, bytes per block, values per block)
TYPES: dict[str, tuple[int, int, int, int]] = {
    "f16": (1, 1, 2, 1),
    "q4_0": (GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR + 2, 2, 2 + QK // 2, QK),
    "q8_0": (GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR + 7, 8, 2 + QK, QK),
}
GGML_TYPE_F32 = 0
_ROWS_PER_CHUNK = 4096


# ---------------------------------------------------------------------------- quantization


def quantize_q4_0(x: np.ndarray) -> bytes:
    """Rows of float32 (length a multiple of 32) -> q4_0 blocks, as quantize_row_q4_0_reference."""
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)
    idx = np.abs(b).argmax(axis=1)  # the first of equal magnitudes, as the C's strict `<`
    d = (b[np.arange(len(b)), idx] / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    # x * id + 8.5f in one rounding: the vendored ggml is built with -mfma and GCC contracts the
    # multiply-add (-std=gnu11 -> -ffp-contract=fast); the float32 product is exact in float64.
    v = (b.astype(np.float64) * inv.astype(np.float64)[:, None] + 8.5).astype(np.float32)
    q = np.clip(np.trunc(v), 0, 15).astype(np.uint8)
    out = np.empty((len(b), 2 + QK // 2), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return out.tobytes()


def quantize_q8_0(x: np.ndarray) -> bytes:
    """Rows of float32 (length a multiple of 32) -> q8_0 blocks, as quantize_row_q8_0_reference."""
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = (b * inv[:, None]).astype(np.float64)  # the float32 product, rounded half away from zero
    q = np.trunc(v + np.copysign(0.5, v)).astype(np.int8)
    out = np.empty((len(b), 2 + QK), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def dequantize(data: bytes, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values a q4_0 / q8_0 / f16 payload stands for (for checks)."""
    if kind == "f16":
        return np.frombuffer(data, np.float16).astype(np.float32).reshape(shape)
    raw = np.frombuffer(data, np.uint8).reshape(-1, TYPES[kind][2])
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == "q8_0":
        q = raw[:, 2:].view(np.int8).astype(np.float32)
    else:
        q = np.concatenate([raw[:, 2:] & 15, raw[:, 2:] >> 4], axis=1).astype(np.float32) - 8
    return (q * d).reshape(shape)


# ---------------------------------------------------------------------------- the vocab


def vocab_pieces(folder: Path, n_vocab: int) -> list[bytes]:
    """Each id's raw bytes: vocab.json (+ added_tokens.json) as ggml's converter reads them, else
    tokenizer.json, else GPT-J's own (GPT-2's BPE and 143 <|extratoken_N|>). Padded with empty
    tokens (or cut) to n_vocab, which ggml's loader requires."""
    from gptj.tokenizer import Tokenizer, _piece_bytes, load_tokenizer

    by_id: dict[int, bytes] = {}
    if (folder / "vocab.json").is_file():
        for name in ("vocab.json", "added_tokens.json"):
            if (folder / name).is_file():
                entries = json.loads((folder / name).read_text(encoding="utf-8"))
                by_id.update({int(i): _piece_bytes(t) for t, i in entries.items()})
    else:
        tok = load_tokenizer(str(folder)) if (folder / "tokenizer.json").is_file() else Tokenizer.gptj()
        by_id = {i: tok.token_bytes(i) for i in range(tok.vocab_size)}
    return [by_id.get(i, b"") for i in range(n_vocab)]


# ---------------------------------------------------------------------------- the file


def _tensors(folder: Path) -> Iterator[tuple[str, np.ndarray, object]]:
    """(name, float32 or float16 array, the torch tensor behind it) in checkpoint order."""
    import torch

    from gptj.loading.weights import iter_tensors, weight_files

    files, fmt = weight_files(folder)
    for name, t in iter_tensors(files, fmt):
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers
            continue
        t = t.squeeze()
        if t.dtype not in (torch.float16, torch.float32):
            t = t.float()
        yield name, t.numpy(), t


def _write_tensor(f, name: str, a: np.ndarray, kind: str) -> int:  # noqa: ANN001
    quantize = name.endswith(".weight") and a.ndim == 2
    if quantize:
        ggml_type, block_bytes, block = TYPES[kind][1:]
        if a.shape[-1] % block:
            raise ValueError(f"{name}: rows of {a.shape[-1]} values do not split into blocks of {block}")
    else:
        ggml_type = GGML_TYPE_F32
    encoded = name.encode()
    f.write(struct.pack("<iii", a.ndim, len(encoded), ggml_type))
    f.write(struct.pack(f"<{a.ndim}i", *reversed(a.shape)))
    f.write(encoded)
    written = 0
    rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        chunk = rows[start : start + _ROWS_PER_CHUNK]
        if not quantize:
            data = np.ascontiguousarray(chunk, dtype=np.float32).tobytes()
        elif kind == "f16":
            data = np.ascontiguousarray(chunk, dtype=np.float16).tobytes()
        elif kind == "q8_0":
            data = quantize_q8_0(chunk)
        else:
            data = quantize_q4_0(chunk)
        f.write(data)
        written += len(data)
    return written


def convert(src: str | Path, dst: str | Path, kind: str = "q8_0") -> Path:
    """Writes the GGML file (atomically: a temporary file renamed into place); returns its path."""
    if kind not in TYPES:
        raise ValueError(f"type must be one of {', '.join(TYPES)}, got {kind!r}")
    from gptj.loading.weights import release_mapped_pages

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "gptj":
        raise ValueError(f"{src} is a {config.get('model_type')!r} checkpoint, not GPT-J")
    n_vocab = int(config["vocab_size"])
    hparams = (n_vocab, config["n_positions"], config["n_embd"], config["n_head"], config["n_layer"],
               config["rotary_dim"], TYPES[kind][0])  # fmt: skip
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<I7i", GGML_FILE_MAGIC, *hparams))
        pieces = vocab_pieces(src, n_vocab)
        f.write(struct.pack("<i", len(pieces)))
        for p in pieces:
            f.write(struct.pack("<i", len(p)) + p)
        for name, a, t in _tensors(src):
            _write_tensor(f, name, a, kind)
            release_mapped_pages(t)
    os.replace(tmp, dst)
    return dst


def read_header(path: str | Path) -> dict:
    """The hparams of a legacy GGML GPT-J file (for checks)."""
    with open(path, "rb") as f:
        magic, *h = struct.unpack("<I7i", f.read(32))
    if magic != GGML_FILE_MAGIC:
        raise ValueError(f"{path}: bad magic {magic:#x}")
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot", "ftype")
    return dict(zip(keys, h, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a Hugging Face GPT-J folder (config.json + weights)")
    parser.add_argument("dst", help="the GGML file to write")
    parser.add_argument("--type", default="q8_0", choices=list(TYPES))
    args = parser.parse_args()
    out = convert(args.src, args.dst, args.type)
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB, {read_header(out)}")


if __name__ == "__main__":
    main()
