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


class Unavailable(RuntimeError):
    """No place for the request now; try again later (a 503 with Retry-After)."""


class QueueFull(Unavailable):
    """The batch is full and `limit` requests are already waiting."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"queue full ({limit} requests waiting), try again later")
        self.limit = limit


class ShuttingDown(Unavailable):
    """The engine is shutting down and takes no new requests."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down, try again later")
