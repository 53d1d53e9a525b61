"""Loopback load test of `gptj serve`: many clients streaming completions at once.

Starts `gptj serve` (a subprocess, on 127.0.0.1 only) on a model, then for each concurrency level
runs that many clients for --duration seconds, each streaming completions one after another, and
prints a table: aggregate generated tokens per second, p50/p95 time to first token (client side),
errors by kind (503 = queue full; other), and the server's resident memory (VmRSS) before and
after the level. It stops by itself: each level ends after --duration seconds plus the requests
still running (the server's --request-timeout bounds those), and the server is stopped at the end.

    python benchmarks/load_test.py --duration 15                        # the bundled SmolLM2-135M
    gptj make-random-checkpoint /tmp/gptj6b --shape 6b                   # ~12 GB, takes a while
    python benchmarks/load_test.py --model /tmp/gptj6b --quantize int8 --duration 60 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["a lighthouse", "a city at night", "the first snow", "a lost key", "an old map", "a robot gardener",
          "a quiet library", "the last train", "a river in spring", "a clockmaker"]


@dataclass
class Level:
    concurrency: int
    requests: int = 0
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    busy: int = 0  # 503: the queue was full
    other: int = 0  # any other failure: status, broken stream, transport error
    wall: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """The process's resident memory (VmRSS) in KiB, 0 if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def one_request(client: httpx.Client, body: dict, level: Level) -> float:
    """Streams one completion; records it in `level`. Returns seconds to wait before the next."""
    t0 = time.monotonic()
    first: float | None = None
    tokens, finished, done = 0, False, False
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 503:
                r.read()
                with level.lock:
                    level.busy += 1
                return min(float(r.headers.get("Retry-After", "1")), 0.5)
            if r.status_code != 200:
                r.read()
                with level.lock:
                    level.other += 1
                return 0.1
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if first is None:
                    first = time.monotonic() - t0
                for choice in event["choices"]:
                    finished = finished or bool(choice["finish_reason"])
                if event.get("usage"):  # the last chunk (stream_options.include_usage)
                    tokens = event["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError):
        with level.lock:
            level.other += 1
        return 0.1
    with level.lock:
        if done and finished:
            level.requests += 1
            level.tokens += tokens
            if first is not None:
                level.ttfts.append(first)
        else:
            level.other += 1
    return 0.0


def prefix_cache_bytes(base: str) -> int:
    """What the server's prefix cache holds (from /metrics), 0 if it does not say."""
    try:
        for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
            if line.startswith("gptj_prefix_cache_bytes "):
                return int(float(line.split()[1]))
    except httpx.HTTPError:
        pass
    return 0


def run_level(base: str, pid: int, concurrency: int, args: argparse.Namespace) -> Level:
    level = Level(concurrency, rss_before=rss_kib(pid))
    end = time.monotonic() + args.duration

    def client_loop(i: int) -> None:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(args.request_timeout + 30, connect=10)) as client:
            k = 0
            while time.monotonic() < end:
                body = {"prompt": f"Client {i}, story {k}: a short story about {TOPICS[(i + k) % len(TOPICS)]}.\n",
                        "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i * 1000 + k,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                pause = one_request(client, body, level)
                k += 1
                if pause:
                    time.sleep(pause)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.request_timeout + 60)
    level.wall = time.monotonic() - t0
    level.rss_after = rss_kib(pid)
    return level


def start_server(args: argparse.Namespace, log) -> tuple[subprocess.Popen, str]:  # noqa: ANN001
    port = free_port()
    cmd = [sys.executable, "-m", "gptj.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(args.parallel), "--max-queue", str(args.max_queue),
           "--request-timeout", str(args.request_timeout), "--shutdown-grace", "5"]
    if args.model:
        cmd += ["--model", args.model]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.context_length:
        cmd += ["--context-length", str(args.context_length)]
    env = {k: v for k, v in os.environ.items() if k != "GPTJ_API_KEY"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gptj serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gptj serve did not answer within {args.startup_timeout:g} s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def table(levels: list[Level]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    head = (f"{'clients':>7} {'requests':>8} {'tokens':>7} {'tok/s':>7} {'TTFT p50 ms':>11} {'TTFT p95 ms':>11} "
            f"{'503':>5} {'other':>5} {'RSS before MB':>13} {'RSS after MB':>12}")
    rows = [head, "-" * len(head)]
    for lv in levels:
        rows.append(f"{lv.concurrency:>7} {lv.requests:>8} {lv.tokens:>7} {lv.tokens / lv.wall if lv.wall else 0:>7.1f} "
                    f"{ms(percentile(lv.ttfts, 50)):>11} {ms(percentile(lv.ttfts, 95)):>11} {lv.busy:>5} {lv.other:>5} "
                    f"{lv.rss_before / 1024:>13.0f} {lv.rss_after / 1024:>12.0f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder, .gguf or repo id (default: the bundled SmolLM2)")
    p.add_argument("--quantize", choices=["bf16", "int8", "int4"], default=None)
    p.add_argument("--context-length", type=int, default=2048,
                   help="the server's context window (default 2048, GPT-J's; it sizes the KV cache; 0: the model's)")
    p.add_argument("--parallel", type=int, default=8, help="the server's batch rows (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="the server's queue limit (default 64)")
    p.add_argument("--concurrency", default="1,4,8",
                   help="client counts, one level each, in this order; a count given again is averaged (default 1,4,8)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per level (default 30)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="the server's per-request limit (default 120 s)")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for the model to load")
    args = p.parse_args(argv)
    levels_wanted = [int(c) for c in args.concurrency.split(",") if c.strip()]

    with tempfile.NamedTemporaryFile("w+b", prefix="gptj-load-", suffix=".log") as log:
        t0 = time.monotonic()
        try:
            proc, base = start_server(args, log)
        except RuntimeError as exc:
            log.seek(0)
            print(f"load_test: {exc}\n{log.read().decode(errors='replace')[-3000:]}", file=sys.stderr)
            return 1
        try:
            info = httpx.get(f"{base}/api/info", timeout=10).json()
            print(f"server: {info['name']} ({info.get('architecture')}, {info.get('quantization')}), "
                  f"parallel {info['parallel']}, context {info['context_length']}, "
                  f"loaded in {time.monotonic() - t0:.1f} s, RSS {rss_kib(proc.pid) / 1024:.0f} MB (idle)")
            print(f"load: {args.duration:g} s per level, {args.max_tokens} tokens per streamed completion, "
                  f"{os.cpu_count()} CPUs\n", flush=True)
            # One request first: memory-mapped weights are read in (resident) on first use, which
            # is not growth under load. The RSS change below is measured from here.
            httpx.post(f"{base}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=args.request_timeout)
            warm = rss_kib(proc.pid)
            print(f"RSS after one warm-up request: {warm / 1024:.0f} MB", flush=True)
            levels = []
            for c in levels_wanted:
                levels.append(run_level(base, proc.pid, c, args))
                print(f"  {c} clients: done", flush=True)
            print()
            print(table(levels))
            if levels and warm:
                # a level given twice (--concurrency 1,8,1,8: interleaved, as a VM's bandwidth drifts)
                # counts with the mean of its runs
                by_count: dict[int, list[float]] = {}
                for lv in levels:
                    by_count.setdefault(lv.concurrency, []).append(lv.tokens / lv.wall if lv.wall else 0.0)
                first = levels[0].concurrency
                base_tps = statistics.mean(by_count[first])
                for count, runs in by_count.items():
                    if count != first and base_tps:
                        print(f"{count} clients: {statistics.mean(runs) / base_tps:.1f}x the aggregate tokens/s "
                              f"of {first}" + (f" (means of {len(runs)} and {len(by_count[first])} runs)"
                                               if len(runs) > 1 or len(by_count[first]) > 1 else ""))
                change = (levels[-1].rss_after - warm) / warm * 100
                kept = prefix_cache_bytes(base) / 1024
                print(f"RSS after the run vs after warm-up: {change:+.1f} %; of that, the prefix cache (bounded "
                      f"by --prefix-cache) holds {kept / 1024:.0f} MB: {(levels[-1].rss_after - kept - warm) / warm * 100:+.1f} % "
                      "without it")
        finally:
            code = stop_server(proc)
        print(f"\nserver stopped (exit status {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
