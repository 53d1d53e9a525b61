"""Schemathesis fuzzes every operation of the server's OpenAPI document, against a live loopback
server on the bundled SmolLM2 weights, and no answer may be a 5xx.

Generation is kept short without shaping what is generated: the engine behind the app has a
512-token context window (larger max_tokens are a quick 400) and a 1 s request time limit, so an
example takes at most about a second however large a length it asks for."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from servers import running

import gptj
from gptj.serve import create_app

# Per operation and kind (valid, invalid). The same examples every run, unless GPTJ_FUZZ_RANDOM=1:
# e.g. `GPTJ_FUZZ_EXAMPLES=200 GPTJ_FUZZ_RANDOM=1 pytest tests/test_fuzz.py` for a longer hunt.
EXAMPLES = int(os.environ.get("GPTJ_FUZZ_EXAMPLES", "15"))
RANDOM = os.environ.get("GPTJ_FUZZ_RANDOM") == "1"





@pytest.fixture(scope="module")
def fuzz_url(bundled_model) -> Iterator[str]:  # noqa: ANN001
    small = gptj.Model(bundled_model.module, bundled_model.tokenizer, bundled_model.info, max_batch=4,
                       context_length=512)
    try:
        with running(create_app(small, request_timeout=1.0)) as url:
            yield url
    finally:
        small.engine.shutdown(grace=0)


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str):  # noqa: ANN201
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


STATUS: dict[tuple, list[int]] = {}  # what the server answered, by (operation, mode)

# Every operation in the document (test_every_operation_is_fuzzed keeps this list complete).
OPERATIONS = [
    "GET /health", "GET /api/info", "GET /api/presets", "GET /v1/models", "GET /metrics",
    "POST /tokenize", "POST /detokenize", "POST /v1/completions", "POST /v1/chat/completions",
    "POST /complete", "POST /completion",
    # Ollama's
    "GET /api/version", "GET /api/tags", "GET /api/ps", "POST /api/show", "POST /api/generate", "POST /api/chat",
    # KoboldAI's (KoboldCpp's)
    "GET /api/v1/model", "GET /api/v1/info/version", "GET /api/v1/config/max_length",
    "GET /api/v1/config/max_context_length", "GET /api/extra/true_max_context_length", "GET /api/extra/version",
    "POST /api/v1/generate", "POST /api/extra/generate/stream", "POST /api/extra/generate/check",
    "POST /api/extra/abort", "POST /api/extra/tokencount",
]


def test_every_operation_is_fuzzed(api_schema) -> None:  # noqa: ANN001
    found = {f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# One valid body per POST operation, tried first: whatever the fuzzer draws, every operation
# does its real work at least once (the schema allows much that the server refuses with a 400).
VALID = {
    "POST /tokenize": {"text": "Hello world"},
    "POST /detokenize": {"tokens": [1, 2, 3]},
    "POST /v1/completions": {"prompt": "The capital of France is", "max_tokens": 4, "n": 2, "logprobs": 2},
    "POST /v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
    "POST /complete": {"context": "Once upon a time", "length": 4},
    "POST /completion": {"context": "Once upon a time", "response_length": 4},
    "POST /api/show": {"model": "any"},
    "POST /api/generate": {"model": "any", "prompt": "Once upon a time", "options": {"num_predict": 4}},
    "POST /api/chat": {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "stream": False,
                       "options": {"num_predict": 4}},
    "POST /api/v1/generate": {"prompt": "Once upon a time", "max_length": 4},
    "POST /api/extra/generate/stream": {"prompt": "Once upon a time", "max_length": 4},
    "POST /api/extra/generate/check": {"genkey": "KCPP1"},
    "POST /api/extra/abort": {"genkey": "KCPP1"},
    "POST /api/extra/tokencount": {"prompt": "Hello world"},
}

# Operations without parameters or a body have no invalid input to make.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS]
CASES += [(label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_no_server_errors(api_schema, label: str, mode: GenerationMode) -> None:  # noqa: ANN001
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]

    valid = operation.Case(body=VALID[label]) if label in VALID else operation.Case()

    @given(case=operation.as_strategy(generation_mode=mode))
    @example(case=valid)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def fuzz(case) -> None:  # noqa: ANN001
        response = case.call(timeout=60)
        STATUS.setdefault((label, mode), []).append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    if mode is GenerationMode.POSITIVE:  # the valid example did the work, not only the checks
        assert 200 in STATUS[label, mode], sorted(STATUS[label, mode])
