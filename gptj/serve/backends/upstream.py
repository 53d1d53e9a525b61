"""The backend in front of another server (`gptj serve --upstream URL`): the playground, chat, presets, token viewer and both API styles
in front of any OpenAI-compatible server (vLLM, TGI, another `gptj serve`), with no local model.

* `/v1/*` is forwarded as it is: streams pass through as server-sent events, errors with the
  upstream's status and body. A completion or chat request without `model` gets the upstream's
  (its first in `/v1/models`), which vLLM and TGI want; one naming another model gets it too
  when the upstream serves only one (which answers to any name, as `gptj serve` does; vLLM would
  answer 404). What else the body asks for is the upstream's to do or refuse, not judged here:
  vLLM does content parts, the developer role, prompt batches and token ids, logit_bias,
  stream_options, response_format (structured output) and tools (with its tool-call flags);
  it answers 400 for `suffix`, ignores `user` and `parallel_tool_calls`, and ignores unknown
  fields with a warning in its log. `gptj serve` refuses what it does not do
  (gptj.serve.protocol.REFUSED).
* `/complete` and `/completion` (EleutherAI) become upstream `/v1/completions` calls.
* `/api/info` describes the upstream model (from `/v1/models`) with architecture "remote".
* `/tokenize` and `/detokenize` use a local tokenizer when the upstream model is known here
  (GPT-J names: GPT-J's tokenizer) or the request names one (`tokenizer: "gpt-j"`), else the
  upstream's own `/tokenize` (vLLM and gptj have it), else they answer 501.
* An upstream that cannot be reached gives 502 (504 when it does not answer in time).

`--upstream-key` goes to the upstream as `Authorization: Bearer KEY`; the client's own
Authorization header (checked against `--api-key` here) is never passed on. Request bodies are
validated with the same models as `gptj serve` and errors have the same JSON shape
(`gptj.serve.errors`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from gptj.api import sampling_params
from gptj.serve.backends import Generated, Interruption, detokenize_json, requested_tokenizer, until
from gptj.serve.guard import APIError, ClientDisconnected, RequestCounts
from gptj.serve.metrics import request_lines
from gptj.serve.protocol import DetokenizeBody, TokenizeBody, tokenize_json
from gptj.tokenizer import Tokenizer

MODELS_TTL = 30.0  # seconds the upstream's model list is reused
# Upstream model names whose tokenizer is here: (substring of the lower-cased id, tokenizer name)
KNOWN_TOKENIZERS = (("gpt-j", "gpt-j"), ("gptj", "gpt-j"))
PASSED_HEADERS = ("retry-after", "x-request-id")


def known_tokenizer(model_id: str) -> str | None:
    """The local tokenizer name for an upstream model id, when it is one we know."""
    name = model_id.lower()
    return next((tok for key, tok in KNOWN_TOKENIZERS if key in name), None)


class UpstreamResponse(Exception):  # noqa: N818 (not an error of ours: the upstream's answer, passed on)
    """An upstream answer (an error) to hand to the client as it is."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"upstream answered {response.status_code}")
        self.response = response


class Upstream:
    """The OpenAI-compatible server behind the front: `url` with or without its `/v1`."""

    def __init__(self, url: str, key: str | None = None, *, timeout: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        base = url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"--upstream {url!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8001/v1")
        self.v1 = base if base.endswith("/v1") else base + "/v1"
        self.root = self.v1.removesuffix("/v1")
        self.key = key
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)
        self._models: tuple[float, list[dict]] | None = None

    def headers(self, content_type: str | None = "application/json", accept: str | None = None) -> dict[str, str]:
        h = {"Accept-Encoding": "identity"}
        if content_type:
            h["Content-Type"] = content_type
        if accept:
            h["Accept"] = accept
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    async def send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        """The upstream's response; 502/504 APIErrors when it cannot be reached."""
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TimeoutException as exc:
            raise APIError(504, f"upstream {self.v1} did not answer in time ({type(exc).__name__})", None,
                           "upstream_timeout") from None
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            raise APIError(502, f"upstream {self.v1} is unreachable ({type(exc).__name__}: {detail}); "
                           "is the server running there?", None, "upstream_unreachable") from None

    async def call(self, method: str, url: str, body: Any = None) -> httpx.Response:
        request = self.client.build_request(method, url, headers=self.headers(), json=body)
        return await self.send(request)

    async def models(self) -> list[dict]:
        now = time.monotonic()
        if self._models and now - self._models[0] < MODELS_TTL:
            return self._models[1]
        response = await self.call("GET", f"{self.v1}/models")
        if response.status_code >= 400:
            raise UpstreamResponse(response)
        try:
            data = response.json()["data"]
            models = [m for m in data if isinstance(m, dict) and m.get("id")]
        except (ValueError, KeyError, TypeError):
            raise APIError(502, f"upstream {self.v1}/models did not answer with an OpenAI model list", None,
                           "upstream_error") from None
        if not models:
            raise APIError(502, f"upstream {self.v1} serves no model (its /v1/models is empty)", None, "upstream_error")
        self._models = (now, models)
        return models

    async def model_id(self) -> str:
        return (await self.models())[0]["id"]

    async def close(self) -> None:
        await self.client.aclose()


def passthrough(response: httpx.Response, content: bytes) -> Response:
    headers = {k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS}
    return Response(content, status_code=response.status_code, headers=headers,
                    media_type=response.headers.get("content-type", "application/json"))


class UpstreamBackend:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.metrics = RequestCounts()
        self.started = time.time()

    async def health(self) -> dict:
        return {"status": "ok", "model": await self.upstream.model_id(), "upstream": self.upstream.v1,
                "uptime_s": round(time.time() - self.started, 1)}

    async def info(self) -> dict:
        models = await self.upstream.models()
        first = models[0]
        context = first.get("max_model_len") or first.get("context_length") or first.get("context_window")
        if context is None:  # another gptj serve says it on its /api/info
            try:
                response = await self.upstream.call("GET", f"{self.upstream.root}/api/info")
                if response.status_code == 200:
                    context = response.json().get("context_length")
            except (APIError, ValueError, AttributeError):
                pass
        defaults = sampling_params()
        return {
            "name": first["id"],
            "architecture": "remote",
            "path": self.upstream.v1,
            "upstream": self.upstream.v1,
            "models": [m["id"] for m in models],
            "owned_by": first.get("owned_by"),
            "parameters": None,
            "quantization": None,
            "dtype": None,
            "format": "remote",
            "vocab_size": None,
            "context_length": context,
            "tokenizer": known_tokenizer(first["id"]),
            "defaults": {k: getattr(defaults, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                                                           "repetition_penalty")},
            "parallel": None,
        }

    def metrics_text(self) -> str:
        lines = request_lines(self.metrics, "HTTP requests to this front, by route (/v1: all forwarded ones)",
                              "responses with status >= 400 (502/504: the upstream could not be reached)")
        return "\n".join(lines) + "\n"

    async def local_tokenizer(self, name: str | None) -> Tokenizer | None:
        """The tokenizer a request names, else the upstream model's when it is known here."""
        if not name:
            name = known_tokenizer(await self.upstream.model_id())
            if name is None:
                return None
        return await requested_tokenizer(name)

    async def upstream_tokenizer_call(self, path: str, body: dict) -> dict:
        response = await self.upstream.call("POST", f"{self.upstream.root}/{path}", body)
        if response.status_code in (404, 405):
            model = await self.upstream.model_id()
            raise APIError(501, f"{path}: no tokenizer for the upstream model {model!r} is known here and "
                           f"{self.upstream.root} has no /{path}; name one, e.g. \"tokenizer\": \"gpt-j\"",
                           "tokenizer", "not_implemented")
        if response.status_code >= 400:
            raise UpstreamResponse(response)
        try:
            return response.json()
        except ValueError:
            raise APIError(502, f"upstream {self.upstream.root}/{path} did not answer with JSON", None, "upstream_error") from None

    async def tokenize(self, body: TokenizeBody, text: str) -> dict:
        tok = await self.local_tokenizer(body.tokenizer)
        if tok is not None:  # in a worker thread: the event loop stays free
            return await asyncio.to_thread(tokenize_json, tok, text, bool(body.parse_special), body.add_special)
        data = await self.upstream_tokenizer_call("tokenize", {
            "model": await self.upstream.model_id(), "prompt": text, "add_special_tokens": body.add_special,
            "add_special": body.add_special, "parse_special": bool(body.parse_special), "return_token_strs": True,
        })
        ids = [int(i) for i in data.get("tokens", [])]
        pieces = data.get("pieces")
        if not pieces:  # vLLM: token_strs, the vocabulary's strings
            strs = data.get("token_strs") or [None] * len(ids)
            pieces = [{"id": i, "text": s, "bytes": list(s.encode()) if isinstance(s, str) else []}
                      for i, s in zip(ids, strs, strict=False)]
        return {"count": len(ids), "tokens": ids, "pieces": pieces}

    async def detokenize(self, body: DetokenizeBody) -> dict:
        tok = await self.local_tokenizer(body.tokenizer)
        if tok is not None:
            return await detokenize_json(tok, body.tokens)
        data = await self.upstream_tokenizer_call("detokenize", {"model": await self.upstream.model_id(), "tokens": body.tokens})
        return {"text": data.get("text", data.get("prompt", ""))}

    async def with_model(self, raw: bytes) -> bytes:
        """A completion/chat body without `model` gets the upstream's (vLLM and TGI want one);
        one naming another model too when the upstream serves only one, which then answers to
        any name, as `gptj serve` does (vLLM would answer 404). The rest passes as it is."""
        try:
            body = json.loads(raw)
        except ValueError:
            return raw  # the upstream says what is wrong with it
        if not isinstance(body, dict):
            return raw
        if not body.get("model"):
            body["model"] = await self.upstream.model_id()
            return json.dumps(body).encode()
        try:
            ids = [m["id"] for m in await self.upstream.models()]
        except (APIError, UpstreamResponse):
            return raw  # the upstream answers the request itself
        if len(ids) == 1 and body["model"] != ids[0]:
            body["model"] = ids[0]
            return json.dumps(body).encode()
        return raw

    async def forward(self, path: str, request: Request) -> Response:
        raw = await request.body()
        if request.method == "POST" and path in ("completions", "chat/completions"):
            raw = await self.with_model(raw)
        outgoing = self.upstream.client.build_request(
            request.method, f"{self.upstream.v1}/{path}", params=request.url.query or None, content=raw or None,
            headers=self.upstream.headers(request.headers.get("content-type"), request.headers.get("accept")),
        )
        response = await self.upstream.send(outgoing, stream=True)
        if response.status_code >= 400 or "text/event-stream" not in response.headers.get("content-type", ""):
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            return passthrough(response, content)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_bytes():
                    yield chunk
            except httpx.HTTPError as exc:  # the upstream went away mid-stream: say so in the stream
                message = f"upstream {self.upstream.v1} broke off the stream ({type(exc).__name__})"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'upstream_error', 'code': 502}})}\n\n".encode()
            finally:  # also when our client goes away: closing the upstream stream cancels its generation
                with anyio.CancelScope(shield=True):
                    await response.aclose()

        headers = {"Cache-Control": "no-cache", **{k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS}}
        return StreamingResponse(relay(), status_code=response.status_code, media_type="text/event-stream", headers=headers)

    async def generate_text(self, request: Request, context: str, temp: float, top_p: float, length: int,
                            token_healing: bool = True) -> str:
        """The continuation of `context` (the EleutherAI APIs), from the upstream's /v1/completions
        (`token_healing` is gptj's own setting: an upstream heals or not as it does)."""
        if not context:
            raise APIError(400, "context: must not be empty", "context")
        body = {"model": await self.upstream.model_id(), "prompt": context, "max_tokens": length,
                "temperature": temp, "top_p": top_p}
        response = await self.upstream.call("POST", f"{self.upstream.v1}/completions", body)
        if response.status_code >= 400:
            raise UpstreamResponse(response)
        try:
            return response.json()["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise APIError(502, f"upstream {self.upstream.v1}/completions did not answer with a completion", None,
                           "upstream_error") from None

    # ---- the other API families (Ollama, KoboldAI, llama.cpp): backend-neutral generation ----

    def chat_template(self) -> bool:
        return True  # the upstream's chat endpoint lays messages out (vLLM: its --chat-template)

    async def generate(self, request: Request, *, prompt: str | None = None, messages: list[dict] | None = None,
                       settings: dict, abort: asyncio.Event | None = None,
                       continue_final_message: bool = False) -> AsyncIterator[str | Generated]:
        """Text deltas, then a Generated, from the upstream's /v1/completions or
        /v1/chat/completions streamed (see gptj.serve.backends.Backend.generate)."""
        field = "messages" if messages is not None else "prompt"
        if not (messages if messages is not None else prompt):
            raise APIError(400, f"{field}: must not be empty", field)
        body = openai_settings(settings)
        body.update(model=await self.upstream.model_id(), stream=True, stream_options={"include_usage": True})
        if messages is not None:
            path, body["messages"] = "chat/completions", messages
            if continue_final_message:  # vLLM's pair: the last message stays open, no new turn
                body.update(continue_final_message=True, add_generation_prompt=False)
        else:
            path, body["prompt"] = "completions", prompt
        t0 = time.monotonic()
        outgoing = self.upstream.client.build_request("POST", f"{self.upstream.v1}/{path}", json=body,
                                                      headers=self.upstream.headers(accept="text/event-stream"))
        response = await self.upstream.send(outgoing, stream=True)
        interruption: Interruption | None = None
        try:
            if response.status_code >= 400:
                raise upstream_error(response, await response.aread(), path)
            interruption = Interruption(request, abort)
            yield ""
            text, finish, stop_type, usage, chunks, first = "", None, None, None, 0, None
            try:
                async for line in until(response.aiter_lines(), interruption.event):
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if not isinstance(chunk, dict):
                        continue
                    if chunk.get("error"):
                        error = chunk["error"]
                        message = error.get("message") if isinstance(error, dict) else str(error)
                        yield Generated(text, "error", 0, chunks, error=f"upstream: {message}")
                        return
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                            continue
                        piece = (choice.get("delta") or {}).get("content") if messages is not None else choice.get("text")
                        if isinstance(piece, str) and piece:
                            first = first if first is not None else time.monotonic() - t0
                            chunks += 1
                            text += piece
                            yield piece
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                            reason = choice.get("stop_reason")  # vLLM: the stop string or token id
                            stop_type = "word" if isinstance(reason, str) else "eos" if finish == "stop" else None
            except httpx.HTTPError as exc:  # the upstream went away mid-stream
                yield Generated(text, "error", 0, chunks, error=f"upstream {self.upstream.v1} broke off the stream "
                                                                f"({type(exc).__name__})")
                return
            if finish is None and interruption.disconnected:
                raise ClientDisconnected
            if finish is None and interruption.event.is_set():
                finish = "cancelled"
            usage = usage if isinstance(usage, dict) else {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            yield Generated(text, finish or "stop", int(usage.get("prompt_tokens") or 0),
                            int(usage.get("completion_tokens") or chunks), int(cached), first,
                            time.monotonic() - t0, stop_type if finish == "stop" else None)
        finally:  # also when our client goes away: closing the upstream stream cancels its generation
            if interruption is not None:
                interruption.close()
            with anyio.CancelScope(shield=True):
                await response.aclose()


# gptj's sampling names -> OpenAI's (top_k, min_p and repetition_penalty are vLLM's extra fields)
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "min_p": "min_p", "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos"}


def openai_settings(settings: dict) -> dict:
    """An OpenAI request's sampling fields for gptj settings; `max_new_tokens: None` is sent as
    `max_tokens: null` (vLLM: the rest of the context). truncate_prompt has no OpenAI name."""
    body: dict[str, Any] = {}
    schema = settings.get("json_schema")
    if schema:  # JSON output (Ollama's format): OpenAI's response_format, which vLLM enforces
        body["response_format"] = {"type": "json_object"} if schema is True else \
            {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    for name, value in settings.items():
        if name not in OPENAI_NAMES:
            continue
        if value is None and name != "max_new_tokens":
            continue
        if name == "stop" and not value or name == "ignore_eos" and not value:
            continue
        body[OPENAI_NAMES[name]] = value
    return body


def upstream_error(response: httpx.Response, content: bytes, path: str) -> APIError:
    """The upstream's error as one of ours (its message and field), for clients of APIs that
    are not OpenAI's: they cannot read the upstream's body."""
    message, param = content.decode("utf-8", "replace")[:500] or f"status {response.status_code}", None
    try:
        error = json.loads(content).get("error")
        if isinstance(error, dict):
            message, param = str(error.get("message") or message), error.get("param")
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    kind = "upstream_error" if response.status_code >= 500 else "invalid_request_error"
    return APIError(response.status_code, f"upstream {path}: {message}", param if isinstance(param, str) else None, kind)
