"""The errors every layer may raise and every surface turns into a message: one module at the
bottom of the house, importing nothing of the package, so any module can use them."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A setting or input out of range. `field` names it so APIs can point at it (a 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelLoadError(ValueError):
    """A model that cannot be loaded: not found, broken, or not supported."""


class ModelTooLarge(ModelLoadError, MemoryError):
    """The model would not fit in the memory available (or --max-memory)."""


class KVCacheTooLarge(ModelTooLarge):
    """The KV cache for the asked rows and context would not fit in the memory available."""
