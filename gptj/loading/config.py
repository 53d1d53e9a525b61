"""Model configs (config.json, GGUF metadata) checked before anything is built: types,
positivity, divisibility and upper bounds, each error naming the file and the field."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

from gptj.errors import ModelLoadError
from gptj.models.gptj import GPTJ, GPTJConfig
from gptj.models.llama import Llama, LlamaConfig

ARCHITECTURES = {"gptj": (GPTJ, GPTJConfig), "llama": (Llama, LlamaConfig)}

# Upper bounds for config sizes: above every released model, low enough that a hostile config
# is refused before anything is built (n_layer: 1000000 would build for minutes).
MAX_LAYERS = 512
MAX_HIDDEN = 65536
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_FFN = 2**18
MAX_VOCAB = 2**21
MAX_POSITIONS = 2**20
MAX_CONFIG_BYTES = 16 << 20  # real config.json files are a few KB


def read_config(path: Path) -> dict:
    """config.json as a dict; a file too big, not JSON or not an object is a ModelLoadError."""
    if not path.is_file():  # a folder, or a FIFO that would block the read for ever
        raise ModelLoadError(f"{path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{path} is too large ({size} bytes; at most {MAX_CONFIG_BYTES}, MAX_CONFIG_BYTES)")
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: must be a JSON object, got {type(config).__name__}")
    return config


# (field, upper bound, the bound's name) of the sizes each architecture's config must give as
# positive integers; a missing one takes the dataclass default. Optional ones may be null.
_SIZES = {
    "gptj": [("vocab_size", MAX_VOCAB, "MAX_VOCAB"), ("n_positions", MAX_POSITIONS, "MAX_POSITIONS"),
             ("n_embd", MAX_HIDDEN, "MAX_HIDDEN"), ("n_layer", MAX_LAYERS, "MAX_LAYERS"),
             ("n_head", MAX_HEADS, "MAX_HEADS")],
    "llama": [("vocab_size", MAX_VOCAB, "MAX_VOCAB"), ("max_position_embeddings", MAX_POSITIONS, "MAX_POSITIONS"),
              ("hidden_size", MAX_HIDDEN, "MAX_HIDDEN"), ("intermediate_size", MAX_FFN, "MAX_FFN"),
              ("num_hidden_layers", MAX_LAYERS, "MAX_LAYERS"), ("num_attention_heads", MAX_HEADS, "MAX_HEADS")],
}
_OPTIONAL_SIZES = {
    "gptj": [("n_inner", MAX_FFN, "MAX_FFN"), ("rotary_dim", MAX_HEAD_DIM, "MAX_HEAD_DIM")],
    "llama": [("num_key_value_heads", MAX_HEADS, "MAX_HEADS"), ("head_dim", MAX_HEAD_DIM, "MAX_HEAD_DIM")],
}
_POSITIVE_NUMBERS = {"gptj": ["layer_norm_epsilon"], "llama": ["rms_norm_eps", "rope_theta"]}


def validate_config(arch: str, config: Mapping, source: str | Path, names: Mapping[str, str] | None = None) -> None:
    """Checks a config dict (config.json, or one made from GGUF metadata) before anything is built
    from it: types, signs, divisibility and the MAX_* bounds. The ModelLoadError names `source` and
    the field (`names` maps a field to what the source calls it, e.g. a GGUF metadata key)."""
    if not isinstance(config, Mapping):
        raise ModelLoadError(f"{source}: must be a JSON object, got {type(config).__name__}")

    def name(field: str) -> str:
        return (names or {}).get(field, field)

    def fail(message: str) -> ModelLoadError:
        return ModelLoadError(f"{source}: {message}")

    _, cfg_cls = ARCHITECTURES[arch]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg_cls)}
    given = {k: v for k, v in config.items() if v is not None}
    sizes: dict[str, int | None] = {}
    for field, limit, limit_name in _SIZES[arch] + _OPTIONAL_SIZES[arch]:
        value = given.get(field, defaults.get(field))
        sizes[field] = value
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise fail(f"{name(field)} must be a positive integer, got {value!r}")
        if value > limit:
            raise fail(f"{name(field)} must be at most {limit} ({limit_name}), got {value}")
    for field in _POSITIVE_NUMBERS[arch]:
        value = given.get(field, defaults.get(field))
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise fail(f"{name(field)} must be a positive number, got {value!r}")

    def multiple(a: str, b: str) -> None:
        if sizes[a] % sizes[b]:
            raise fail(f"{name(a)} ({sizes[a]}) must be a multiple of {name(b)} ({sizes[b]})")

    if arch == "gptj":
        multiple("n_embd", "n_head")
        head_dim = sizes["n_embd"] // sizes["n_head"]
        rotary = given.get("rotary_dim")  # when absent: the default, cut to the head size by from_dict
        if rotary is not None and (rotary % 2 or rotary > head_dim):
            raise fail(f"{name('rotary_dim')} must be even and at most the head size ({head_dim}), got {rotary}")
    else:
        if sizes["head_dim"] is None:
            multiple("hidden_size", "num_attention_heads")
        head_dim = sizes["head_dim"] or sizes["hidden_size"] // sizes["num_attention_heads"]
        if head_dim % 2:  # rotate_half pairs the two halves of each head
            raise fail(f"{name('head_dim')} must be even, got {head_dim}")
        if sizes["num_key_value_heads"] is not None:
            multiple("num_attention_heads", "num_key_value_heads")
        rope = config.get("rope_parameters")
        if rope is not None and not isinstance(rope, Mapping):
            raise fail(f"{name('rope_parameters')} must be a JSON object, got {type(rope).__name__}")
        theta = (rope or {}).get("rope_theta")
        if theta is not None and (not isinstance(theta, int | float) or isinstance(theta, bool)
                                  or not math.isfinite(theta) or theta <= 0):
            raise fail(f"rope_parameters.rope_theta must be a positive number, got {theta!r}")
    for field in ("bos_token_id", "eos_token_id"):
        value = given.get(field)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise fail(f"{name(field)} must be a token id (or a list of them), got {value!r}")
    quant = config.get("quantization_config")
    if quant is not None:
        if not isinstance(quant, Mapping):
            raise fail(f"quantization_config must be a JSON object, got {type(quant).__name__}")
        if quant.get("mode") not in (None, "int8", "int4"):
            raise fail(f"quantization_config.mode must be 'int8' or 'int4', got {quant.get('mode')!r}")
