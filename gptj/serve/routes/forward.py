"""OpenAI's API in front of another server: every /v1/* request forwarded as it is (streams
pass through as server-sent events, errors with the upstream's status and body)."""

from __future__ import annotations

from fastapi import APIRouter

from gptj.serve.backends.upstream import UpstreamBackend


def router(backend: UpstreamBackend) -> APIRouter:
    router = APIRouter()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):  # one route each: distinct OpenAPI operation ids
        router.add_api_route("/v1/{path:path}", backend.forward, methods=[method], name=f"forward_{method.lower()}",
                             summary=f"{method} /v1/...: forwarded to the upstream")
    return router
