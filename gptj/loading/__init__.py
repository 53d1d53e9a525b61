"""Finding and loading checkpoints: Hugging Face folders (pytorch_model.bin, safetensors,
sharded), repo ids from the local Hugging Face cache (`owner/name:Q4_K_M` for a pulled GGUF), GGUF
files of any ggml type (gptj/loading/gguf.py) and legacy GGML GPT-J files (gptj/loading/ggml.py).

Weights stream tensor by tensor into a model built on the meta device: no full float32 copy
is ever made, safetensors and zip pickles are memory-mapped, and a weight that is to be
quantized is quantized as it arrives (gptj/loading/loader.py).

The loader's names load on first use (PEP 562): torch takes seconds to import, and what needs
no model (`gptj models`, `gptj pull`, the catalog and the hub) should not wait for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported now, not lazily: `resolve` is also a submodule's name, and the function must win
# (importing gptj.loading.resolve later would otherwise leave the module under that name).
from gptj.loading.resolve import INCOMPLETE_MARKER, hf_cache_dir, resolve

if TYPE_CHECKING:
    from gptj.loading.loader import QUANT_MODES, ModelInfo, build, default_dtype, file_kind, load_model
    from gptj.memory import bytes_per_weight

__all__ = ["INCOMPLETE_MARKER", "QUANT_MODES", "ModelInfo", "build", "bytes_per_weight", "default_dtype", "file_kind",
           "hf_cache_dir", "load_model", "resolve"]

# name -> the module that defines it
_LAZY = {
    "QUANT_MODES": "gptj.loading.loader",
    "ModelInfo": "gptj.loading.loader",
    "build": "gptj.loading.loader",
    "default_dtype": "gptj.loading.loader",
    "file_kind": "gptj.loading.loader",
    "load_model": "gptj.loading.loader",
    "bytes_per_weight": "gptj.memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gptj.loading' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
