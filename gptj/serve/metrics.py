"""What /metrics reports: requests and errors by route (the guard counts them), time to the
first token, and the engine's batch, queue, tokens and prefix cache, in Prometheus' text format."""

from __future__ import annotations

import bisect

from gptj.runtime.engine import Completion, Engine
from gptj.serve.guard import RequestCounts

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics(RequestCounts):
    def __init__(self) -> None:
        super().__init__()
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)  # not cumulative; summed up when shown
        self.gen_seconds, self.gen_tokens = 0.0, 0

    def observe(self, c: Completion, seconds: float) -> None:
        if c.time_to_first_token is not None:
            self.ttft_sum += c.time_to_first_token
            self.ttft_count += 1
            i = bisect.bisect_left(TTFT_BUCKETS, c.time_to_first_token)
            if i < len(TTFT_BUCKETS):
                self.ttft_buckets[i] += 1
        self.gen_seconds += seconds
        self.gen_tokens += c.completion_tokens


def request_lines(counts: RequestCounts, requests_help: str, errors_help: str) -> list[str]:
    return [
        f"# HELP gptj_requests_total {requests_help}",
        "# TYPE gptj_requests_total counter",
        *[f'gptj_requests_total{{path="{p}"}} {n}' for p, n in sorted(counts.requests.items())],
        f"# HELP gptj_errors_total {errors_help}",
        "# TYPE gptj_errors_total counter",
        *[f'gptj_errors_total{{status="{c}"}} {n}' for c, n in sorted(counts.errors.items())],
    ]


def engine_metrics(metrics: Metrics, engine: Engine) -> str:
    """The local server's /metrics."""
    s = engine.stats
    buckets, total = [], 0
    for le, n in zip(TTFT_BUCKETS, metrics.ttft_buckets, strict=True):
        total += n
        buckets.append(f'gptj_time_to_first_token_seconds_bucket{{le="{le}"}} {total}')
    lines = [
        *request_lines(metrics, "HTTP requests by route ('other': no such route)",
                       "HTTP responses with status >= 400 (503: queue full or shutting down)"),
        "# HELP gptj_generations_total generation requests finished, by finish_reason",
        "# TYPE gptj_generations_total counter",
        *[f'gptj_generations_total{{finish_reason="{r}"}} {n}' for r, n in sorted(engine.finish_reasons.items())],
        "# TYPE gptj_generated_tokens_total counter",
        f"gptj_generated_tokens_total {s['generated_tokens']}",
        "# TYPE gptj_prompt_tokens_total counter",
        f"gptj_prompt_tokens_total {s['prompt_tokens']}",
        "# TYPE gptj_cached_prompt_tokens_total counter",
        f"gptj_cached_prompt_tokens_total {s['cached_prompt_tokens']}",
        "# HELP gptj_speculative_drafted_tokens_total tokens drafted by prompt lookup and checked in a pass",
        "# TYPE gptj_speculative_drafted_tokens_total counter",
        f"gptj_speculative_drafted_tokens_total {s['drafted_tokens']}",
        "# HELP gptj_speculative_accepted_tokens_total drafted tokens the model kept (acceptance: accepted / drafted)",
        "# TYPE gptj_speculative_accepted_tokens_total counter",
        f"gptj_speculative_accepted_tokens_total {s['accepted_tokens']}",
        "# HELP gptj_queue_depth requests waiting for a place in the batch",
        "# TYPE gptj_queue_depth gauge",
        f"gptj_queue_depth {engine.queue_depth}",
        "# TYPE gptj_queue_limit gauge",
        f"gptj_queue_limit {engine.max_queue}",
        "# HELP gptj_batch_size requests in the running batch",
        "# TYPE gptj_batch_size gauge",
        f"gptj_batch_size {engine.batch_size}",
        "# TYPE gptj_batch_limit gauge",
        f"gptj_batch_limit {engine.max_batch}",
        "# HELP gptj_prefix_cache_bytes keys/values of earlier prompts kept for reuse (bounded by --prefix-cache)",
        "# TYPE gptj_prefix_cache_bytes gauge",
        f"gptj_prefix_cache_bytes {engine.prefix_store.nbytes if engine.prefix_store else 0}",
        "# HELP gptj_time_to_first_token_seconds from arrival (queueing included) to the first token",
        "# TYPE gptj_time_to_first_token_seconds histogram",
        *buckets,
        f'gptj_time_to_first_token_seconds_bucket{{le="+Inf"}} {metrics.ttft_count}',
        f"gptj_time_to_first_token_seconds_sum {metrics.ttft_sum:.6f}",
        f"gptj_time_to_first_token_seconds_count {metrics.ttft_count}",
        "# HELP gptj_tokens_per_second tokens generated per second over the last 10 s, all requests together",
        "# TYPE gptj_tokens_per_second gauge",
        f"gptj_tokens_per_second {engine.tokens_per_second(10.0):.3f}",
        "# HELP gptj_request_tokens_per_second mean speed of one request: its tokens over its time",
        "# TYPE gptj_request_tokens_per_second gauge",
        f"gptj_request_tokens_per_second {metrics.gen_tokens / metrics.gen_seconds if metrics.gen_seconds else 0:.3f}",
    ]
    return "\n".join(lines) + "\n"
