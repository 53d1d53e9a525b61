"""One app over a backend: the guard, the JSON errors, the page, and a router per API family
(OpenAI's, Ollama's, KoboldAI's, EleutherAI's and llama.cpp's).
`create_app` serves this machine's model; `create_upstream_app` fronts another server."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline

from gptj.api import Model
from gptj.serve.backends import Backend
from gptj.serve.backends.local import LocalBackend
from gptj.serve.backends.upstream import Upstream, UpstreamBackend, UpstreamResponse, passthrough
from gptj.serve.errors import install_error_handlers
from gptj.serve.guard import LOOPBACK_NAMES, RequestCounts, api_key_list, install_guard
from gptj.serve.routes import eleuther, forward, kobold, ollama, openai, page, tokenize


def route_paths(routes: Sequence) -> set[str]:
    """The paths of `routes`, also of the routers included in them."""
    found: set[str] = set()
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's wrapper of an included APIRouter
            found |= route_paths(route.original_router.routes)
        elif getattr(route, "path", None):
            found.add(route.path)
    return found


def freeze_startup_heap() -> None:
    """Puts every object alive at start-up (the model's, the tokenizer's, the libraries') out of
    the collector's reach, as vLLM's freeze_gc_heap does once a server is up. A full collection
    otherwise walks all of them while holding the GIL: a pause of every stream and of the event
    loop that grows with the heap. Collected first, so no garbage is frozen."""
    gc.collect()
    gc.freeze()


def build_app(backend: Backend, counts: RequestCounts, routers: Sequence[APIRouter], *, title: str, description: str,
              api_key: str | Sequence[str] | None, cors_origins: list[str] | None,
              allowed_hosts: frozenset[str] | None, lifespan: Callable | None = None) -> FastAPI:
    @asynccontextmanager
    async def serving(app: FastAPI) -> AsyncIterator[None]:
        freeze_startup_heap()
        if lifespan is None:
            yield
        else:
            async with lifespan(app):
                yield

    app = FastAPIOffline(title=title, version="0.1.0", description=description, redoc_url=None, lifespan=serving)

    paths: set[str] = set()

    def path_label(path: str) -> str:
        """The route, not the raw path: unknown paths must not grow /metrics without bound."""
        if path.startswith(("/static/", "/static-offline-docs/")):
            return "/static"
        if not paths:  # once, on the first request: the routes are all in place by then
            paths.update(route_paths(app.routes))
        if path in paths:
            return path
        return "/v1" if path.startswith("/v1/") and "/v1/{path:path}" in paths else "other"

    install_guard(app, counts, path_label, api_keys=api_key_list(api_key), hosts=allowed_hosts)
    if cors_origins:  # added last, so outermost: errors from the guard (401, 413) carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Retry-After"])
    install_error_handlers(app)
    page.mount_page(app)
    # the other API families, over either backend (gptj.serve.backends.Backend.generate)
    families = (ollama.router(backend), kobold.router(backend), eleuther.router(backend))
    for router in (page.router(backend), tokenize.router(backend), *routers, *families):
        app.include_router(router)
    return app


def create_app(model: Model, *, api_key: str | Sequence[str] | None = None, cors_origins: list[str] | None = None,
               request_timeout: float | None = None, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES,
               served_model_names: Sequence[str] = ()) -> FastAPI:
    """The app on this machine's model. `api_key`: one key or several (one per tenant: tenants
    never share cached prefixes). `allowed_hosts`: the Host names it answers (None: any).
    `request_timeout`: seconds (queueing included) after which a generation ends with
    finish_reason "timeout"; None or 0: no limit. `served_model_names`: more names /v1/models
    lists for the model (the first is the one responses name; any name is answered)."""
    backend = LocalBackend(model, request_timeout, served_model_names)
    app = build_app(backend, backend.metrics, [openai.router(backend)], title="GPT-J Studio",
                    description="OpenAI-, Ollama-, KoboldAI-, llama.cpp- and EleutherAI-compatible APIs for GPT-J", api_key=api_key,
                    cors_origins=cors_origins, allowed_hosts=allowed_hosts)
    app.state.model = model
    return app


def create_upstream_app(url: str, key: str | None = None, *, api_key: str | Sequence[str] | None = None,
                        cors_origins: list[str] | None = None, timeout: float = 600.0,
                        transport: httpx.AsyncBaseTransport | None = None,
                        allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The front: `url` is the upstream (`http://host:8001/v1`), `key` its API key, `api_key`
    the key clients of this front must send. `transport` is for tests."""
    upstream = Upstream(url, key, timeout=timeout, transport=transport)
    backend = UpstreamBackend(upstream)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.close()

    app = build_app(backend, backend.metrics, [forward.router(backend)], title="GPT-J Studio (upstream)",
                    description=f"The GPT-J Studio playground and APIs in front of {upstream.v1}",
                    api_key=api_key, cors_origins=cors_origins, allowed_hosts=allowed_hosts, lifespan=lifespan)
    app.state.upstream = upstream

    @app.exception_handler(UpstreamResponse)
    async def on_upstream(_: Request, err: UpstreamResponse) -> Response:
        return passthrough(err.response, err.response.content)

    return app
