"""Read llama.cpp GGUF files: metadata, a Hugging Face style config and a state dict.

Parsing is the `gguf` package's memory-mapped `GGUFReader`; dequantisation is done here in
torch, a few vectorised ops per tensor. Supported tensor types: F32, F16, BF16, Q8_0, Q4_0,
Q4_1. Only the `llama` architecture is mapped (Llama, SmolLM2, TinyLlama, ...).

Two llama.cpp conventions are undone so the weights load into `gptj.models.llama.Llama`
(and transformers' LlamaForCausalLM) unchanged:
  * shapes are stored in ggml `ne` order (fastest dimension first): reversed here;
  * the converter permutes the rows of the q and k projections of every head so that
    ggml's rope, which rotates adjacent pairs (2i, 2i+1), matches HF's "rotate_half"
    pairs (i, i + head_dim/2). `unpermute_qk` inverts `LlamaModel.permute`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from gptj.errors import ModelLoadError
from gptj.loading.config import validate_config
from gptj.tokenizer import bundled_gguf_path as bundled_gguf_path  # one definition, also named here

# gguf name (without ".weight") -> HF name (without ".weight"); "{n}" is the layer index.
_NAMES = {
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
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")

SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1)
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
_REQUIRED_KEYS = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


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


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 tensor of `shape` (torch order) from the raw bytes (uint8) of one tensor.

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


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` of a q or k projection ([n_heads*head_dim, in]).

    The converter moved row (h, j*head_dim/2 + i) to (h, 2i + j), i.e. it interleaved the two
    halves of each head; this puts the halves back (n_heads = kv heads for k)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    """HF state-dict name of a llama GGUF tensor (`blk.3.attn_q.weight` -> ...q_proj.weight)."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise KeyError(name)
    layer = _LAYER.fullmatch(stem)
    if layer:
        target = _NAMES.get("blk.{n}." + layer.group(2))
        if target:
            return target.format(n=layer.group(1)) + "." + suffix
    elif stem in _NAMES:
        return _NAMES[stem] + "." + suffix
    raise KeyError(name)


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str] | None = None,
                         source: str | Path = "GGUF") -> dict[str, Any]:
    """A transformers LlamaConfig-style dict from `llama.*` metadata keys; its values are checked
    by gptj.loading.config.validate_config (read_gguf does), not here.

    `tensor_names` (GGUF names) decides `tie_word_embeddings`: no `output.weight`, tied."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{source}: GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    missing = [f"{arch}.{k}" for k in _REQUIRED_KEYS if get(k) is None]
    if missing:
        raise ModelLoadError(f"{source}: the GGUF metadata lacks {', '.join(missing)}")
    n_head = get("attention.head_count")
    if isinstance(n_head, list) or isinstance(get("attention.head_count_kv"), list):
        raise ModelLoadError(f"{source}: per-layer head counts are not supported")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length")
    if head_dim is None and _positive_int(hidden) and _positive_int(n_head):
        head_dim = hidden // n_head  # otherwise validate_config names the bad value
    rope_dims = get("rope.dimension_count", head_dim)
    if head_dim is not None and rope_dims != head_dim:
        raise ModelLoadError(f"{source}: partial rotary ({rope_dims} of {head_dim} dims) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    names = tensor_names or set()
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


def read_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, HF-style config dict, HF-named state dict in `dtype`) of a llama GGUF file.

    F32 tensors read as float32 share memory with the (copy-on-write) file mapping."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    names = {t.name for t in reader.tensors}
    config = config_from_metadata(meta, names, path)
    validate_config("llama", config, path, GGUF_KEYS)  # before any tensor is read
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # recorded as rope_scaling in the config
            continue
        try:
            name = hf_name(t.name)
        except KeyError:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name!r} for a llama model") from None
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; supported: "
                + ", ".join(k.name for k in SUPPORTED_TYPES)
            )
        try:
            shape = tuple(reversed([int(n) for n in t.shape]))
            raw = torch.from_numpy(t.data).reshape(-1).view(torch.uint8)
            w = dequantize(raw, t.tensor_type, shape)
            kind = t.name.split(".")[-2]
            if kind in heads:
                w = unpermute_qk(w, heads[kind])
        except (ValueError, RuntimeError) as e:  # data cut short, or a shape that does not match it
            raise ModelLoadError(f"{path}: tensor {t.name!r} is truncated or corrupt ({type(e).__name__}: {e})") from e
        state[name] = w.to(dtype)
    return meta, config, state
