"""/tokenize and /detokenize, with llama.cpp's and vLLM's field names too.

/tokenize: the text as `text`, `prompt` (vLLM's) or `content` (llama.cpp's). `add_special`
(llama.cpp's; vLLM's `add_special_tokens`) puts the BOS token first; `parse_special` (llama.cpp's)
turns special-token text such as `<|im_start|>` into its id, by default when the text comes as
`content` or `add_special` is set (its meaning here before llama.cpp's was followed) and not
otherwise. `with_pieces` (llama.cpp's) answers `tokens` as `[{id, piece}]`. /detokenize answers
`content` (llama.cpp's) beside `text`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from gptj.serve.backends import Backend
from gptj.serve.guard import APIError
from gptj.serve.protocol import DetokenizeBody, TokenizeBody, json_in_slices


def router(backend: Backend) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> Response:
        text = body.text if body.text is not None else body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "text: required (the text to split into tokens)", "text")
        add = body.add_special if body.add_special_tokens is None else body.add_special_tokens
        parse = body.parse_special
        if parse is None:
            parse = body.add_special or (body.text is None and body.prompt is None)
        result = await backend.tokenize(body.model_copy(update={"add_special": add, "parse_special": parse}), text)

        def render() -> bytes:  # a 1 MB text's answer is ~12 MB: built off the event loop, in slices
            if body.with_pieces:  # llama.cpp's shape: a piece is its text, or its bytes when not valid UTF-8
                result["tokens"] = [{"id": p["id"], "piece": p["text"] if p["text"] is not None else p["bytes"]}
                                    for p in result["pieces"]]
            return json_in_slices(result)

        return Response(await asyncio.to_thread(render), media_type="application/json")

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> dict:
        result = await backend.detokenize(body)
        return {**result, "content": result["text"]}

    return router
