"""Quantized weights keep the bundled model's quality: perplexity on a fixed text
(tests/data/perplexity.txt, 283 tokens) against float32. benchmarks/bench_quality.py prints
the same figures as a table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gptj

TEXT = Path(__file__).parent / "data" / "perplexity.txt"


def perplexity(model: gptj.Model, ids: list[int]) -> float:
    logits = model.logits(ids)  # the whole text is one forward pass (within the context window)
    return math.exp(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item())


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return gptj.load_tokenizer("smollm2").encode(TEXT.read_text())[:512]


@pytest.fixture(scope="module")
def float32_perplexity(bundled_model: gptj.Model, ids: list[int]) -> float:
    assert bundled_model.info.quantization == "none" and bundled_model.info.dtype == "float32"
    return perplexity(bundled_model, ids)


@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("mode, tolerance", [("int8", 0.01), ("int4", 0.10)])
def test_quantized_perplexity_stays_near_float32(
    mode: str, tolerance: float, path: str, ids: list[int], float32_perplexity: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """"prefill": the quantized layers dequantize and run a GEMM (what a long prompt takes);
    "decode": every row goes through the decode path (our GEMV kernel where it is built, which
    quantizes the activations too)."""
    assert len(ids) > 250 and 10 < float32_perplexity < 30  # the text and model are what we think
    if path == "decode":
        monkeypatch.setenv("GPTJ_QUANT_DECODE_MAX_ROWS", str(len(ids)))
    model = gptj.load(quantize=mode)
    try:
        ppl = perplexity(model, ids)
    finally:
        model.engine.shutdown(grace=0)
    change = ppl / float32_perplexity - 1
    assert abs(change) < tolerance, f"{mode} {path}: perplexity {ppl:.2f} vs float32 {float32_perplexity:.2f}"
