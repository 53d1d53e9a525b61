"""The HTTP request bodies (validated by pydantic: every field named in a 400) and the small
translations between them and the engine: settings, token pieces, server-sent events."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError, to_json

from gptj.runtime.sampling import MAX_TEMPERATURE

MAX_N = 8  # n and best_of
MAX_CACHE_SALT = 256
# response_format json_object / json_schema (and vLLM's guided_json, llama.cpp's json_schema):
# constrained JSON output (gptj.runtime.constraints); off, such requests get a 400.
JSON_OUTPUT = True

# ---- which of OpenAI's request fields this server does, and which it refuses -------------------
#
# Every known field works, is harmless to accept (HARMLESS), or gets a 400 that names it
# (REFUSED): none is dropped silently, so a request for tools or JSON never gets a 200 with free
# text. Fields nobody here knows (other servers' extensions) are ignored, as OpenAI's SDKs expect.

TOOLS = "function calling is not supported: this server generates text only"
CONSTRAINED = ("constrained output other than JSON (regexes, grammars, choices) is not supported; for JSON send "
               'response_format {"type": "json_object"} or {"type": "json_schema", ...}')
# field -> why it is refused when a request sets it (null, and the values in NOT_SET, set nothing)
REFUSED: dict[str, str] = {
    "tools": TOOLS,
    "tool_choice": TOOLS,
    "functions": TOOLS,
    "function_call": TOOLS,
    "audio": "audio output is not supported: the model writes text only",
    "modalities": 'only ["text"] is supported: the model writes text only',
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported: the model sees only the request",
    "moderation": "moderation is not supported: nothing here checks the input or the output",
    "store": "stored completions are not supported: nothing is kept (send false or leave it out)",
    "verbosity": 'only "medium" (OpenAI\'s default) is supported: the model has no verbosity setting',
    "suffix": "a suffix (fill-in-the-middle) is not supported: the model only continues the prompt",
    # other servers' extensions that would shape the output: refused rather than ignored
    "guided_regex": CONSTRAINED,  # vLLM's (its guided_json works: JSON output)
    "guided_choice": CONSTRAINED,
    "guided_grammar": CONSTRAINED,
    "structured_outputs": CONSTRAINED,
    "grammar": CONSTRAINED,  # llama.cpp's (its json_schema works: JSON output)
    "min_tokens": "not supported: to generate exactly max_tokens tokens, send ignore_eos: true",
    "use_beam_search": "beam search is not supported (best_of samples several and keeps the likeliest)",
}
# values of refused fields that ask for nothing, accepted as if the field were absent
NOT_SET: dict[str, tuple] = {
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "modalities": (["text"],), "store": (False,), "verbosity": ("medium",), "suffix": ("",),
    "min_tokens": (0,), "use_beam_search": (False,),
}
# known fields accepted without effect, and why that is harmless (the rest of OpenAI's fields work,
# response_format included: json_object and json_schema constrain the output to JSON)
HARMLESS: dict[str, str] = {
    "user": "an end-user id for OpenAI's abuse monitoring; nothing here monitors users",
    "safety_identifier": "the same, under its newer name",
    "metadata": "tags for stored completions; nothing is stored",
    "store": "false (OpenAI's default) only: nothing is stored",
    "service_tier": "a billing and latency tier; this server has one",
    "parallel_tool_calls": "only matters with tools, which are refused",
    "reasoning_effort": "the model has no reasoning phase to bound",
    "prompt_cache_key": "a routing hint for OpenAI's cache; the prefix cache here matches prompts by content",
    "prompt_cache_options": "the same: breakpoints and lifetimes of OpenAI's cache",
    "prompt_cache_retention": "the same",
    "stream_options.include_obfuscation": "padding against length side channels on OpenAI's streams",
    "messages[].name": "a participant's name; the chat templates here have no place for it",
}


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error that becomes a 400 whose `param` is `field` (a dotted path), from a
    validator of a whole body, which pydantic would otherwise report as the body's."""
    return PydanticCustomError("field_error", message, {"field": field})


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
            for k in item:  # keys too: logit_bias's are token ids as strings
                if isinstance(k, str) and not k.isascii():
                    try:
                        k.encode("utf-8")
                    except UnicodeEncodeError:
                        return path or "body"
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
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class StreamOptions(Body):
    include_usage: bool = False  # a last chunk with the usage and no choices (else no usage at all)


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    # json_schema: OpenAI's {"name": ..., "schema": {...}, "strict": ...}; only `schema` is used (it
    # is always enforced), and without it the output is any JSON object
    json_schema: dict[str, Any] | None = None


class Settings(Body):
    """Sampling settings shared by the OpenAI endpoints (OpenAI's defaults and ranges)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
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
    logit_bias: dict[int, Bias] | None = None  # {"token id": -100..100}: added to its logit; -100 bans it
    token_healing: bool = True  # ours: a prompt ending in a space or newline may end inside a token (gptj.runtime.healing)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # sample best_of, return the n likeliest per token
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's: a JSON schema (or its JSON text)
    json_schema: dict[str, Any] | None = None  # llama.cpp's: a JSON schema

    def json_output(self) -> tuple[str, dict[str, Any] | bool] | None:
        """(the field that asked, what the engine's json_schema gets: True for any JSON object,
        else the schema) for a request that constrains its output to JSON; None for free text."""
        if self.guided_json is not None:
            return "guided_json", self.guided_json  # type: ignore[return-value]  (parsed by `consistent`)
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema" and fmt.json_schema and fmt.json_schema.get("schema") is not None:
            return "response_format.json_schema", fmt.json_schema["schema"]
        return "response_format.json_schema" if fmt.type == "json_schema" else "response_format", True

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data: Any) -> Any:
        """A 400 naming the first known field that asks for what this server does not do."""
        if isinstance(data, dict):
            for name, why in REFUSED.items():
                value = data.get(name)
                if value is not None and not any(value == v and type(value) is type(v) for v in NOT_SET.get(name, ())):
                    raise field_error(name, why)
        return data

    @model_validator(mode="after")
    def consistent(self) -> Settings:
        if self.best_of is not None and self.best_of < self.n:
            raise field_error("best_of", f"must be at least n ({self.n})")
        if self.stream and (self.best_of or self.n) > self.n:
            raise field_error("best_of", "cannot be streamed above n: the best are known only at the end")
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "only allowed when stream is true")
        if self.response_format is not None and self.response_format.type != "text" and not JSON_OUTPUT:
            raise field_error("response_format", "JSON output is not supported yet")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise field_error("response_format.json_schema", 'is required with type "json_schema": '
                              '{"name": "...", "schema": {...}}')
        asked = [name for name, on in (("response_format", fmt is not None and fmt.type != "text"),
                                       ("guided_json", self.guided_json is not None),
                                       ("json_schema", self.json_schema is not None)) if on]
        if len(asked) > 1:
            raise field_error(asked[1], f"set only one of {' and '.join(asked)}: each asks for JSON output")
        if isinstance(self.guided_json, str):  # vLLM takes the schema as JSON text too
            try:
                self.guided_json = json.loads(self.guided_json)
            except ValueError:
                raise field_error("guided_json", "must be a JSON schema (an object, or its JSON text)") from None
        return self


def is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)


def is_batch(prompt: Any) -> bool:
    """A completion prompt that is several: a list of strings or of token-id lists."""
    return isinstance(prompt, list) and not is_token_ids(prompt)


class CompletionBody(Settings):
    # one prompt (a string or a list of token ids) or a batch (a list of either): one choice
    # per prompt and n, index prompt_i * n + j, as OpenAI answers
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)

    @field_validator("prompt", mode="before")
    @classmethod
    def prompt_shape(cls, value: Any) -> Any:
        """One message for every wrong shape (pydantic would list a mismatch per union member)."""
        shape = "must be a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(value, str) or is_token_ids(value):
            return value
        if not isinstance(value, list) or not value:
            raise PydanticCustomError("prompt_shape", shape if value != [] else "must not be empty")
        if all(isinstance(p, str) for p in value) or all(is_token_ids(p) for p in value):
            return value
        if isinstance(value[0], str):
            fits, kind = (lambda p: isinstance(p, str)), "a string"
        elif type(value[0]) is int:
            fits, kind = (lambda p: type(p) is int), "a token id (an integer)"
        else:
            fits, kind = is_token_ids, "a non-empty list of token ids"
        bad = next((i for i, p in enumerate(value) if not fits(p)), 0)
        raise PydanticCustomError("prompt_shape", f"{shape}; item {bad} is not {kind}")


class ContentPart(BaseModel):
    """A part of a message's content: only text (image, audio and file parts get a 400)."""

    type: Literal["text"]
    text: str


ROLES = ("system", "developer", "user", "assistant")
MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video_url")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # developer: OpenAI's newer name for system, and taken as one
    role: Literal["system", "developer", "user", "assistant"]
    # a string or a list of text parts, joined with newlines (as vLLM joins them)
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, no effect (see HARMLESS)


def message_text(message: dict, where: str) -> dict:
    """A message with its content as one string; a 400 naming the part for what is not text."""
    role = message.get("role")
    if role in ("tool", "function"):
        raise field_error(f"{where}.role", f"{role!r} messages (tool results) are not supported: {TOOLS}")
    for key in ("tool_calls", "function_call"):
        if message.get(key) not in (None, []):
            raise field_error(f"{where}.{key}", TOOLS)
    content = message.get("content")
    if content is None and role == "assistant":
        return {**message, "content": ""}
    if isinstance(content, str) or content is None:
        return message
    if not isinstance(content, list):
        raise field_error(f"{where}.content", "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise field_error(at, f"{kind} parts are not supported: only text is (the model reads text only)")
        if kind not in ("text", "refusal"):  # refusal: an assistant's earlier refusal, as text
            raise field_error(at, 'must be a text part, {"type": "text", "text": "..."}')
        if not isinstance(part.get(kind), str):
            raise field_error(f"{at}.{kind}", "must be a string")
        texts.append(part[kind])
    return {**message, "content": "\n".join(texts)}


class ChatBody(Settings):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's: continue the last message (the assistant's) rather than answer it, its text left open
    # (no end-of-turn after it); add_generation_prompt, unset, is the opposite (gptj.chat.ChatSession.prepare)
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def text_messages(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            messages = [message_text(m, f"messages.{i}") if isinstance(m, dict) else m
                        for i, m in enumerate(data["messages"])]
            data = {**data, "messages": messages}
        return data

    @model_validator(mode="after")
    def top_logprobs_need_logprobs(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise field_error("top_logprobs", "needs logprobs: true")
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        """{role, content} dicts for the chat template: developer is a system message."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""} for m in self.messages]


class CompleteBody(Body):
    """mesh-transformer-jax's device_serve.py: POST /complete."""

    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temp: float = Field(1.0, ge=0.0, le=2.0)
    length: int = Field(512, ge=1)
    token_healing: bool = True  # ours, as in Settings


class HostedCompletionBody(Body):
    """The old hosted EleutherAI API: POST /completion (clients sent camelCase too)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0, alias="topP")
    temp: float = Field(1.0, ge=0.0, le=2.0)
    response_length: int = Field(128, ge=1, alias="responseLength")
    remove_input: bool = Field(False, alias="removeInput")
    token_healing: bool = Field(True, alias="tokenHealing")  # ours, as in Settings


class TokenizeBody(Body):
    text: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name
    tokenizer: str | None = None  # "gpt-j" for GPT-2 BPE; default: the served model's
    add_special: bool = False  # llama.cpp's: insert the BOS token (vLLM: add_special_tokens)
    add_special_tokens: bool | None = None  # vLLM's name for add_special
    # llama.cpp's: special-token text (<|im_start|>) becomes its id. Default: true when the text
    # comes as `content` (llama.cpp's) or add_special is set (what add_special meant here before)
    parse_special: bool | None = None
    with_pieces: bool = False  # llama.cpp's: tokens as [{id, piece}]


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
        logit_bias=dict(body.logit_bias or {}),
        token_healing=body.token_healing,
    ) | ({"json_schema": asked[1]} if (asked := body.json_output()) else {})


def tokenize_json(tokenizer, text: str, parse_special: bool, add_bos: bool = False) -> dict:  # noqa: ANN001
    """Ids, count and pieces of `text`: special-token text parsed when `parse_special`, the BOS
    token (where the tokenizer has one) put first when `add_bos` (llama.cpp's add_special)."""
    ids = tokenizer.encode(text, allow_special=parse_special)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos, *ids]
    piece = {i: piece_json(tokenizer, i) for i in set(ids)}  # once per distinct id: long texts repeat most
    return {"count": len(ids), "tokens": ids, "pieces": [piece[i] for i in ids]}


JSON_SLICE = 4096  # list items encoded per call: a few milliseconds each


def json_in_slices(value: Any) -> bytes:
    """`value` as JSON, its long lists encoded a slice at a time. One encoder call holds the GIL
    throughout (for a 1 MB text's tokens and pieces, long enough to notice), so a worker thread
    calling this lets the event loop run between slices, where one call would stall every other
    request."""
    if isinstance(value, dict):
        return b"{" + b",".join(to_json(str(k)) + b":" + json_in_slices(v) for k, v in value.items()) + b"}"
    if isinstance(value, list) and len(value) > JSON_SLICE:
        return b"[" + b",".join(to_json(value[i:i + JSON_SLICE])[1:-1]
                                for i in range(0, len(value), JSON_SLICE)) + b"]"
    return to_json(value)


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
