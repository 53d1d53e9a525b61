"""The `gptj` commands that need no model start fast: they never import torch (issue #17), and
the defaults of the model surfaces agree (int8 on the bundled model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Runs the CLI in a fresh interpreter and says on the last lines of stderr whether jinja2, then
# torch, were imported.
PROBE = """
import sys
from gptj.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("jinja2 imported" if "jinja2" in sys.modules else "no jinja2", file=sys.stderr)
print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
sys.exit(code or 0)
"""


def probe(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, input=stdin,
                          timeout=300, env=env)


@pytest.mark.parametrize("args", [
    ["--help"],
    ["generate", "--help"],
    ["chat", "--help"],
    ["serve", "--help"],
    ["quantize", "--help"],
    ["presets"],
    ["models", "--json"],
    ["tokenize", "Hello world", "--json"],
    ["tokenize", "Hello world", "--tokenizer", "smollm2"],
])
def test_commands_without_a_model_do_not_import_torch(args: list[str]) -> None:
    out = probe(*args)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "no torch", out.stderr


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["presets"], ["tokenize", "Hello world"]])
def test_commands_that_do_not_chat_do_not_import_jinja2(args: list[str]) -> None:
    """Chat templates (jinja2) load with the commands that chat, not with `gptj --help`."""
    out = probe(*args)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-2] == "no jinja2", out.stderr


def test_import_gptj_is_lazy_and_gptj_load_still_works() -> None:
    code = ("import sys, gptj\n"
            "assert 'torch' not in sys.modules\n"
            "assert callable(gptj.load) and gptj.Model.__name__ == 'Model'\n"
            "assert {'load', 'Model', 'SamplingParams', 'load_tokenizer'} <= set(dir(gptj))\n"
            "from gptj import InvalidRequest, sampling_params\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- one default quantization: int8 on the bundled model, on every surface ----------------------


@pytest.fixture()
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str | None]]:
    """(model, quantize) of each load that gptj.load starts; the load itself stops with an error
    at once, so no surface gets as far as loading weights."""
    import gptj.api
    from gptj.errors import ModelLoadError

    calls: list[tuple[str | None, str | None]] = []

    def record(name_or_path: str | None, quantize: str | None, *args: object, **kwargs: object) -> None:
        calls.append((name_or_path, quantize))
        raise ModelLoadError("stopped by the test")

    monkeypatch.setattr(gptj.api, "load_model", record)
    return calls


@pytest.mark.parametrize("argv", [
    ["generate", "hi"],
    ["chat"],
    ["serve", "--port", "0"],
])
def test_every_cli_surface_defaults_to_int8_on_the_bundled_model(argv: list[str], asked: list) -> None:
    from gptj.cli import main

    assert main(argv) == 2  # the test's load error, as one line
    assert main([*argv, "--quantize", "none"]) == 2
    assert asked == [(None, "int8"), (None, "none")]


def test_gptj_load_defaults_to_int8_on_the_bundled_model_only(asked: list, tmp_path: Path) -> None:
    import gptj
    from gptj.errors import ModelLoadError

    for name in (None, "smollm2", str(tmp_path)):
        with pytest.raises(ModelLoadError):
            gptj.load(name)
    with pytest.raises(ModelLoadError):
        gptj.load(quantize="none")
    assert asked == [(None, "int8"), ("smollm2", "int8"), (str(tmp_path), None), (None, "none")]


def test_help_says_the_default_quantization() -> None:
    for command in ("generate", "chat", "serve"):
        out = probe(command, "--help")
        text = " ".join(out.stdout.split())
        assert "default: int8 for the bundled model" in text and "none: float32" in text, command


def test_the_banner_names_the_weights(tmp_path: Path) -> None:
    """generate and chat say on stderr which weights are in use; stdout keeps only the text."""
    from types import SimpleNamespace

    from gptj.cli.common import weights_banner

    out = probe("generate", "The capital of France is", "-t", "0", "-n", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert "gptj: SmolLM2-135M-Instruct, weights: int8 (quantized at load)" in out.stderr
    assert out.stdout.startswith("{")
    out = probe("chat", "-n", "2", "-t", "0", "--quantize", "none")
    assert "gptj: SmolLM2-135M-Instruct, weights: float32 (not quantized)" in out.stderr, out.stderr
    stored = tmp_path / "int4"
    stored.mkdir()
    (stored / "config.json").write_text('{"quantization_config": {"mode": "int4"}}')
    info = SimpleNamespace(quantization="int4", dtype="float32", path=str(stored))
    assert weights_banner(info, None) == weights_banner(info, "int4") == "int4 (as stored)"


# ---- the models directory: where quantize and make-random-checkpoint write, what models lists ---


def test_models_lists_what_quantize_and_make_random_checkpoint_wrote(tmp_path: Path) -> None:
    import json
    import os

    models = tmp_path / "models"
    env = {**os.environ, "GPTJ_MODELS": str(models)}

    def gptj(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "gptj.cli", *args], capture_output=True, text=True, env=env,
                             timeout=300, input="")
        assert out.returncode == 0, out.stderr
        return out

    out = gptj("make-random-checkpoint", "--shape", "tiny", "--format", "safetensors")
    assert str(models / "random-gptj-tiny") in out.stdout
    out = gptj("quantize", str(models / "random-gptj-tiny"))  # no DST: beside it, named by the source
    assert out.stdout.strip() == f"wrote {models / 'random-gptj-tiny-int8'}"
    gptj("quantize", "random-gptj-tiny", "--format", "gguf", "--bits", "4")  # a model of the directory, by name
    assert (models / "random-gptj-tiny.Q4_1.gguf").is_file()

    rows = {r["name"]: r for r in json.loads(gptj("models", "--json").stdout) if r["source"] == "local"}
    assert {n: r["quantization"] for n, r in rows.items()} == {
        "random-gptj-tiny": "float16", "random-gptj-tiny-int8": "int8", "random-gptj-tiny.Q4_1": "Q4_1"}
    on_disk = sum(f.stat().st_size for f in (models / "random-gptj-tiny-int8").iterdir())
    assert rows["random-gptj-tiny-int8"]["size_bytes"] == on_disk
    table = gptj("models").stdout
    assert "QUANT" in table.splitlines()[0] and f"the models directory: {models}" in table
    line = next(x for x in table.splitlines() if x.startswith("random-gptj-tiny-int8 "))
    assert " int8 " in line and "GB" in line

    out = gptj("generate", "Hello", "--model", "random-gptj-tiny-int8", "-n", "2", "--json")  # found by name
    assert "weights: int8 (as stored)" in out.stderr

