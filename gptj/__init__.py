"""GPT-J Studio: run GPT-J (and the bundled SmolLM2) on your own machine.

The names below load on first use (PEP 562): `import gptj` and the `gptj` command's
`--help`, `presets` or `models` never import torch, which alone takes seconds."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from gptj.api import Model, load, sampling_params
    from gptj.errors import InvalidRequest, ModelLoadError, ModelTooLarge
    from gptj.runtime.engine import Completion
    from gptj.runtime.sampling import SamplingParams
    from gptj.tokenizer import Tokenizer, load_tokenizer

# name -> the module that defines it
_LAZY = {
    "Completion": "gptj.runtime.engine",
    "InvalidRequest": "gptj.errors",
    "Model": "gptj.api",
    "ModelLoadError": "gptj.errors",
    "ModelTooLarge": "gptj.errors",
    "SamplingParams": "gptj.runtime.sampling",
    "Tokenizer": "gptj.tokenizer",
    "load": "gptj.api",
    "load_tokenizer": "gptj.tokenizer",
    "sampling_params": "gptj.api",
}

__all__ = [
    "Completion",
    "InvalidRequest",
    "Model",
    "ModelLoadError",
    "ModelTooLarge",
    "SamplingParams",
    "Tokenizer",
    "load",
    "load_tokenizer",
    "sampling_params",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gptj' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
