"""`gptj serve`: the playground and the APIs on this machine's model or in front of another
server (`--upstream`), until SIGTERM or Ctrl-C (gptj.serve builds the apps)."""

from __future__ import annotations

import os
import signal
import threading

import httpx

from gptj.cli.common import model_from_args, weights_banner
from gptj.loading.resolve import default_quantization
from gptj.serve import create_app, create_upstream_app
from gptj.serve.backends.upstream import Upstream
from gptj.serve.guard import allowed_hosts, api_key_list, check_bind, uvicorn_config


def server_api_keys(args) -> list[str]:  # noqa: ANN001
    """`--api-key` (repeatable: one key per tenant), else GPTJ_API_KEY."""
    return api_key_list(args.api_key) or api_key_list(os.environ.get("GPTJ_API_KEY"))


def check_port(host: str, port: int) -> None:
    """Refuses a port another process listens on, plainly and before the model loads (uvicorn
    would say `[Errno 98]` after the banner). Binds as uvicorn does (SO_REUSEADDR)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"gptj serve: cannot listen on {host}:{port}: {exc.strerror or exc} "
                             f"(another server there? choose another with --port)") from None


def serve(args) -> int:  # noqa: ANN001
    """Serves until SIGTERM or SIGINT (Ctrl-C), then shuts down gracefully: no new connections
    or requests (503), running and queued requests get `--shutdown-grace` seconds to finish and
    then end with finish_reason "shutdown", so every stream closes properly; exit status 0.
    A second Ctrl-C quits at once."""
    import uvicorn

    if getattr(args, "upstream", None):  # in front of another server (vLLM, TGI, gptj): no local model
        return serve_upstream(args)
    api_keys = server_api_keys(args)
    check_bind(args.host, api_keys, args.insecure)
    check_port(args.host, args.port)
    grace = max(0.0, getattr(args, "shutdown_grace", 10.0))
    model = model_from_args(args, max_batch=args.parallel)
    model.engine.max_queue = args.max_queue
    cache = model.engine.allocate_cache()
    names = getattr(args, "served_model_name", None) or []  # --served-model-name: more names for the model
    app = create_app(model, api_key=api_keys, cors_origins=args.cors, request_timeout=getattr(args, "request_timeout", None),
                     allowed_hosts=allowed_hosts(args.host, args.allowed_hosts or ()),
                     served_model_names=names)
    url = f"http://{args.host}:{args.port}/"
    aliases = f" as {', '.join(names)}" if names else ""
    weights = weights_banner(model.info, args.quantize if args.quantize is not None else default_quantization(args.model))
    print(f"gptj: serving {model.name}{aliases} ({model.info.architecture}, weights: {weights}) at {url}; "
          f"KV cache {cache.nbytes / 2**20:.0f} MiB for {cache.n_rows} x {cache.max_len} tokens", flush=True)
    if args.open:
        import webbrowser

        threading.Timer(1.0, lambda: webbrowser.open(url)).start()

    engine = model.engine
    draining = threading.Thread(target=engine.shutdown, kwargs={"grace": grace}, name="gptj-shutdown", daemon=True)
    # Uvicorn's own limit only backs up the engine's: it cancels what is still open then.
    config = uvicorn_config(app, args.host, args.port, max_connections=args.max_connections,
                            timeout_graceful_shutdown=grace + 10)
    server = uvicorn.Server(config)
    failed = []

    def run_http() -> None:
        # Uvicorn runs in this thread (it takes no signals here); the main thread drives the
        # engine, the thread that loaded the model (see gptj.runtime.engine on why one thread).
        try:
            server.run()
        except BaseException as exc:  # a port in use ends in SystemExit
            failed.append(exc)
        finally:
            if not server.started or not draining.ident:
                engine.stop()  # the server is gone: stop driving

    http = threading.Thread(target=run_http, name="gptj-http", daemon=True)

    def handle_exit(sig: int, frame) -> None:  # noqa: ANN001
        if draining.ident:  # a second Ctrl-C: quit at once
            server.force_exit = True
            engine.stop()
            return
        # Uvicorn stops accepting connections and waits for the open ones; the engine lets
        # their requests finish within the grace period, then ends them, which closes them.
        print(f"gptj: shutting down (running requests get {grace:g} s to finish; Ctrl-C again to quit at once)",
              flush=True)
        server.should_exit = True
        draining.start()

    previous = {sig: signal.signal(sig, handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.run(on_ready=http.start)
        http.join(timeout=grace + 15)
        if draining.ident:
            draining.join(timeout=0 if server.force_exit else 30)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed and not server.started else 0


def serve_upstream(args) -> int:  # noqa: ANN001
    """`gptj serve --upstream URL [--upstream-key K]`: the front, with no local model."""
    import uvicorn

    if getattr(args, "served_model_name", None):
        raise SystemExit("gptj serve: --served-model-name names the local model; with --upstream, give the names "
                         "to the upstream (vLLM has the same flag)")
    api_keys = server_api_keys(args)
    check_bind(args.host, api_keys, args.insecure)
    check_port(args.host, args.port)
    key = args.upstream_key or os.environ.get("GPTJ_UPSTREAM_KEY")
    try:
        app = create_upstream_app(args.upstream, key, api_key=api_keys, cors_origins=args.cors,
                                  allowed_hosts=allowed_hosts(args.host, args.allowed_hosts or ()))
    except ValueError as exc:
        raise SystemExit(f"gptj serve: {exc}") from None
    upstream: Upstream = app.state.upstream
    url = f"http://{args.host}:{args.port}/"
    print(f"gptj: serving the playground and APIs at {url} in front of {upstream.v1}", flush=True)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{upstream.v1}/models", headers=headers, timeout=5.0)
        if response.status_code == 200:
            names = [m.get("id") for m in response.json().get("data", [])]
            print(f"gptj: the upstream serves {', '.join(map(str, names)) or 'no model'}", flush=True)
        else:
            print(f"gptj: warning: {upstream.v1}/models answered {response.status_code}"
                  + (" (check --upstream-key)" if response.status_code in (401, 403) else ""), flush=True)
    except (httpx.HTTPError, ValueError) as exc:
        print(f"gptj: warning: the upstream is not reachable yet ({type(exc).__name__}); "
              "requests get 502 until it is", flush=True)
    if args.open:
        import threading
        import webbrowser

        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    uvicorn.Server(uvicorn_config(app, args.host, args.port, max_connections=args.max_connections,
                                  timeout_graceful_shutdown=10)).run()
    return 0
