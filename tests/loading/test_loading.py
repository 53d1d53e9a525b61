"""Every Hugging Face layout of GPT-J loads to transformers' logits; every broken one fails clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPTJForCausalLM

import gptj
from gptj.errors import ModelLoadError, ModelTooLarge
from gptj.loading.random_checkpoint import make_random_checkpoint

SHAPE = dict(n_embd=48, n_head=3, n_layer=2, rotary_dim=8)  # odd head count on purpose


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return gptj.load_tokenizer("gpt-j").encode("GPT-J loads from every layout. ✓")


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "sharded-safetensors", "sharded-bin"])
def test_each_layout_matches_transformers(tmp_path: Path, fmt: str, ids: list[int]) -> None:
    folder = make_random_checkpoint(tmp_path / fmt, SHAPE, fmt, shard_bytes=3_000_000)
    if fmt.startswith("sharded"):
        assert len([f for f in folder.iterdir() if "-of-" in f.name]) > 1
    if fmt == "bin":
        assert "transformer.h.0.attn.masked_bias" in torch.load(folder / "pytorch_model.bin", weights_only=True)
    model = gptj.load(str(folder), dtype=torch.float32)
    ref = GPTJForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(model.logits(ids), expected, atol=1e-4, rtol=0)
    assert model.info.architecture == "gptj" and model.info.parameters == sum(p.numel() for p in ref.parameters())


def test_repo_id_resolves_from_the_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ids: list[int]) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--EleutherAI--gpt-j-6b" / "snapshots" / ("a" * 40)
    make_random_checkpoint(snapshot, "tiny", "bin")
    (cache / "models--EleutherAI--gpt-j-6b" / "refs").mkdir()
    (cache / "models--EleutherAI--gpt-j-6b" / "refs" / "float16").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = gptj.load("EleutherAI/gpt-j-6b", revision="float16", dtype=torch.float32)
    assert model.info.path == str(snapshot)
    with pytest.raises(ModelLoadError, match="gptj pull EleutherAI/gpt-j-6b"):
        gptj.load("EleutherAI/gpt-j-6b")  # no 'main' ref in the cache


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        gptj.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty"):
        gptj.load(str(tmp_path / "empty"))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        gptj.load(str(tmp_path / "config_only"))


def test_unknown_architecture(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "m", "tiny", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unknown architecture 'bert'.*gptj"):
        gptj.load(str(folder))


@pytest.mark.parametrize("fmt,file", [("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")])
def test_truncated_weight_file(tmp_path: Path, fmt: str, file: str) -> None:
    folder = make_random_checkpoint(tmp_path / fmt, "tiny", fmt)
    path = folder / file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=f"{file} is truncated or corrupt"):
        gptj.load(str(folder))


def test_corrupt_bytes(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "m", "tiny", "safetensors")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        gptj.load(str(folder))


def test_tensor_of_the_wrong_shape(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "m", "tiny", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["n_inner"] = 100  # the checkpoint's MLP is 4 * 64 = 256 wide
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"fc_in.bias' has shape \[256\], the config says \[100\]"):
        gptj.load(str(folder))


def test_missing_shard(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "m", "tiny", "sharded-safetensors", shard_bytes=3_000_000)
    next(folder.glob("model-00002-*")).unlink()
    with pytest.raises(ModelLoadError, match="shards that are missing"):
        gptj.load(str(folder))


def test_model_that_does_not_fit_is_refused_before_loading(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "m", "tiny", "safetensors")
    with pytest.raises(ModelTooLarge) as err:
        gptj.load(str(folder), max_memory="1MB")
    message = str(err.value)
    assert "needs about 0.0" in message and "only 0.0 GB is available" in message and "int8" in message


def test_6b_shape_is_refused_with_numbers_when_memory_is_short(tmp_path: Path) -> None:
    folder = tmp_path / "6b"
    folder.mkdir()
    from gptj.loading.random_checkpoint import gptj_config

    (folder / "config.json").write_text(json.dumps(gptj_config("6b")))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the check comes first
    with pytest.raises(ModelTooLarge, match=r"needs about 24\.2 GB .* float32.*8\.0 GB is available.*int8: 6\.\d GB"):
        gptj.load(str(folder), dtype=torch.float32, max_memory="8GB")


def test_bundled_default_model_loads_with_no_name() -> None:
    model = gptj.load()
    assert model.info.architecture == "llama" and model.name == "SmolLM2-135M-Instruct"
    # int8 unless asked otherwise: the fast default of every surface (quantize="none": float32)
    assert model.info.quantization == "int8" and model.info.dtype == "float32"  # float32 beside the int8 layers
    assert model.tokenizer.chat_template and "<|im_start|>" in model.tokenizer.chat_template
    out = model.generate("The capital of France is", max_new_tokens=4, temperature=0)
    assert "Paris" in out.text


def test_quantize_none_keeps_the_gguf_weights_in_float32() -> None:
    model = gptj.load(quantize="none")
    assert model.info.quantization == "none" and model.info.dtype == "float32"
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
