"""What every HTTP app of ours (the local server and the upstream front) puts in front of its
routes: one guard for host names, API keys, body sizes, security headers, error counts and
the JSON error shape, plus the page's files and a uvicorn set-up that slow clients cannot pin.

Why a guard of our own and not Starlette's TrustedHostMiddleware and friends: the checks must
run in one order (count, host, size, key), answer in the API's JSON error shape, name the flag
that would allow a refused request, and tell the routes which tenant (API key) is calling.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("gptj.serve")

MAX_BODY_BYTES = 1_000_000
WEB_DIR = Path(__file__).parents[1] / "web"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Paths anyone may read without a key: the page, its files, the docs, health and metrics.
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/metrics"})
OPEN_PREFIXES = ("/static/", "/static-offline-docs/")
HEAD_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this (slowloris)
BODY_TIMEOUT_S = 30.0  # and its body within this of the first read (a byte at a time holds a route)
MAX_CONNECTIONS = 256  # open connections past this get 503

PAGE_CSP = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
# Swagger UI's page starts itself with an inline script and inline styles.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


class ClientDisconnected(Exception):  # noqa: N818 (an event, not a fault)
    """The client went away before its response: its generation was cancelled, nothing to send."""


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# ---- host names ------------------------------------------------------------------------------


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`, `Example.com.` -> `example.com`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") > 1:  # a bare IPv6 address
        return header
    return header.partition(":")[0].rstrip(".")


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server answers: loopback, the name it was told to listen on, and
    `--allowed-hosts`; a wildcard bind adds this machine's own name. None (with "*"): any."""
    names = set(LOOPBACK_NAMES)
    for item in extra:
        for name in item.split(","):
            if name.strip() == "*":
                return None
            if name.strip():
                names.add(host_name(name))
    wildcard = bind_host in ("0.0.0.0", "::", "")
    if not wildcard:
        names.add(host_name(bind_host) if not bind_host.count(":") > 1 else bind_host.lower())
    else:
        hostname = socket.gethostname().lower()
        names |= {hostname, socket.getfqdn().lower()}
    return frozenset(names)


def check_bind(host: str, api_keys: Sequence[str], insecure: bool) -> None:
    """Refuses to expose the API beyond this machine without a key (unless told so)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not api_keys and not insecure:
        raise SystemExit(
            f"gptj serve: refusing to listen on {host} without an API key: anyone who can reach it could use it. "
            "Set --api-key (or GPTJ_API_KEY), or pass --insecure if that is what you want."
        )
    if not api_keys:
        print(f"gptj: warning: --insecure: listening on {host} with no API key; anyone who can reach this "
              "port can generate, and read what the page serves", flush=True)


def cache_scope(tenant: str | None, salt: str | None) -> str | None:
    """The prefix-cache scope of a request: requests share cached prompts only within one
    scope (one API key, one cache_salt). None: the shared scope of keyless, saltless requests."""
    if tenant is None and not salt:
        return None
    return hashlib.sha256(f"{tenant or ''}\0{salt or ''}".encode()).hexdigest()[:32]


# ---- the guard -------------------------------------------------------------------------------


@dataclass
class RequestCounts:
    """Requests by route label and responses by status >= 400, for /metrics."""

    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)

    def count_error(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1


class Guard:
    """ASGI middleware, outermost of the app's own: counts the request, refuses foreign Host
    names (DNS rebinding), bodies over MAX_BODY_BYTES (also chunked ones, as they stream), bodies
    that take over BODY_TIMEOUT_S (408) and missing or wrong API keys; tells the routes the
    caller's tenant (`request.state.tenant`, the index of its key); adds the security headers;
    turns any exception that escapes the routes into a counted JSON 500."""

    def __init__(self, app, *, api_keys: Sequence[str] = (), hosts: frozenset[str] | None = LOOPBACK_NAMES,  # noqa: ANN001
                 counts: RequestCounts, label: Callable[[str], str]) -> None:
        self.app, self.counts, self.label, self.hosts = app, counts, label, hosts
        self.keys = [k.encode() for k in api_keys if k]

    def refusal(self, scope: dict) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            shown = host[:64] or "(none)"
            return APIError(421, f"Host: {shown!r} is not a name this server answers to; allowed: "
                            f"{', '.join(sorted(self.hosts))} (add names with --allowed-hosts)", "Host")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return APIError(413, f"body: {length} bytes is over the limit of {MAX_BODY_BYTES} bytes", "body")
        path = scope["path"]
        if self.keys and scope["method"] != "OPTIONS" and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            tenant = self.tenant(headers.get("authorization", ""))
            if tenant is None:
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                                "authentication_error")
            scope.setdefault("state", {})["tenant"] = tenant
        return None

    def tenant(self, authorization: str) -> str | None:
        """`key<i>` for the i-th key; every key is compared, in constant time."""
        scheme, _, given = authorization.partition(" ")
        given_bytes = given.strip().encode("utf-8", "replace") if scheme.lower() == "bearer" else b""
        found = None
        for i, key in enumerate(self.keys):
            if secrets.compare_digest(given_bytes, key) and found is None:
                found = f"key{i}"
        return found

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = self.label(scope["path"])
        self.counts.requests[label] = self.counts.requests.get(label, 0) + 1
        csp = (DOCS_CSP if scope["path"] == "/docs" else PAGE_CSP).encode()
        started = False

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self.counts.count_error(message["status"])
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS,
                                      (b"content-security-policy", csp)]
            await send(message)

        error = self.refusal(scope)
        if error is not None:
            return await error_response(error)(scope, receive, guarded_send)
        received, body_done, deadline = 0, False, None

        async def limited_receive() -> dict:
            nonlocal received, body_done, deadline
            if body_done:  # after the body: the route waits for a disconnect, for as long as it streams
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + BODY_TIMEOUT_S
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise HTTPException(408, f"body: not received within {BODY_TIMEOUT_S:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise HTTPException(413, f"body: over the limit of {MAX_BODY_BYTES} bytes")
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, guarded_send)
        except ClientDisconnected:
            log.warning("%s %s: the client disconnected; its generation was cancelled", scope["method"], scope["path"])
        except Exception as exc:  # a bug of ours: a counted JSON 500 with no traceback for the client
            log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(exc).__name__, exc, exc_info=exc)
            if not started:
                await error_response(APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                                              None, "server_error"))(scope, receive, guarded_send)


def install_guard(app: FastAPI, counts: RequestCounts, label: Callable[[str], str], *,
                  api_keys: Sequence[str] = (), hosts: frozenset[str] | None = LOOPBACK_NAMES) -> None:
    app.add_middleware(Guard, api_keys=list(api_keys), hosts=hosts, counts=counts, label=label)


def api_key_list(keys: str | Sequence[str] | None) -> list[str]:
    """`--api-key` may be given once (a string) or several times (a list): one key per tenant."""
    if keys is None:
        return []
    return [keys] if isinstance(keys, str) else [k for k in keys if k]


# ---- uvicorn ---------------------------------------------------------------------------------


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers: uvicorn has
    none, so a client that sends its headers a byte at a time would hold a connection for ever."""

    head_timeout = HEAD_TIMEOUT_S

    def connection_made(self, transport) -> None:  # noqa: ANN001
        super().connection_made(transport)
        self._head_timer: Any = self.loop.call_later(self.head_timeout, self._head_overdue)

    def handle_events(self) -> None:
        super().handle_events()
        waiting_head = self.conn.their_state is h11.IDLE
        if not waiting_head and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        elif waiting_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.warning("closing a connection whose request head took over %g s", self.head_timeout)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def uvicorn_config(app: FastAPI, host: str, port: int, *, head_timeout: float = HEAD_TIMEOUT_S,
                   max_connections: int = MAX_CONNECTIONS, **options: Any):  # noqa: ANN201
    """The uvicorn Config every server of ours runs with: a deadline for request heads, a cap
    on open connections (503 past it) and a short keep-alive."""
    import uvicorn

    protocol = type("GuardedH11Protocol", (HeadTimeoutH11Protocol,), {"head_timeout": head_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=max_connections,
                          timeout_keep_alive=5, log_level=options.pop("log_level", "warning"), **options)
