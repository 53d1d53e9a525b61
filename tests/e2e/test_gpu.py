"""`load(device=...)` / `--device`: CUDA when there is a GPU. The CUDA tests skip without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gptj
from gptj.cli import build_parser
from gptj.device import resolve_device
from gptj.loading.random_checkpoint import make_random_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT_IDS = [464, 3139, 286, 4881, 318, 262, 3139, 286]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "gptj", "tiny", "safetensors", seed=3)


def greedy(model: gptj.Model, n: int = 16) -> list[int]:
    return model.generate(PROMPT_IDS, max_new_tokens=n, temperature=0, ignore_eos=True).tokens


def test_cpu_is_the_default_and_auto_falls_back_to_it(tiny: Path) -> None:
    model = gptj.load(str(tiny))
    assert model.device == torch.device("cpu") and model.info.device == "cpu"
    assert resolve_device(None).type == "cpu" and resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert build_parser().parse_args(["generate", "x"]).device == "auto"
    assert build_parser().parse_args(["serve", "--device", "cpu"]).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_fails_clearly(tiny: Path) -> None:
    with pytest.raises(gptj.ModelLoadError, match="no CUDA GPU"):
        gptj.load(str(tiny), device="cuda")


def test_unknown_devices_are_refused(tiny: Path) -> None:
    for bad in ("tpu", "mps", "cuda:x"):
        with pytest.raises(gptj.ModelLoadError, match="device"):
            gptj.load(str(tiny), device=bad)


@cuda
def test_greedy_tokens_on_cuda_equal_the_cpu_ones(tiny: Path) -> None:
    cpu = gptj.load(str(tiny), dtype=torch.float32)
    gpu = gptj.load(str(tiny), dtype=torch.float32, device="cuda")
    assert gpu.device.type == "cuda" and gpu.info.device.startswith("cuda")
    assert all(p.device.type == "cuda" for p in gpu.module.parameters())
    torch.testing.assert_close(gpu.logits(PROMPT_IDS), cpu.logits(PROMPT_IDS), atol=1e-4, rtol=1e-4)
    assert greedy(gpu) == greedy(cpu)
    assert gpu.engine.cache is not None and gpu.engine.cache.k.device.type == "cuda"


@cuda
def test_batched_requests_on_cuda_match_one_at_a_time(tiny: Path) -> None:
    gpu = gptj.load(str(tiny), dtype=torch.float32, device="cuda", max_batch=3)
    alone = [gpu.generate(PROMPT_IDS[: 3 + i], max_new_tokens=8, temperature=0, ignore_eos=True).tokens for i in range(3)]
    handles = [gpu.submit(PROMPT_IDS[: 3 + i], max_new_tokens=8, temperature=0, ignore_eos=True) for i in range(3)]
    assert [h.result().tokens for h in handles] == alone
    seeded = [gpu.generate(PROMPT_IDS, max_new_tokens=8, temperature=0.8, seed=5).tokens for _ in range(2)]
    assert seeded[0] == seeded[1]


@cuda
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_quantized_weights_on_cuda_match_the_cpu(tiny: Path, mode: str) -> None:
    cpu = gptj.load(str(tiny), quantize=mode)
    gpu = gptj.load(str(tiny), quantize=mode, device="cuda")
    assert all(t.device.type == "cuda" for t in [*gpu.module.parameters(), *gpu.module.buffers()])
    ref = gptj.load(str(tiny), dtype=torch.float32).logits(PROMPT_IDS)
    got_cpu, got_gpu = cpu.logits(PROMPT_IDS), gpu.logits(PROMPT_IDS)
    # the same quantized weights: the devices agree far better than either agrees with float32
    assert (got_gpu - got_cpu).abs().max() < 0.05 + (got_cpu - ref).abs().max()
    assert len(greedy(gpu, 8)) == 8


@cuda
def test_the_bundled_model_generates_on_cuda() -> None:
    model = gptj.load(device="cuda")
    assert model.device.type == "cuda"
    result = model.generate("The capital of France is", max_new_tokens=8, temperature=0)
    assert result.text.strip() and result.finish_reason in ("stop", "length")
    assert "".join(model.stream("Once upon a time", max_new_tokens=8, seed=1)).strip()
    cpu = gptj.load(device="cpu")
    assert result.tokens[:3] == cpu.generate("The capital of France is", max_new_tokens=8, temperature=0).tokens[:3]
