"""What the routers need of whatever generates: this machine's engine (local) or another
OpenAI-compatible server (upstream). Routers written against it work in both modes."""

from __future__ import annotations

from typing import Protocol

from fastapi import Request

from gptj.serve.protocol import DetokenizeBody, TokenizeBody


class Backend(Protocol):
    async def health(self) -> dict: ...

    async def info(self) -> dict: ...

    def metrics_text(self) -> str: ...

    async def tokenize(self, body: TokenizeBody, text: str) -> dict: ...

    async def detokenize(self, body: DetokenizeBody) -> dict: ...

    async def generate_text(self, request: Request, context: str, temp: float, top_p: float, length: int) -> str: ...
