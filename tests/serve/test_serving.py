"""Serving many users at once: continuous batching through HTTP, the bounded queue (503 +
Retry-After), per-request time limits, disconnects inside a batch, API keys, CORS, /metrics and
graceful shutdown of a real `gptj serve` process. All on the bundled SmolLM2 model, loopback only.

Tests that need "a request that keeps running" use a long streaming generation (a blocker) and
end it by closing the connection, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from servers import free_port, running

import gptj
from gptj.serve import create_app

ROOT = Path(__file__).resolve().parents[2]
LONG = {"prompt": "Count to a thousand:", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


# ---- helpers -----------------------------------------------------------------------------------




def wait_for(condition, what: str, limit: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)



def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def read_stream(response: httpx.Response, on_event: Callable[[], object] | None = None) -> dict:
    """Text, finish reasons and whether [DONE] came, from an OpenAI completion stream;
    `on_event` is called as each event arrives."""
    text, finish, done = [], [], False
    for event in sse_events(response):
        if on_event:
            on_event()
        if event == "[DONE]":
            done = True
            continue
        for choice in event["choices"]:
            text.append(choice["text"])
            if choice["finish_reason"]:
                finish.append(choice["finish_reason"])
    return {"text": "".join(text), "finish_reason": finish[0] if len(finish) == 1 else finish,
            "finish_reasons": finish, "done": done}


class Blocker:
    """A long streaming generation that keeps a place in the batch until closed."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        self.client = httpx.Client(base_url=url, timeout=60, headers=headers or {})
        self.cm = self.client.stream("POST", "/v1/completions", json={**LONG, "stream": True})
        self.response = self.cm.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self.events = sse_events(self.response)
        next(self.events)  # a first token came: it is in the batch

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def metrics(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def idle(engine) -> bool:  # noqa: ANN001
    return engine.batch_size == 0 and engine.queue_depth == 0 and engine.in_flight == 0


# ---- continuous batching through HTTP -----------------------------------------------------------

# Different prompts, lengths, stops, streaming or not: each must come out as it does alone.
JOBS = [
    {"prompt": "The capital of France is", "max_tokens": 12, "stop": ["\n"], "stream": False},
    {"prompt": "def fibonacci(n):", "max_tokens": 20, "stream": True},
    {"prompt": "Once upon a time", "max_tokens": 16, "stop": [" city"], "stream": True},
    {"prompt": "1, 2, 3, 4,", "max_tokens": 6, "stream": False, "ignore_eos": True},
]


def run_job(url: str, job: dict) -> tuple[str, str]:
    body = {**job, "temperature": 0}
    with httpx.Client(base_url=url, timeout=120) as c:
        if job["stream"]:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                got = read_stream(r)
                assert got["done"]
                return got["text"], got["finish_reason"]
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        return choice["text"], choice["finish_reason"]


def test_concurrent_clients_get_their_results_alone(url: str, bundled_model) -> None:  # noqa: ANN001
    alone = [run_job(url, job) for job in JOBS]
    assert any(reason == "stop" for _, reason in alone) and any(reason == "length" for _, reason in alone)
    blocker = Blocker(url)  # keeps the batch running, so the jobs below all join a running batch
    try:
        results: list = [None] * len(JOBS)
        sizes: list[int] = []

        def work(i: int) -> None:
            results[i] = run_job(url, JOBS[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(JOBS))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            sizes.append(bundled_model.engine.batch_size)
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert max(sizes) >= 2  # they ran together with the blocker
    finally:
        blocker.close()
    assert results == alone
    wait_for(lambda: idle(bundled_model.engine), "the engine is idle")


def test_disconnect_inside_a_batch_leaves_the_others_alone(url: str, bundled_model) -> None:  # noqa: ANN001
    engine = bundled_model.engine
    wait_for(lambda: idle(engine), "the engine is idle")
    jobs = [{"prompt": "def fibonacci(n):", "max_tokens": 60, "ignore_eos": True, "stream": True}, JOBS[2]]
    alone = [run_job(url, job) for job in jobs]
    start = engine.stats["generated_tokens"]
    leaver = Blocker(url)
    results: list = [None, None]
    first_chunk = [threading.Event(), threading.Event()]

    def work(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c, \
                c.stream("POST", "/v1/completions", json={**jobs[i], "temperature": 0}) as r:
            got = read_stream(r, on_event=first_chunk[i].set)
            results[i] = (got["text"], got["finish_reasons"][0], got["done"])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for e in first_chunk:
        assert e.wait(60)
    assert engine.batch_size >= 2  # the leaver and the 60-token job share the batch
    leaver.close()  # one of several streams goes away mid-batch
    for t in threads:
        t.join(120)
    assert [r[:2] for r in results] == alone  # the others finished, and correctly
    assert all(r[2] for r in results)
    wait_for(lambda: idle(engine), "the leaver left the batch", 30)
    stopped_at = engine.stats["generated_tokens"]
    time.sleep(0.5)
    assert engine.stats["generated_tokens"] == stopped_at
    assert stopped_at - start < LONG["max_tokens"]


# ---- the bounded queue -------------------------------------------------------------------------


def test_queue_limit_503_with_retry_after(one_row: gptj.Model) -> None:
    engine = one_row.engine
    with running(create_app(one_row)) as base, httpx.Client(base_url=base, timeout=120) as c:
        before = metrics(c)
        blocker = Blocker(base)  # holds the only batch row
        queued: dict = {}

        def wait_in_queue() -> None:
            with httpx.Client(base_url=base, timeout=120) as c2, c2.stream(
                    "POST", "/v1/completions",
                    json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                queued["status"] = r.status_code
                queued.update(read_stream(r))

        t = threading.Thread(target=wait_in_queue)
        t.start()
        try:
            wait_for(lambda: engine.queue_depth == 1, "a request waits in the queue")
            # Six more at once: the batch (1) and the queue (1) are full, so every one is refused.
            answers: list = [None] * 6

            def knock(i: int) -> None:
                with httpx.Client(base_url=base, timeout=60) as c3:
                    answers[i] = c3.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})

            knockers = [threading.Thread(target=knock, args=(i,)) for i in range(6)]
            for k in knockers:
                k.start()
            for k in knockers:
                k.join()
            for r in answers:
                assert r.status_code == 503, r.text
                assert int(r.headers["Retry-After"]) >= 1
                error = r.json()["error"]
                assert "queue full" in error["message"] and "try again later" in error["message"]
                assert error["type"] == "server_busy"
            # The openai client sees a 503 too (an InternalServerError in its terms).
            oai = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIStatusError) as exc:
                oai.completions.create(model="gpt-j", prompt="Hi", max_tokens=2)
            assert exc.value.status_code == 503
            during = metrics(c)
            assert during["gptj_queue_depth"] == 1
            assert during["gptj_batch_size"] == 1
            assert during["gptj_queue_limit"] == 1 and during["gptj_batch_limit"] == 1
            assert during['gptj_errors_total{status="503"}'] >= before.get('gptj_errors_total{status="503"}', 0) + 7
            assert during["gptj_tokens_per_second"] > 0  # the blocker is generating
        finally:
            blocker.close()
            t.join(120)
        assert queued["status"] == 200 and queued["done"]  # the queued one got its turn
        assert queued["finish_reason"] == "length"
        wait_for(lambda: idle(engine), "the engine is idle")
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text  # places free again
        after = metrics(c)
        assert after["gptj_queue_depth"] == 0 and after["gptj_batch_size"] == 0
        assert after['gptj_requests_total{path="/v1/completions"}'] >= 10
        assert after["gptj_time_to_first_token_seconds_count"] >= before["gptj_time_to_first_token_seconds_count"] + 2
        assert after["gptj_time_to_first_token_seconds_sum"] > before["gptj_time_to_first_token_seconds_sum"]
        assert after['gptj_time_to_first_token_seconds_bucket{le="+Inf"}'] == after["gptj_time_to_first_token_seconds_count"]
        assert after["gptj_generated_tokens_total"] >= before["gptj_generated_tokens_total"] + 6
        assert after["gptj_prompt_tokens_total"] > before["gptj_prompt_tokens_total"]
        assert after['gptj_generations_total{finish_reason="length"}'] >= 2
        assert after["gptj_request_tokens_per_second"] > 0
        c.get("/no/such/route")
        assert metrics(c)['gptj_requests_total{path="other"}'] >= 1  # unknown paths share one label


# ---- time limits -------------------------------------------------------------------------------


def test_request_timeout(bundled_model) -> None:  # noqa: ANN001
    with running(create_app(bundled_model, request_timeout=2.0)) as base, httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/v1/completions", json=LONG)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "timeout"
        assert 0 < body["usage"]["completion_tokens"] < LONG["max_tokens"]
        assert body["choices"][0]["text"]  # what was generated in time is kept
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as s:
            got = read_stream(s)
        assert got["finish_reason"] == "timeout" and got["done"] and got["text"]
        # The official client takes the value as it is.
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        chat = oai.chat.completions.create(model="gpt-j", messages=[{"role": "user", "content": "Count to 1000"}],
                                           max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "timeout"
        assert metrics(c)['gptj_generations_total{finish_reason="timeout"}'] >= 3
    wait_for(lambda: idle(bundled_model.engine), "the engine is idle")


# ---- API keys and CORS -------------------------------------------------------------------------

ALLOWED, OTHER = "http://allowed.example", "http://evil.example"


def test_api_key_and_cors(bundled_model) -> None:  # noqa: ANN001
    app = create_app(bundled_model, api_key="s3cret", cors_origins=[ALLOWED])
    with running(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        key = {"Authorization": "Bearer s3cret"}
        body = {"prompt": "Hi", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = c.post("/v1/completions", json=body, headers={**key, "Origin": ALLOWED})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ALLOWED
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        r = c.post("/v1/completions", json=body, headers={**key, "Origin": OTHER})
        assert r.status_code == 200  # not a browser: served, but without the header a browser needs
        assert "access-control-allow-origin" not in r.headers
        # A 401 to an allowed page carries the header, so its script can read the error.
        r = c.post("/v1/completions", json=body, headers={"Origin": ALLOWED})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == ALLOWED
        # Preflight: no key needed; allowed for the allowed origin only.
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        r = c.options("/v1/completions", headers={**pre, "Origin": ALLOWED})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ALLOWED
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/completions", headers={**pre, "Origin": OTHER})
        assert r.status_code == 400
        assert "access-control-allow-origin" not in r.headers
        assert c.get("/health", headers={"Origin": ALLOWED}).headers["access-control-allow-origin"] == ALLOWED


def test_no_cors_headers_unless_configured(url: str) -> None:
    r = httpx.get(f"{url}/health", headers={"Origin": ALLOWED})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


# ---- graceful shutdown of `gptj serve` ----------------------------------------------------------


@pytest.mark.slow
def test_serve_shuts_down_gracefully_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    exe = Path(sys.executable).with_name("gptj")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from gptj.cli import main; sys.exit(main())"]
    # The grace period is long enough for six tokens on a slow, loaded machine, and the long
    # request too long to finish within it on a fast one (float32 weights, no drafts: thousands
    # of tokens take minutes): no dependence on the machine's speed.
    grace = 20
    cmd += ["serve", "--port", str(port), "--parallel", "2", "--context-length", "4096", "--shutdown-grace", str(grace),
            "--quantize", "none", "--speculative", "none"]
    env = {**os.environ, "GPTJ_CONFIG_DIR": str(tmp_path / "config"), "GPTJ_API_KEY": "k"}
    log = open(tmp_path / "serve.log", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-3000:]

    try:
        def up() -> bool:
            assert proc.poll() is None, output()
            try:
                return httpx.get(f"{base}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "gptj serve answers /health", 120)
        key = {"Authorization": "Bearer k"}
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 401
        results: dict = {}
        started = [threading.Event(), threading.Event()]

        def stream(i: int, body: dict) -> None:
            with httpx.Client(base_url=base, timeout=60, headers=key) as c, \
                    c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                got = read_stream(r, on_event=started[i].set)
                results[i] = {"text": got["text"], "finish": got["finish_reasons"], "done": got["done"]}

        long_one = threading.Thread(target=stream, args=(0, {**LONG, "max_tokens": 4000}))
        long_one.start()
        assert started[0].wait(60)
        short_one = threading.Thread(target=stream, args=(1, {"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                                              "ignore_eos": True}))
        short_one.start()
        assert started[1].wait(60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=grace + 60) == 0, output()
        long_one.join(10)
        short_one.join(10)
        assert results[1]["finish"] == ["length"] and results[1]["done"]  # finished within the grace period
        assert results[0]["finish"] == ["shutdown"] and results[0]["done"]  # ended with a reason, not cut off
        assert results[0]["text"]
        assert "shutting down" in output()
        with pytest.raises(httpx.TransportError):  # and it is gone
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
