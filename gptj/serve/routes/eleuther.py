"""EleutherAI's own APIs for GPT-J: mesh-transformer-jax's `POST /complete` and the old hosted
`POST /completion`, over either backend."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gptj.serve.backends import Backend
from gptj.serve.protocol import CompleteBody, HostedCompletionBody


def router(backend: Backend) -> APIRouter:
    router = APIRouter()

    @router.post("/complete")
    async def complete(body: CompleteBody, request: Request) -> dict:
        """mesh-transformer-jax's server: the continuation only, 512 tokens by default."""
        return {"completion": await backend.generate_text(request, body.context, body.temp, body.top_p, body.length)}

    @router.post("/completion")
    async def hosted_completion(body: HostedCompletionBody, request: Request) -> list[dict]:
        """The old hosted API: a list with one generated_text, the context included unless remove_input."""
        text = await backend.generate_text(request, body.context, body.temp, body.top_p, body.response_length)
        return [{"generated_text": text if body.remove_input else body.context + text}]

    return router
