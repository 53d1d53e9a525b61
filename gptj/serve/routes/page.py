"""The playground page and what it asks the server: /, /static/*, /health, /api/info,
/api/presets and /metrics, over either backend."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from gptj.presets import load_presets
from gptj.serve.backends import Backend
from gptj.serve.guard import WEB_DIR


def mount_page(app: FastAPI) -> None:
    """`/` and `/static/*`: only the files that ship in gptj/web (StaticFiles resolves and
    confines every path)."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(str(WEB_DIR / "index.html"))

    app.mount("/static", StaticFiles(directory=str(WEB_DIR), follow_symlink=False), name="static")


def router(backend: Backend) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return await backend.health()

    @router.get("/api/info")
    async def info() -> dict:
        return await backend.info()

    @router.get("/api/presets")
    async def presets() -> dict:
        found, errors = load_presets()
        return {"presets": [p.as_dict() for p in found.values()], "errors": errors}

    @router.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return backend.metrics_text()

    return router
