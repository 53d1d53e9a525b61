"""Read llama.cpp GGUF files: metadata, a Hugging Face style config and the weights, tensor by
tensor from the memory map.

Parsing is the `gguf` package's memory-mapped `GGUFReader`: opening a file reads its metadata
and tensor table only. `open_gguf` checks everything that can be checked without reading a
weight (architecture, names, tensor types, each tensor's byte size against its shape) so that
the loader can build the model and run the memory check before the first tensor is
dequantized; `GGUFModel.tensors()` then yields the weights one at a time.

Tensor types: F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are dequantized here in torch, a few
vectorised ops per block of rows; every other type the `gguf` package can dequantize (the
K-quants Q2_K..Q6_K of Q4_K_M / Q5_K_M / Q6_K files, Q5_0, Q5_1, the IQ types, TQ, MXFP4)
goes through `gguf.quants.dequantize`, in chunks of rows, so no tensor is ever held twice in
float32. Architectures: `llama` (Llama 1-3, TinyLlama, SmolLM2, Mistral, ...) and `gptj`.

Two llama.cpp conventions are undone so the weights load into `gptj.models.llama.Llama`
(and transformers' LlamaForCausalLM) unchanged:
  * shapes are stored in ggml `ne` order (fastest dimension first): reversed here;
  * the converter permutes the rows of the q and k projections of every head so that
    ggml's rope, which rotates adjacent pairs (2i, 2i+1), matches HF's "rotate_half"
    pairs (i, i + head_dim/2). `unpermute_qk` inverts `LlamaModel.permute`.
GPT-J rotates adjacent pairs itself (ggml's "normal" rope), so its q and k are stored as they are.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from gptj.errors import ModelLoadError
from gptj.loading.config import validate_config
from gptj.loading.weights import release_mapped_pages
from gptj.tokenizer import bundled_gguf_path as bundled_gguf_path  # one definition, also named here

# gguf name (without ".weight"/".bias") -> HF name; "{n}" is the layer index.
_NAMES = {
    "llama": {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
        "blk.{n}.attn_norm": "model.layers.{n}.input_layernorm",
        "blk.{n}.attn_q": "model.layers.{n}.self_attn.q_proj",
        "blk.{n}.attn_k": "model.layers.{n}.self_attn.k_proj",
        "blk.{n}.attn_v": "model.layers.{n}.self_attn.v_proj",
        "blk.{n}.attn_output": "model.layers.{n}.self_attn.o_proj",
        "blk.{n}.ffn_norm": "model.layers.{n}.post_attention_layernorm",
        "blk.{n}.ffn_gate": "model.layers.{n}.mlp.gate_proj",
        "blk.{n}.ffn_up": "model.layers.{n}.mlp.up_proj",
        "blk.{n}.ffn_down": "model.layers.{n}.mlp.down_proj",
    },
    # gguf-py's MODEL_TENSORS[MODEL_ARCH.GPTJ] and its tensor_mapping for the HF names
    "gptj": {
        "token_embd": "transformer.wte",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
        "blk.{n}.attn_norm": "transformer.h.{n}.ln_1",
        "blk.{n}.attn_q": "transformer.h.{n}.attn.q_proj",
        "blk.{n}.attn_k": "transformer.h.{n}.attn.k_proj",
        "blk.{n}.attn_v": "transformer.h.{n}.attn.v_proj",
        "blk.{n}.attn_output": "transformer.h.{n}.attn.out_proj",
        "blk.{n}.ffn_up": "transformer.h.{n}.mlp.fc_in",
        "blk.{n}.ffn_down": "transformer.h.{n}.mlp.fc_out",
    },
}
ARCHITECTURES = tuple(_NAMES)
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")

# Dequantized here in torch; any other type goes through gguf.quants (see readable_type).
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1)
_CHUNK_VALUES = 1 << 22  # values dequantized at once (16 MB of float32)

# The metadata key behind each config field, so that errors name what the file holds.
GGUF_KEYS = {
    "vocab_size": "llama.vocab_size",
    "hidden_size": "llama.embedding_length",
    "intermediate_size": "llama.feed_forward_length",
    "num_hidden_layers": "llama.block_count",
    "num_attention_heads": "llama.attention.head_count",
    "num_key_value_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length",
    "max_position_embeddings": "llama.context_length",
    "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
}
GPTJ_GGUF_KEYS = {
    "vocab_size": "gptj.vocab_size",
    "n_positions": "gptj.context_length",
    "n_embd": "gptj.embedding_length",
    "n_inner": "gptj.feed_forward_length",
    "n_layer": "gptj.block_count",
    "n_head": "gptj.attention.head_count",
    "rotary_dim": "gptj.rope.dimension_count",
    "layer_norm_epsilon": "gptj.attention.layer_norm_epsilon",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
}
_REQUIRED_KEYS = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


def gguf_keys(arch: str) -> dict[str, str]:
    return GPTJ_GGUF_KEYS if arch == "gptj" else GGUF_KEYS


class _Reader(gguf.GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memmap instead of the memmap.

    Slicing an np.memmap runs its Python-level __array_finalize__ on every slice; the
    reader slices once per token and merge string (~100k for SmolLM2), which made parsing
    take ~2 s instead of ~0.7 s. The view shares the mapping, so nothing is copied."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)


def _open(path: Path) -> _Reader:
    try:
        # mode "c" (copy on write): writable arrays, so torch.from_numpy does not warn;
        # nothing is ever written.
        reader = _Reader(path, mode="c")
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from e
    except Exception as e:  # the reader raises whatever a short or garbled file trips
        raise ModelLoadError(f"{path}: not a valid GGUF file or truncated ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise ModelLoadError(f"{path}: big-endian GGUF files are not supported")
    return reader


def _metadata(reader: _Reader, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        try:
            value = field.contents()  # str, int, float, bool, or a list of those
            if field.types == [gguf.GGUFValueType.FLOAT32]:
                # Shortest decimal that round-trips in float32: 1e-05, not 9.999999747378752e-06.
                value = float(str(np.float32(value)))
            meta[key] = value
        except Exception as e:
            raise ModelLoadError(f"{path}: corrupt metadata value {key!r} ({e})") from e
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata (e.g. to build the tokenizer), as plain Python values."""
    path = Path(path)
    return _metadata(_open(path), path)


@functools.cache
def readable_type(kind: int) -> bool:
    """Whether a weight of this ggml type can be dequantized (here or by gguf.quants): one
    block of zeros is tried, so whatever the installed gguf package learns is taken."""
    try:
        kind = T(kind)
        if kind in SUPPORTED_TYPES:
            return True
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), kind)
        return True
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return False


def readable_types() -> list[str]:
    return [k.name for k in T if readable_type(k)]


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 tensor of `shape` (torch order) from the raw bytes (uint8) of one tensor, for the
    types of SUPPORTED_TYPES.

    Block layouts as in ggml-common.h, 32 elements per block:
      Q8_0: fp16 d, 32 x int8 q                 x = d * q
      Q4_0: fp16 d, 16 bytes of nibbles         x = d * (q - 8)
      Q4_1: fp16 d, fp16 m, 16 bytes of nibbles x = d * q + m
    byte j holds element j in its low nibble and element j + 16 in its high nibble."""
    kind = T(ggml_type)
    raw = raw.reshape(-1)
    if kind == T.F32:
        return raw.view(torch.float32).reshape(shape)
    if kind in (T.F16, T.BF16):
        return raw.view(torch.float16 if kind == T.F16 else torch.bfloat16).float().reshape(shape)
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"tensor type {kind.name} is not supported")
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    blocks = raw.view(-1, block_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # [n_blocks, 1]
    # One float32 output, filled and scaled in place: the tensors are large and every fresh
    # allocation costs a pass of page faults. Same operation order as gguf.quants, so the
    # result is bit-identical to its numpy reference.
    out = torch.empty(blocks.shape[0], 32, dtype=torch.float32)
    if kind == T.Q8_0:
        out.copy_(blocks[:, 2:].view(torch.int8))
        return out.mul_(d).reshape(shape)
    nibbles = blocks[:, 4:] if kind == T.Q4_1 else blocks[:, 2:]
    out[:, :16] = nibbles & 0x0F
    out[:, 16:] = nibbles >> 4
    if kind == T.Q4_0:
        return out.sub_(8.0).mul_(d).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return out.mul_(d).add_(m).reshape(shape)


def dequantize_into(out: torch.Tensor, raw: np.ndarray, kind: int) -> torch.Tensor:
    """Fills `out` (any float dtype, rows of ne[0] values in its last dimension) from the raw
    bytes of a tensor of ggml type `kind`, a chunk of rows at a time: at most _CHUNK_VALUES
    float32 values exist besides `out`."""
    kind = T(kind)
    row_len = out.shape[-1] if out.dim() else 1
    rows = out.numel() // max(row_len, 1)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if rows == 0 or row_len == 0:
        return out
    raw = raw.reshape(rows, -1)
    flat = out.reshape(rows, row_len)
    step = max(1, _CHUNK_VALUES // row_len)
    for r0 in range(0, rows, step):
        part = raw[r0 : r0 + step]
        if kind in SUPPORTED_TYPES:
            values = dequantize(torch.from_numpy(part), kind, (part.shape[0], row_len))
        else:
            values = torch.from_numpy(gguf.quants.dequantize(part, kind).reshape(part.shape[0], row_len))
        flat[r0 : r0 + step].copy_(values)
    return out


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` of a q or k projection ([n_heads*head_dim, in]).

    The converter moved row (h, j*head_dim/2 + i) to (h, 2i + j), i.e. it interleaved the two
    halves of each head; this puts the halves back (n_heads = kv heads for k)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (what convert_hf_to_gguf writes): the inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(name: str, arch: str = "llama") -> str:
    """HF state-dict name of a GGUF tensor (`blk.3.attn_q.weight` -> ...q_proj.weight)."""
    names = _NAMES[arch]
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise KeyError(name)
    layer = _LAYER.fullmatch(stem)
    if layer:
        target = names.get("blk.{n}." + layer.group(2))
        if target:
            return target.format(n=layer.group(1)) + "." + suffix
    elif stem in names:
        return names[stem] + "." + suffix
    raise KeyError(name)


def gguf_name(name: str, arch: str = "llama") -> str:
    """The GGUF name of an HF state-dict name (the inverse of hf_name)."""
    stem, _, suffix = name.rpartition(".")
    for g, h in _NAMES[arch].items():
        pattern = re.escape(h).replace(re.escape("{n}"), r"(\d+)")
        if m := re.fullmatch(pattern, stem):
            return g.format(n=m.group(1)) + "." + suffix if m.groups() else g + "." + suffix
    raise KeyError(name)


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str] | None = None,
                         source: str | Path = "GGUF") -> dict[str, Any]:
    """A transformers config-style dict (LlamaConfig or GPTJConfig) from the `llama.*` / `gptj.*`
    metadata keys; its values are checked by gptj.loading.config.validate_config (open_gguf
    does), not here.

    `tensor_names` (GGUF names) decides `tie_word_embeddings`: no `output.weight`, tied."""
    arch = meta.get("general.architecture")
    if arch not in _NAMES:
        raise ModelLoadError(f"{source}: GGUF architecture {arch!r} is not supported (only "
                             f"{', '.join(repr(a) for a in _NAMES)})")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    missing = [f"{arch}.{k}" for k in _REQUIRED_KEYS if get(k) is None]
    if missing:
        raise ModelLoadError(f"{source}: the GGUF metadata lacks {', '.join(missing)}")
    n_head = get("attention.head_count")
    if isinstance(n_head, list) or isinstance(get("attention.head_count_kv"), list):
        raise ModelLoadError(f"{source}: per-layer head counts are not supported")
    hidden = get("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    names = tensor_names or set()
    if arch == "gptj":
        return {
            "architectures": ["GPTJForCausalLM"],
            "model_type": "gptj",
            "activation_function": "gelu_new",
            "vocab_size": vocab,
            "n_positions": get("context_length", 2048),
            "n_embd": hidden,
            "n_inner": get("feed_forward_length"),
            "n_layer": get("block_count"),
            "n_head": n_head,
            "rotary_dim": get("rope.dimension_count"),
            "layer_norm_epsilon": get("attention.layer_norm_epsilon", 1e-5),
            "tie_word_embeddings": False,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        }
    head_dim = get("attention.key_length")
    if head_dim is None and _positive_int(hidden) and _positive_int(n_head):
        head_dim = hidden // n_head  # otherwise validate_config names the bad value
    rope_dims = get("rope.dimension_count", head_dim)
    if head_dim is not None and rope_dims != head_dim:
        raise ModelLoadError(f"{source}: partial rotary ({rope_dims} of {head_dim} dims) is not supported")
    rope_scaling: dict[str, Any] | None = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type != "none":
        rope_scaling = {"rope_type": str(scaling_type), "factor": get("rope.scaling.factor")}
    elif "rope_freqs.weight" in names:
        # Llama 3.1+ files carry their rope scaling as per-frequency factors only.
        rope_scaling = {"rope_type": "llama3", "source": "GGUF rope_freqs.weight"}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _float(get("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _float(value: Any) -> Any:
    """float(value) for a number; anything else as it is, for validate_config to name."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


@dataclass
class TensorEntry:
    """One weight of a GGUF file, not yet read: its names, ggml type, torch-order shape and
    the raw bytes (a view of the memory map)."""

    gguf_name: str
    name: str
    kind: T
    shape: tuple[int, ...]
    raw: np.ndarray


class GGUFModel:
    """A GGUF file opened for loading: metadata, the config (validated) and its tensor table
    checked; no weight read yet. `tensors()` yields them, dequantized one at a time."""

    def __init__(self, path: Path, reader: _Reader, meta: dict[str, Any], config: dict[str, Any],
                 entries: list[TensorEntry]) -> None:
        self.path, self.reader, self.meta, self.config, self.entries = path, reader, meta, config, entries
        self.arch: str = config["model_type"]
        self.keys = gguf_keys(self.arch)

    @property
    def tensor_types(self) -> list[str]:
        """The ggml types of the weights, most common first (e.g. ['Q4_K', 'Q6_K', 'F32'])."""
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.kind.name] = counts.get(e.kind.name, 0) + e.raw.size
        return sorted(counts, key=counts.__getitem__, reverse=True)

    def tensors(self, dtype: torch.dtype = torch.float32, expected: Mapping[str, tuple[int, ...]] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in `dtype`) for each weight, dequantized as it is reached. With
        `expected` (name -> shape, the model's), a tensor of another shape is refused before it
        is read. F32 tensors read as float32 share memory with the (copy-on-write) mapping."""
        heads = {}
        if self.arch == "llama":
            heads = {"attn_q": self.config["num_attention_heads"],
                     "attn_k": self.config["num_key_value_heads"] or self.config["num_attention_heads"]}
        for e in self.entries:
            if expected is not None and e.name in expected and tuple(expected[e.name]) != e.shape:
                raise ModelLoadError(f"{self.path}: tensor {e.gguf_name!r} has shape {list(e.shape)}, "
                                     f"the metadata says {list(expected[e.name])}")
            try:
                if e.kind == T.F32 and dtype == torch.float32:
                    w = torch.from_numpy(e.raw.reshape(-1).view(np.float32)).reshape(e.shape)
                else:
                    w = dequantize_into(torch.empty(e.shape, dtype=dtype), e.raw, e.kind)
                    # the file's pages of this tensor are done with: out of this process's memory
                    release_mapped_pages(torch.from_numpy(e.raw.reshape(-1).view(np.uint8)))
                kind = e.gguf_name.split(".")[-2]
                if kind in heads:
                    w = unpermute_qk(w, heads[kind])
            except (ValueError, RuntimeError) as exc:  # a shape that does not match the data
                raise ModelLoadError(f"{self.path}: tensor {e.gguf_name!r} is truncated or corrupt "
                                     f"({type(exc).__name__}: {exc})") from exc
            yield e.name, w


def open_gguf(path: str | Path) -> GGUFModel:
    """Opens a GGUF file for loading and checks all but the weights' values: the metadata and the
    config made from it (validate_config), each tensor's name, type and byte size. Raises a
    ModelLoadError that names the file and the problem."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    names = {t.name for t in reader.tensors}
    config = config_from_metadata(meta, names, path)
    arch = config["model_type"]
    validate_config(arch, config, path, gguf_keys(arch))  # before any tensor is read
    entries: list[TensorEntry] = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # recorded as rope_scaling in the config
            continue
        try:
            name = hf_name(t.name, arch)
        except KeyError:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name!r} for a {arch} model") from None
        kind = T(t.tensor_type)
        if not readable_type(kind):
            raise ModelLoadError(f"{path}: tensor {t.name!r} has type {kind.name}, which cannot be read; "
                                 f"readable: {', '.join(readable_types())}")
        shape = tuple(reversed([int(n) for n in t.shape]))
        block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = t.data
        nbytes = raw.size * raw.itemsize
        if not shape or shape[-1] % block_size or n // block_size * type_size != nbytes:
            raise ModelLoadError(f"{path}: tensor {t.name!r} ({kind.name}, shape {list(shape)}) is truncated or "
                                 f"corrupt: {nbytes} bytes of data")
        entries.append(TensorEntry(t.name, name, kind, shape, raw))
    return GGUFModel(path, reader, meta, config, entries)


def read_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, HF-style config dict, HF-named state dict in `dtype`) of a GGUF file, all
    tensors read (the loader streams them with open_gguf instead).

    F32 tensors read as float32 share memory with the (copy-on-write) file mapping."""
    model = open_gguf(path)
    return model.meta, model.config, dict(model.tensors(dtype))
