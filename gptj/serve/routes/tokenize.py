"""/tokenize and /detokenize (llama.cpp's and vLLM's names for the text field too)."""

from __future__ import annotations

from fastapi import APIRouter

from gptj.serve.backends import Backend
from gptj.serve.guard import APIError
from gptj.serve.protocol import DetokenizeBody, TokenizeBody


def router(backend: Backend) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict:
        text = body.text if body.text is not None else body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "text: required (the text to split into tokens)", "text")
        return await backend.tokenize(body, text)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict:
        return await backend.detokenize(body)

    return router
