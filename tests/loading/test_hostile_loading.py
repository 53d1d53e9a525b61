"""Hostile or broken model input fails with a ModelLoadError that names the file and field, before
any large or long work; nothing half-written (quantize, pull) ever loads as a whole model."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import torch
from test_hub import REPO, StandInHub, folder_files  # the stand-in Hugging Face Hub

import gptj
from gptj import cli, memory
from gptj.errors import KVCacheTooLarge, ModelLoadError
from gptj.loading import config as model_config
from gptj.loading.catalog import list_models
from gptj.loading.hub import HubError, pull
from gptj.loading.quantized import write_quantized
from gptj.loading.random_checkpoint import make_random_checkpoint
from gptj.runtime.kv_cache import check_kv_cache_fits
from gptj.tokenizer import bundled_gguf_path

GPTJ_CONFIG = {"model_type": "gptj", "vocab_size": 512, "n_positions": 256, "n_embd": 64, "n_head": 4,
               "n_layer": 2, "rotary_dim": 8}
LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
                "max_position_embeddings": 256}
IDS = [464, 313, 286, 481, 318]  # below the tiny models' vocab_size


def config_folder(tmp_path: Path, config: object) -> Path:
    """A model folder whose weights are never read: the config must fail first."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


# ---- 1. config.json values ----------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ([1], "config.json: must be a JSON object, got list"),
    ({**GPTJ_CONFIG, "n_head": 0}, "config.json: n_head must be a positive integer, got 0"),
    ({**GPTJ_CONFIG, "n_embd": "big"}, "config.json: n_embd must be a positive integer, got 'big'"),
    ({**GPTJ_CONFIG, "n_embd": 1e9}, "config.json: n_embd must be a positive integer, got 1000000000.0"),
    ({**GPTJ_CONFIG, "n_embd": 1_000_000_000}, "config.json: n_embd must be at most 65536 (MAX_HIDDEN), got 1000000000"),
    ({**GPTJ_CONFIG, "n_layer": 1e6}, "config.json: n_layer must be a positive integer, got 1000000.0"),
    ({**GPTJ_CONFIG, "n_layer": 1_000_000}, "config.json: n_layer must be at most 512 (MAX_LAYERS), got 1000000"),
    ({**GPTJ_CONFIG, "n_layer": True}, "config.json: n_layer must be a positive integer, got True"),
    ({**GPTJ_CONFIG, "vocab_size": -3}, "config.json: vocab_size must be a positive integer, got -3"),
    ({**GPTJ_CONFIG, "vocab_size": 2**30}, "config.json: vocab_size must be at most 2097152 (MAX_VOCAB)"),
    ({**GPTJ_CONFIG, "n_positions": 10_000_000}, "config.json: n_positions must be at most 1048576 (MAX_POSITIONS)"),
    ({**GPTJ_CONFIG, "n_inner": 0}, "config.json: n_inner must be a positive integer, got 0"),
    ({**GPTJ_CONFIG, "n_head": 5}, "config.json: n_embd (64) must be a multiple of n_head (5)"),
    ({**GPTJ_CONFIG, "rotary_dim": 32}, "config.json: rotary_dim must be even and at most the head size (16), got 32"),
    ({**GPTJ_CONFIG, "rotary_dim": 7}, "config.json: rotary_dim must be even and at most the head size (16), got 7"),
    ({**GPTJ_CONFIG, "layer_norm_epsilon": "tiny"}, "config.json: layer_norm_epsilon must be a positive number"),
    ({**GPTJ_CONFIG, "eos_token_id": "</s>"}, "config.json: eos_token_id must be a token id"),
    ({**GPTJ_CONFIG, "quantization_config": [1]}, "config.json: quantization_config must be a JSON object"),
    ({**GPTJ_CONFIG, "quantization_config": {"mode": "int3"}}, "config.json: quantization_config.mode must be"),
    ({**GPTJ_CONFIG, "model_type": ["gptj"]}, "unknown architecture"),
    ({**LLAMA_CONFIG, "num_attention_heads": 6}, "hidden_size (64) must be a multiple of num_attention_heads (6)"),
    ({**LLAMA_CONFIG, "num_key_value_heads": 3},
     "num_attention_heads (8) must be a multiple of num_key_value_heads (3)"),
    ({**LLAMA_CONFIG, "num_key_value_heads": 0}, "config.json: num_key_value_heads must be a positive integer, got 0"),
    ({**LLAMA_CONFIG, "head_dim": 7}, "config.json: head_dim must be even"),
    ({**LLAMA_CONFIG, "intermediate_size": 10**7}, "config.json: intermediate_size must be at most 262144 (MAX_FFN)"),
    ({**LLAMA_CONFIG, "rope_theta": -1}, "config.json: rope_theta must be a positive number, got -1"),
    ({**LLAMA_CONFIG, "rms_norm_eps": float("nan")}, "config.json: rms_norm_eps must be a positive number, got nan"),
    ({**LLAMA_CONFIG, "rope_parameters": "fast"}, "config.json: rope_parameters must be a JSON object"),
])
def test_bad_config_values_name_the_field(tmp_path: Path, config: object, message: str) -> None:
    folder = config_folder(tmp_path, config)
    with pytest.raises(ModelLoadError) as err:
        gptj.load(str(folder), max_memory="100GB")
    assert message in str(err.value) and str(folder / "config.json") in str(err.value)


def test_deeply_nested_or_huge_config_json(tmp_path: Path) -> None:
    folder = config_folder(tmp_path, {})
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        gptj.load(str(folder))
    with (folder / "config.json").open("wb") as f:
        f.truncate(model_config.MAX_CONFIG_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(ModelLoadError, match=r"config.json is too large \(.* bytes; at most"):
        gptj.load(str(folder))


def test_a_valid_tiny_config_still_loads(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "ok", dict(n_embd=48, n_head=3, n_layer=1, rotary_dim=16),
                                    "safetensors", vocab_size=256, n_positions=64)
    model = gptj.load(str(folder), dtype=torch.float32)
    assert model.info.context_length == 64 and model.config.rotary_dim == 16


def write_gguf_metadata(path: Path, **fields: int) -> Path:
    """A llama GGUF with the given `llama.*` sizes and no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(fields.get("block_count", 2))
    writer.add_context_length(fields.get("context_length", 256))
    writer.add_embedding_length(fields.get("embedding_length", 64))
    writer.add_feed_forward_length(fields.get("feed_forward_length", 128))
    writer.add_head_count(fields.get("head_count", 8))
    writer.add_head_count_kv(fields.get("head_count_kv", 4))
    writer.add_vocab_size(fields.get("vocab_size", 512))
    writer.add_rope_dimension_count(fields.get("rope_dimension_count", 8))  # 64 / 8 heads
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("fields, message", [
    ({"head_count": 0}, "llama.attention.head_count must be a positive integer, got 0"),
    ({"block_count": 1_000_000}, "llama.block_count must be at most 512"),
    ({"head_count_kv": 3}, "llama.attention.head_count (8) must be a multiple of llama.attention.head_count_kv (3)"),
])
def test_bad_gguf_metadata_names_the_key(tmp_path: Path, fields: dict, message: str) -> None:
    path = write_gguf_metadata(tmp_path / "bad.gguf", **fields)
    with pytest.raises(ModelLoadError) as err:
        gptj.load(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_unusable_gguf_tokenizer_json_is_a_load_error(tmp_path: Path) -> None:
    folder = make_random_checkpoint(tmp_path / "q", dict(n_embd=32, n_head=2, n_layer=1, rotary_dim=8),
                                    "safetensors", vocab_size=256, n_positions=64)
    (folder / "gguf_tokenizer.json").write_text('{"tokenizer.ggml.tokens": 7')
    with pytest.raises(ModelLoadError, match="gguf_tokenizer.json is unusable"):
        gptj.load(str(folder))


# ---- 2. random and truncated GGUF files ---------------------------------------------------------

@pytest.fixture()
def broken_ggufs(tmp_path: Path) -> dict[str, Path]:
    rng = random.Random(0)
    source = bundled_gguf_path()
    half = source.stat().st_size // 2
    files = {
        "random": b"GGUF" + rng.randbytes(8192),
        "random-v3": b"GGUF" + (3).to_bytes(4, "little") + rng.randbytes(8192),  # passes the version check
        "header-only": source.open("rb").read(4096),
        "half": source.open("rb").read(half),
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.gguf"
        out[name].write_bytes(data)
    return out


@pytest.mark.parametrize("name", ["random", "random-v3", "header-only", "half"])
def test_random_or_truncated_gguf_is_a_load_error(broken_ggufs: dict[str, Path], name: str) -> None:
    path = broken_ggufs[name]
    with pytest.raises(ModelLoadError) as err:
        gptj.load(str(path))
    assert str(path) in str(err.value)


def test_cli_prints_one_line_for_a_truncated_gguf(broken_ggufs: dict[str, Path]) -> None:
    done = subprocess.run([sys.executable, "-m", "gptj.cli", "generate", "--model", str(broken_ggufs["half"]), "hi"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptj: error: ") and "half.gguf" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# ---- 3. the KV cache is checked against the memory there is -------------------------------------

def test_kv_cache_check_says_the_size_and_what_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 1_000_000_000)
    # 2 layers x 4 kv heads x 16 dims x (k, v) x 4 bytes = 1 KiB a token; 4 rows of 2**20 tokens: 4 GiB
    with pytest.raises(KVCacheTooLarge) as err:
        check_kv_cache_fits(2, 4, 4, 2**20, 16, torch.float32, "cpu")
    message = str(err.value)
    assert "needs 4.29 GB on cpu" in message and "only 1.00 GB is available" in message
    assert "--context-length 244140 (with --parallel 4)" in message
    assert isinstance(err.value, ModelLoadError)
    check_kv_cache_fits(2, 4, 4, 2**16, 16, torch.float32, "cpu")  # 268 MB: fits
    with pytest.raises(ModelLoadError, match="context length must be at least 1 token, got -5"):
        check_kv_cache_fits(2, 4, 4, -5, 16, torch.float32, "cpu")


@pytest.fixture()
def huge_context_model(tmp_path: Path) -> Path:
    """A tiny GPT-J whose config allows 2**20 positions: its 4-row KV cache would take 1 GiB."""
    return make_random_checkpoint(tmp_path / "long", dict(n_embd=32, n_head=2, n_layer=1, rotary_dim=8),
                                  "safetensors", vocab_size=512, n_positions=2**20)


def test_allocate_cache_refuses_a_cache_that_does_not_fit(huge_context_model: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = gptj.load(str(huge_context_model), max_batch=4, device="cpu", dtype=torch.float32)
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000_000)
    with pytest.raises(KVCacheTooLarge, match=r"needs 1\.07 GB on cpu .* only 0\.10 GB is available"):
        model.engine.allocate_cache()
    assert model.engine.cache is None
    model.engine.context_length = 1024
    assert model.engine.allocate_cache().max_len == 1024  # the suggested kind of limit works


def test_serve_reports_a_cache_that_does_not_fit_in_one_line(huge_context_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import gptj.cli.serve

    def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started although its KV cache does not fit")

    monkeypatch.setattr(gptj.cli.serve, "create_app", no_server)
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000_000)
    status = cli.main(["serve", "--model", str(huge_context_model), "--device", "cpu", "--parallel", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("gptj: error: the KV cache"), err
    assert "--context-length" in err[0] and "--parallel" in err[0]


def test_generate_reports_a_cache_that_does_not_fit_in_one_line(huge_context_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000_000)
    status = cli.main(["generate", "--model", str(huge_context_model), "--device", "cpu", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("gptj: error: the KV cache"), err


def test_models_lists_past_broken_and_half_written_folders(source: Path, tmp_path: Path) -> None:
    import shutil

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[1]")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000)
    shutil.copytree(source, tmp_path / ".good.old-1234")
    shutil.copytree(source, tmp_path / "good")
    names = [row["name"] for row in list_models([str(tmp_path)]) if row["source"] == "local"]
    assert "good" in names and not {"broken", "deep", ".good.old-1234"} & set(names)


# ---- 4. quantize and pull never leave a half-written folder that loads ---------------------------

class Killed(Exception):
    """Stands in for the process being killed."""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("src") / "src", dict(n_embd=64, n_head=4, n_layer=1, rotary_dim=8),
                                  "safetensors", vocab_size=512, n_positions=128)


def files_of(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def kill_after_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_then_die(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)


def test_quantize_killed_midway_keeps_the_old_folder(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "dst"
    write_quantized(str(source), str(dst), 8)
    before = files_of(dst)
    expected = gptj.load(str(dst)).logits(IDS)
    kill_after_the_weights(monkeypatch)
    with pytest.raises(Killed):
        write_quantized(str(source), str(dst), 4)
    assert files_of(dst) == before
    model = gptj.load(str(dst))
    assert model.info.quantization == "int8" and torch.equal(model.logits(IDS), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # nothing partial left beside it

    fresh = tmp_path / "fresh"
    with pytest.raises(Killed):
        write_quantized(str(source), str(fresh), 4)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    with pytest.raises(ModelLoadError, match="not found"):
        gptj.load(str(fresh))


def test_quantize_hard_killed_leaves_nothing_that_loads(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    write_quantized(str(source), str(dst), 8)
    before = files_of(dst)
    script = (
        "import os, sys, safetensors.torch\n"
        "real = safetensors.torch.save_file\n"
        "def save_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os._exit(9)\n"
        "safetensors.torch.save_file = save_then_die\n"
        "from gptj.loading.quantized import write_quantized\n"
        "write_quantized(sys.argv[1], sys.argv[2], 4)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(source), str(dst)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 9, done.stderr
    assert files_of(dst) == before and gptj.load(str(dst)).info.quantization == "int8"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "dst"]
    assert leftovers and all(p.name.startswith(".dst.partial-") for p in leftovers)
    for p in leftovers:
        with pytest.raises(ModelLoadError, match="no config.json"):
            gptj.load(str(p))
    assert [r["name"] for r in list_models(extra_dirs=[str(tmp_path)]) if r["source"] == "local"] == ["dst"]


def test_quantize_refuses_to_replace_a_folder_it_did_not_write(source: Path, tmp_path: Path) -> None:
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match=r"mine .*notes\.txt"):
        write_quantized(str(source), str(dst), 8)
    assert files_of(dst) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.fixture()
def hub(source: Path) -> Iterator[StandInHub]:
    h = StandInHub()
    h.add(REPO, "main", folder_files(source))
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def test_a_pull_that_fails_midway_does_not_load(hub: StandInHub, source: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    real = huggingface_hub.snapshot_download

    def fails_before_the_last_file(*args: object, allow_patterns: list[str], **kwargs: object) -> str:
        real(*args, allow_patterns=[n for n in allow_patterns if n != "tokenizer_config.json"], **kwargs)
        raise ConnectionError("the connection dropped")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fails_before_the_last_file)
    with pytest.raises(HubError, match="run gptj pull again"):
        pull(REPO, progress=False, endpoint=hub.url, token=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    snapshot = next((tmp_path / "hub").glob("models--*/snapshots/*"))
    assert (snapshot / "config.json").exists() and (snapshot / "model.safetensors").exists()
    with pytest.raises(ModelLoadError, match=f"incomplete download.*gptj pull {REPO}"):
        gptj.load(REPO)
    with pytest.raises(ModelLoadError, match="incomplete download"):
        gptj.load(str(snapshot))

    assert pull(REPO, progress=False, endpoint=hub.url, token=False) == snapshot
    assert gptj.load(REPO).info.path == str(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(files_of(source))  # no marker left


def test_quantized_files_follow_the_umask(source: Path, tmp_path: Path) -> None:
    """`gptj quantize` writes files others may read where the umask allows it (not 0600)."""
    old = os.umask(0o022)
    try:
        dst = tmp_path / "shared"
        write_quantized(str(source), str(dst), 8)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((dst / name).stat().st_mode) == 0o644, name
