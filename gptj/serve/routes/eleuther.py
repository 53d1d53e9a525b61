"""EleutherAI's own APIs for GPT-J: mesh-transformer-jax's `POST /complete` and the old hosted
`POST /completion`, over either backend. `POST /completion` is llama.cpp's too: a body with
`prompt` and no `context` is answered by gptj.serve.routes.llamacpp."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gptj.serve.backends import Backend
from gptj.serve.protocol import CompleteBody, HostedCompletionBody
from gptj.serve.routes import llamacpp
from gptj.serve.routes.common import json_body, validated


def router(backend: Backend) -> APIRouter:
    router = APIRouter()

    @router.post("/complete")
    async def complete(body: CompleteBody, request: Request) -> dict:
        """mesh-transformer-jax's server: the continuation only, 512 tokens by default."""
        text = await backend.generate_text(request, body.context, body.temp, body.top_p, body.length, body.token_healing)
        return {"completion": text}

    @router.post("/completion", openapi_extra=llamacpp.openapi_body())
    async def hosted_completion(request: Request) -> Response:
        """The old hosted API: a list with one generated_text, the context included unless
        remove_input. A body with `prompt` and no `context` is llama.cpp's /completion."""
        data = await json_body(request)
        if llamacpp.is_llamacpp(data):
            return await llamacpp.completion(backend, data, request)
        body = validated(HostedCompletionBody, data)
        text = await backend.generate_text(request, body.context, body.temp, body.top_p, body.response_length,
                                           body.token_healing)
        return JSONResponse([{"generated_text": text if body.remove_input else body.context + text}])

    return router
