"""The one JSON error shape ({"error": {message, type, param, code}}) for every failure."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from gptj.errors import InvalidRequest, Unavailable
from gptj.serve.guard import APIError, error_response


def install_error_handlers(app: FastAPI) -> None:
    """The JSON error format ({"error": {message, type, param, code}}) for every failure: also
    used by both backends, so the local server and the upstream front answer errors the same way."""

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(InvalidRequest)
    async def on_invalid(_: Request, err: InvalidRequest) -> JSONResponse:
        if err.field == "max_new_tokens":  # the engine's name for what HTTP clients send as max_tokens
            return error_response(APIError(400, "max_tokens" + str(err).removeprefix("max_new_tokens"), "max_tokens"))
        return error_response(APIError(400, str(err), err.field))

    @app.exception_handler(Unavailable)
    async def on_full(_: Request, err: Unavailable) -> JSONResponse:
        return error_response(APIError(503, str(err), None, "server_busy", {"Retry-After": "2"}))

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(err))

    # Starlette's class: FastAPI raises it for unknown routes and bodies it cannot decode.
    @app.exception_handler(HTTPException)
    async def on_http(_: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 400 and err.detail == "There was an error parsing the body":  # e.g. not UTF-8
            return error_response(APIError(400, "body: must be valid UTF-8 JSON", "body"))
        param = "body" if err.status_code in (408, 413) else None
        return error_response(APIError(err.status_code, str(err.detail), param, headers=err.headers))


def validation_error(err: RequestValidationError) -> APIError:
    """The 400 for a body that failed validation: its first error, naming the field."""
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    param = ".".join(loc) or "body"
    message = first.get("msg", "invalid request")
    if first.get("type") in ("lone_surrogate", "field_error"):  # a check of the whole body that names the field
        param = first.get("ctx", {}).get("field", param)
        message = f"{param}: {message}"
    elif first.get("type") == "json_invalid":
        message, param = "body: must be valid UTF-8 JSON", "body"
    else:
        message = f"{param}: {message}"
    return APIError(400, message, param)


def as_api_error(exc: Exception, fields: dict[str, str] | None = None) -> APIError | None:
    """The APIError the app's handlers answer for `exc` (None: not one they know). `fields`
    renames the engine's setting names to an API's own (max_new_tokens -> num_predict)."""
    fields = fields or {}
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, InvalidRequest):
        name = fields.get(exc.field or "", exc.field)
        message = str(exc)
        if name != exc.field and exc.field and message.startswith(exc.field):
            message = name + message.removeprefix(exc.field)
        return APIError(400, message, name)
    if isinstance(exc, Unavailable):
        return APIError(503, str(exc), None, "server_busy", {"Retry-After": "2"})
    return None


def shaped_errors(shape: Callable[[APIError], dict], fields: dict[str, str] | None = None) -> type[APIRoute]:
    """A route class whose errors (bad bodies, bad settings, a full queue) are answered in
    another API's JSON shape (`shape(error)`), with the engine's field names renamed by `fields`.
    Errors raised before the route (the guard's 401/413) keep the app's own shape."""

    class ShapedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    err = as_api_error(exc, fields)
                    if err is None:
                        raise
                    return JSONResponse(shape(err), status_code=err.status, headers=err.headers)

            return shaped

    return ShapedRoute
