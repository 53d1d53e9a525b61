"""Legacy GGML GPT-J files (magic 0x67676d6c), the format of ggml's gpt-j example and of the
`ggml-gpt-j-6b-*.bin` files KoboldCpp, ctransformers and GPT4All-J ran in 2023.

Layout (little-endian, no padding anywhere):

* uint32 magic 0x67676d6c ("ggml"), then int32 n_vocab, n_ctx, n_embd, n_head, n_layer, n_rot,
  ftype. Files written by ggml's quantize tool carry ``GGML_QNT_VERSION * 1000 + ftype``;
  ftype: 0 f32, 1 f16, 2 q4_0, 3 q4_1, 5 q4_2, 6 q4_3, 7 q8_0, 8 q5_0, 9 q5_1.
* the vocab: int32 count (= n_vocab), then per id an int32 length and the token's raw bytes.
* tensors until the end of the file: int32 n_dims, int32 name length, int32 ggml type, the dims
  (int32 each, ne[0] = a row's length first), the name (Hugging Face names:
  ``transformer.h.0.attn.q_proj.weight``), then the data.

The block layouts changed twice while these files were written, and the quantization version
in ftype says which one a file has (as KoboldCpp tells them apart):

* version 2 (``2000 + ftype``, from May 2023 on): ggml's current blocks, those of GGUF
  (``gguf.quants``): fp16 scales, byte j of a 32-value block holding values j and j + 16.
* version 1 (``1000 + ftype``): the same nibble order, but q4_0, q4_1 and q8_0 keep float32
  scales (20, 24 and 36 bytes a block); q5_0 / q5_1 are already today's.
* version 0 (ftype < 1000; quantized files of March-April 2023): float32 scales as in version 1,
  and each byte holds two neighbouring values (2i low nibble, 2i + 1 high nibble); also q4_2 /
  q4_3 (16 values, fp16 scale / scale and min).

The first converted files (f16/f32) stored q/k/v/out_proj and fc_in transposed; they are
recognised by fc_in's shape and transposed back, as KoboldCpp's loader retries them.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptj.errors import ModelLoadError
from gptj.loading.config import MAX_VOCAB, validate_config
from gptj.loading.weights import release_mapped_pages

if TYPE_CHECKING:
    from gptj.tokenizer import Tokenizer

GGML_MAGIC = 0x67676D6C  # "ggml"
GGMF_MAGIC = 0x67676D66  # "ggmf": llama.cpp's LLaMA files of 2023 (versioned)
GGJT_MAGIC = 0x67676A74  # "ggjt": llama.cpp's LLaMA files of 2023 (aligned, mmap-able)
LEGACY_MAGICS = {GGML_MAGIC: "ggml", GGMF_MAGIC: "ggmf", GGJT_MAGIC: "ggjt"}
GGML_QNT_VERSION = 2  # the newest layout; what ggml's quantize writes today
GGML_QNT_VERSION_FACTOR = 1000

# ggml tensor types of these files (the numbering GGUF kept)
F32, F16, Q4_0, Q4_1, Q4_2, Q4_3, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 4, 5, 6, 7, 8
TYPE_NAMES = {F32: "f32", F16: "f16", Q4_0: "q4_0", Q4_1: "q4_1", Q4_2: "q4_2", Q4_3: "q4_3", Q5_0: "q5_0",
              Q5_1: "q5_1", Q8_0: "q8_0"}
FTYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 4: "q4_1 (some f16)", 5: "q4_2", 6: "q4_3", 7: "q8_0",
               8: "q5_0", 9: "q5_1"}
# hparam names, for errors about the config made from them
GGML_KEYS = {"vocab_size": "n_vocab", "n_positions": "n_ctx", "n_embd": "n_embd", "n_head": "n_head",
             "n_layer": "n_layer", "rotary_dim": "n_rot", "n_inner": "fc_in rows"}
TRANSPOSED = (".attn.q_proj.weight", ".attn.k_proj.weight", ".attn.v_proj.weight", ".attn.out_proj.weight",
              ".mlp.fc_in.weight")
MAX_TENSORS = 100_000
MAX_NAME = 1024
_CHUNK_VALUES = 1 << 22


def block_layout(ttype: int, version: int) -> tuple[int, int]:
    """(values, bytes) of one block of a ggml type in a file of this quantization version."""
    if ttype == F32:
        return 1, 4
    if ttype == F16:
        return 1, 2
    if version >= 2:
        current = {Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34)}
        if ttype in current:
            return current[ttype]
    else:
        older = {Q4_0: (32, 20), Q4_1: (32, 24), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 36)}
        if version == 0:
            older |= {Q4_2: (16, 10), Q4_3: (16, 12)}
        if ttype in older:
            return older[ttype]
    raise KeyError(ttype)


def _f32(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at : at + 4].contiguous().view(torch.float32)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def dequantize_legacy(raw: torch.Tensor, ttype: int, version: int) -> torch.Tensor:
    """Float32 values [n_blocks * block] of the blocks of a version 0 or 1 file (see the module
    docstring); the operations are those of KoboldCpp's ggml_v2.c reference rows."""
    values, size = block_layout(ttype, version)
    blocks = raw.reshape(-1, size)
    if ttype == Q8_0:
        return (blocks[:, 4:].view(torch.int8).float() * _f32(blocks, 0)).reshape(-1)
    # the scale (float32 or fp16), the min (or None), where qh starts (or None), where the nibbles start
    if ttype in (Q4_0, Q4_1):
        scale, low = _f32(blocks, 0), (_f32(blocks, 4) if ttype == Q4_1 else None)
    else:
        scale, low = _f16(blocks, 0), (_f16(blocks, 2) if ttype in (Q4_3, Q5_1) else None)
    qh_at, qs_at = {Q4_0: (None, 4), Q4_1: (None, 8), Q4_2: (None, 2), Q4_3: (None, 4), Q5_0: (2, 6),
                    Q5_1: (4, 8)}[ttype]
    qs = blocks[:, qs_at:]
    lo, hi = qs & 0x0F, qs >> 4
    if version == 0:  # byte i holds values 2i and 2i + 1
        q = torch.stack([lo, hi], dim=-1).reshape(-1, values)
    else:  # byte i holds values i and i + block/2
        q = torch.cat([lo, hi], dim=-1)
    q = q.to(torch.int32)
    if qh_at is not None:  # the fifth bit of value i is bit i of qh, in both orders
        qh = blocks[:, qh_at : qh_at + 4].contiguous().view(torch.int32)
        q |= ((qh >> torch.arange(32, dtype=torch.int32)) & 1) << 4
    if low is None:
        offset = 16 if ttype == Q5_0 else 8
        return ((q - offset).float() * scale).reshape(-1)
    return (q.float() * scale + low).reshape(-1)


@dataclass
class GGMLTensor:
    name: str
    ttype: int
    shape: tuple[int, ...]  # torch order (ne reversed), as stored
    offset: int
    nbytes: int


class GGMLModel:
    """A legacy GGML GPT-J file opened for loading: header, vocab and tensor table read and
    checked, no weight read yet. `tensors()` yields the weights one at a time."""

    keys = GGML_KEYS

    def __init__(self, path: Path, data: np.ndarray, hparams: dict[str, int], version: int, pieces: list[bytes],
                 table: list[GGMLTensor], config: dict[str, Any], transposed: bool) -> None:
        self.path, self.data, self.hparams, self.version = path, data, hparams, version
        self.pieces, self.table, self.config, self.transposed = pieces, table, config, transposed

    @property
    def file_type(self) -> str:
        return FTYPE_NAMES.get(self.hparams["ftype"] % GGML_QNT_VERSION_FACTOR, "?")

    def tokenizer(self) -> Tokenizer:
        from gptj.tokenizer import Tokenizer

        try:
            return Tokenizer.from_ggml_vocab(self.pieces, name=self.path.stem)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: unusable vocab ({exc})") from None

    def tensors(self, dtype: torch.dtype = torch.float32, expected: Mapping[str, tuple[int, ...]] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in `dtype`) for each weight, dequantized as it is reached."""
        for t in self.table:
            if t.name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, if a converter kept them
                continue
            transpose = self.transposed and t.name.endswith(TRANSPOSED)
            shape = t.shape[::-1] if transpose else t.shape
            if expected is not None and t.name in expected and tuple(expected[t.name]) != shape:
                raise ModelLoadError(f"{self.path}: tensor {t.name!r} has shape {list(shape)}, "
                                     f"the header says {list(expected[t.name])}")
            raw = self.data[t.offset : t.offset + t.nbytes]
            out = torch.empty(t.shape, dtype=dtype)
            self._dequantize_into(out, raw, t.ttype)
            release_mapped_pages(torch.from_numpy(raw))  # the file's pages of this tensor: done with
            yield t.name, (out.t().contiguous() if transpose else out)

    def _dequantize_into(self, out: torch.Tensor, raw: np.ndarray, ttype: int) -> None:
        if ttype in (F32, F16) or self.version >= 2:
            from gptj.loading.gguf import dequantize_into

            dequantize_into(out, raw, ttype)  # ggml's type ids are GGUF's
            return
        values, size = block_layout(ttype, self.version)
        row_len = out.shape[-1]
        rows = out.numel() // row_len
        raw_rows = torch.from_numpy(raw).reshape(rows, -1)
        flat = out.reshape(rows, row_len)
        step = max(1, _CHUNK_VALUES // row_len)
        for r0 in range(0, rows, step):
            part = raw_rows[r0 : r0 + step]
            flat[r0 : r0 + step].copy_(dequantize_legacy(part, ttype, self.version).reshape(part.shape[0], row_len))


def _fail(path: Path, message: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {message}")


def open_ggml(path: str | Path) -> GGMLModel:
    """Opens a legacy GGML GPT-J file and checks everything but the weights' values: the header,
    the vocab, every tensor's name, type, dims and byte size against the file's length, and the
    config made from the header (validate_config). Raises a ModelLoadError naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size == 0:
                raise _fail(path, "empty file, not a GGML model")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as exc:
        raise _fail(path, f"cannot read the file ({exc.strerror or exc})") from None
    data = np.frombuffer(mapped, dtype=np.uint8)  # copy-on-write: torch.from_numpy takes it without a warning
    if size < 32:
        raise _fail(path, f"truncated GGML file: {size} bytes, shorter than its 32-byte header")
    magic, *h = struct.unpack_from("<I7i", mapped, 0)
    if magic in (GGMF_MAGIC, GGJT_MAGIC):
        raise _fail(path, f"a llama.cpp {LEGACY_MAGICS[magic]!r} file of 2023 (LLaMA); convert it to GGUF with "
                          "llama.cpp's convert_llama_ggml_to_gguf.py")
    if magic != GGML_MAGIC:
        raise _fail(path, f"not a GGML file (magic {magic:#010x}, expected {GGML_MAGIC:#010x})")
    hparams = dict(zip(("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot", "ftype"), h, strict=True))
    version = hparams["ftype"] // GGML_QNT_VERSION_FACTOR
    if hparams["ftype"] < 0 or version > GGML_QNT_VERSION:
        raise _fail(path, f"ftype {hparams['ftype']} (quantization version {version}) is not one this loader "
                          f"knows (0-{GGML_QNT_VERSION})")
    n_vocab = hparams["n_vocab"]
    if not 0 < n_vocab <= MAX_VOCAB:
        raise _fail(path, f"n_vocab must be a positive integer of at most {MAX_VOCAB} (MAX_VOCAB), got {n_vocab}")

    pos = 32

    def read_i32(count: int, what: str) -> tuple[int, ...]:
        nonlocal pos
        if pos + 4 * count > size:
            raise _fail(path, f"truncated GGML file: it ends inside {what} (at byte {pos} of {size})")
        values = struct.unpack_from(f"<{count}i", mapped, pos)
        pos += 4 * count
        return values

    (count,) = read_i32(1, "the vocab")
    if count != n_vocab:
        raise _fail(path, f"the vocab has {count} tokens, the header says n_vocab={n_vocab}")
    pieces: list[bytes] = []
    for i in range(n_vocab):
        (length,) = read_i32(1, f"the vocab (token {i})")
        if length < 0 or pos + length > size:
            raise _fail(path, f"truncated GGML file or corrupt vocab: token {i} claims {length} bytes")
        pieces.append(bytes(mapped[pos : pos + length]))
        pos += length

    table: list[GGMLTensor] = []
    while pos < size:
        if len(table) >= MAX_TENSORS:
            raise _fail(path, f"more than {MAX_TENSORS} tensors; not a GPT-J GGML file")
        n_dims, name_len, ttype = read_i32(3, f"the header of tensor {len(table)}")
        if not 1 <= n_dims <= 4:
            raise _fail(path, f"tensor {len(table)} has {n_dims} dims (corrupt file)")
        if not 0 < name_len <= MAX_NAME:
            raise _fail(path, f"tensor {len(table)} has a name of {name_len} bytes (corrupt file)")
        ne = read_i32(n_dims, f"the dims of tensor {len(table)}")
        if pos + name_len > size:
            raise _fail(path, f"truncated GGML file: it ends inside the name of tensor {len(table)}")
        raw_name = bytes(mapped[pos : pos + name_len])
        pos += name_len
        name = raw_name.decode("utf-8", errors="replace")
        if any(n <= 0 for n in ne):
            raise _fail(path, f"tensor {name!r} has dims {list(ne)} (corrupt file)")
        try:
            values, block_bytes = block_layout(ttype, version)
        except KeyError:
            known = ", ".join(TYPE_NAMES[t] for t in TYPE_NAMES if _known(t, version))
            raise _fail(path, f"tensor {name!r} has ggml type {TYPE_NAMES.get(ttype, ttype)}, which a quantization "
                              f"version {version} file cannot hold (known: {known})") from None
        if ne[0] % values:
            raise _fail(path, f"tensor {name!r}: rows of {ne[0]} values do not split into blocks of {values}")
        n = int(np.prod(ne, dtype=np.int64))
        nbytes = n // values * block_bytes
        if pos + nbytes > size:
            raise _fail(path, f"truncated GGML file: tensor {name!r} needs {nbytes} bytes at byte {pos}, "
                              f"the file has {size - pos} left")
        table.append(GGMLTensor(name, ttype, tuple(reversed(ne)), pos, nbytes))
        pos += nbytes

    config, transposed = _config(path, hparams, table)
    return GGMLModel(path, data, hparams, version, pieces, table, config, transposed)


def _known(ttype: int, version: int) -> bool:
    try:
        block_layout(ttype, version)
        return True
    except KeyError:
        return False


def _config(path: Path, hparams: dict[str, int], table: list[GGMLTensor]) -> tuple[dict[str, Any], bool]:
    """The GPTJConfig dict of the header (checked), and whether the file is of the first,
    transposed kind; tensors that are not GPT-J's are refused here."""
    from gptj.models.gptj import skip_checkpoint_key

    names = [t.name for t in table]
    strange = [n for n in names if not (n.startswith(("transformer.", "lm_head.")) or skip_checkpoint_key(n))]
    if strange:
        raise _fail(path, f"not a GPT-J GGML file: it holds tensor {strange[0]!r} (only ggml's gpt-j example "
                          "format is supported)")
    by_name = {t.name: t for t in table}
    fc_in = by_name.get("transformer.h.0.mlp.fc_in.weight")
    n_embd = hparams["n_embd"]
    transposed = False
    n_inner = None
    if fc_in is not None and len(fc_in.shape) == 2:
        rows, cols = fc_in.shape
        transposed = rows == n_embd and cols != n_embd
        n_inner = cols if transposed else rows
    config = {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "activation_function": "gelu_new",
        "vocab_size": hparams["n_vocab"],
        "n_positions": hparams["n_ctx"],
        "n_embd": n_embd,
        "n_head": hparams["n_head"],
        "n_layer": hparams["n_layer"],
        "rotary_dim": hparams["n_rot"],
        "n_inner": n_inner,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 50256 if hparams["n_vocab"] > 50256 else None,
        "eos_token_id": 50256 if hparams["n_vocab"] > 50256 else None,
    }
    validate_config("gptj", config, path, GGML_KEYS)
    return config, transposed
