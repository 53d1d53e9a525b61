"""The HTTP request bodies (validated by pydantic: every field named in a 400) and the small
translations between them and the engine: settings, token pieces, server-sent events."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 8
MAX_CACHE_SALT = 256


def lone_surrogate(value: Any) -> str | None:
    """The path (`messages.0.content`) of the first string in a parsed JSON body that holds a
    lone surrogate, which json.loads accepts and no tokenizer can encode; None if there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item))
    return None


class Body(BaseModel):
    """Every request body: strings must be valid Unicode (no lone surrogates), checked once
    here for every field, so no route can forget it."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "holds a lone surrogate, which is not valid Unicode text",
                                      {"field": where})
        return data


# ---- request bodies ----------------------------------------------------------------------------

StopField = str | list[str] | None


class Settings(Body):
    """Sampling settings shared by the OpenAI endpoints (OpenAI's defaults and ranges)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: StopField = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    user: str | None = None
    truncate: bool = False  # left-truncate a prompt that does not fit (TGI's `truncate`, as a flag)
    ignore_eos: bool = False
    cache_salt: str | None = Field(None, max_length=MAX_CACHE_SALT)  # vLLM's: share cached prefixes only within it


class CompletionBody(Settings):
    prompt: str | list[str] | list[int] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Settings):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompleteBody(Body):
    """mesh-transformer-jax's device_serve.py: POST /complete."""

    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temp: float = Field(1.0, ge=0.0, le=2.0)
    length: int = Field(512, ge=1)


class HostedCompletionBody(Body):
    """The old hosted EleutherAI API: POST /completion (clients sent camelCase too)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0, alias="topP")
    temp: float = Field(1.0, ge=0.0, le=2.0)
    response_length: int = Field(128, ge=1, alias="responseLength")
    remove_input: bool = Field(False, alias="removeInput")


class TokenizeBody(Body):
    text: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name
    tokenizer: str | None = None  # "gpt-j" for GPT-2 BPE; default: the served model's
    add_special: bool = False


class DetokenizeBody(Body):
    tokens: list[int]
    tokenizer: str | None = None


# ---- helpers -----------------------------------------------------------------------------------


def first_set(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def engine_settings(body: Settings, max_tokens: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return dict(
        max_new_tokens=max_tokens if max_tokens is not None else 16,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=stop,
        seed=body.seed,
        truncate_prompt=body.truncate,
        ignore_eos=body.ignore_eos,
    )


def tokenize_json(tokenizer, text: str, add_special: bool) -> dict:  # noqa: ANN001
    ids = tokenizer.encode(text, allow_special=add_special)
    return {"count": len(ids), "tokens": ids, "pieces": [piece_json(tokenizer, i) for i in ids]}


def piece_json(tokenizer, token_id: int) -> dict[str, Any]:  # noqa: ANN001
    raw = tokenizer.token_bytes(token_id)
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # part of a multi-byte character: show the bytes (as llama.cpp's with_pieces)
    return {"id": token_id, "text": text, "bytes": list(raw)}


def token_str(tokenizer, token_id: int) -> str:  # noqa: ANN001
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
