"""The `gptj` command end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GPTJ = [sys.executable, "-m", "gptj.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GPTJ, *args], capture_output=True, text=True, input=stdin, timeout=300)


def test_generate_names_paris() -> None:
    out = run("generate", "The capital of France is", "--temperature", "0", "-n", "8")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_json_and_stop() -> None:
    out = run("generate", "The capital of France is", "--temperature", "0", "-n", "12", "--stop", ".", "--json")
    result = json.loads(out.stdout)
    assert result["finish_reason"] == "stop" and result["text"].strip() == "Paris"


def test_generate_json_schema_from_a_file(tmp_path: Path) -> None:
    """--json-schema FILE: sampled text that parses and fits the schema; --json-schema object: a
    JSON object; a schema that is not JSON or a missing file: one error line naming the setting."""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}
    (tmp_path / "person.json").write_text(json.dumps(schema))
    for seed in ("1", "2", "3"):
        out = run("generate", "A person as JSON:", "--json-schema", str(tmp_path / "person.json"), "-n", "60",
                  "--seed", seed, "--json")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        person = json.loads(result["text"])
        assert result["finish_reason"] == "stop" and set(person) == {"name", "age"} and isinstance(person["age"], int)
    out = run("generate", "A tiny JSON object:", "--json-schema", "object", "-n", "60", "--seed", "1", "--json",
              "--top-k", "5")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["finish_reason"] != "stop" or isinstance(json.loads(result["text"]), dict)
    assert result["text"].lstrip().startswith("{")
    for bad, words in (('{"type": ', "not JSON"), (str(tmp_path / "missing.json"), "cannot read")):
        out = run("generate", "x", "--json-schema", bad)
        assert out.returncode == 2 and "json_schema" in out.stderr and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_bad_setting_is_a_clear_error() -> None:
    out = run("generate", "hi", "--top-p", "1.5")
    assert out.returncode == 2
    assert "top_p" in out.stderr and "<= 1" in out.stderr


def test_unknown_model_is_a_clear_error() -> None:
    out = run("generate", "hi", "--model", "/nonexistent/model")
    assert out.returncode == 2 and "not found" in out.stderr


def test_tokenize_shows_ids_and_pieces() -> None:
    out = run("tokenize", "Hello world")
    assert out.returncode == 0
    assert "2 tokens" in out.stdout and "15496" in out.stdout and '" world"' in out.stdout
    pieces = json.loads(run("tokenize", "👋", "--json").stdout)
    assert ["bytes" in p and p["part_of"] == "👋" for p in pieces] == [True, True]  # no text of their own


def test_models_lists_the_bundled_model() -> None:
    out = run("models", "--json")
    rows = json.loads(out.stdout)
    assert any(r["source"] == "bundled" and r["architecture"] == "llama" for r in rows)


def test_random_checkpoint_generate_and_preset(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    out = run("make-random-checkpoint", str(folder), "--shape", "tiny", "--format", "safetensors")
    assert out.returncode == 0, out.stderr
    assert (folder / "model.safetensors").exists() and json.loads((folder / "config.json").read_text())["model_type"] == "gptj"
    out = run("models", "--dir", str(tmp_path), "--json")
    assert any(r["name"] == "tiny" and r["architecture"] == "gptj" for r in json.loads(out.stdout))
    out = run("generate", "Hello", "--model", str(folder), "-n", "5", "--seed", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["tokens"]) <= 5


def test_translation_preset_stops_at_the_line_end() -> None:
    out = run("generate", "Thank you", "--preset", "translation", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "\n" not in result["text"] and result["text"].strip()


def test_chat_reads_standard_input() -> None:
    out = run("chat", "--temperature", "0", "-n", "24", stdin="What is the capital of France?\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_code_preset_heals_the_prompts_last_newline() -> None:
    """The code preset's example ends in "\\n", which SmolLM2 writes together with the next line's
    indent: token healing lets the first token be "\\n   ", and the body comes out indented.
    --no-token-healing continues the lone "\\n" token, at column 0."""
    code = "# Python 3\n# Return True if n is a prime number, else False.\ndef is_prime(n):\n"
    out = run("generate", "-", "--preset", "code", "--seed", "1", "--json", stdin=code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"].startswith("    if n <= 1:\n        return False")
    out = run("generate", "-", "--preset", "code", "--seed", "1", "--json", "--no-token-healing", stdin=code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"].startswith("if n <= 1:")


def test_requantizing_says_the_cli_flag(tmp_path: Path) -> None:
    """The error names --quantize, not Python's quantize='int8'."""
    from gptj.loading.quantized import write_quantized
    from gptj.loading.random_checkpoint import make_random_checkpoint

    make_random_checkpoint(tmp_path / "hf", "tiny", "safetensors")
    write_quantized(str(tmp_path / "hf"), str(tmp_path / "int8"), 8)
    out = run("generate", "hi", "-n", "1", "--model", str(tmp_path / "int8"), "--quantize", "int4")
    assert out.returncode != 0
    assert "--quantize int4" in out.stderr and "quantize='" not in out.stderr and "Traceback" not in out.stderr


def test_chat_help_lists_the_slash_commands() -> None:
    out = run("chat", "--help")
    assert out.returncode == 0
    for command in ("/reset", "/save FILE", "/load FILE", "/system TEXT", "/quit"):
        assert command in out.stdout


def test_serve_on_a_busy_port_says_so_before_loading() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("serve", "--port", str(port))
    assert out.returncode != 0
    assert f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr and "--port" in out.stderr
    assert "serving" not in out.stdout and "Traceback" not in out.stderr


def test_tokenize_frictions(tmp_path: Path) -> None:
    """A GPT-J folder (vocab.json and merges.txt, no tokenizer.json) tokenizes; an unknown name is
    one error line; --json pieces are text, not JSON inside JSON; byte pieces say their character."""
    from gptj.loading.random_checkpoint import make_random_checkpoint

    make_random_checkpoint(tmp_path / "gptj", "tiny", "safetensors")
    assert not (tmp_path / "gptj" / "tokenizer.json").exists()
    out = run("tokenize", "Hello 😀", "--tokenizer", str(tmp_path / "gptj"))
    assert out.returncode == 0, out.stderr
    assert '15496  "Hello"' in out.stdout and '(part of " 😀")' in out.stdout
    bad = run("tokenize", "hi", "--tokenizer", "nosuch")
    assert bad.returncode == 2 and bad.stderr.startswith("gptj: error: --tokenizer") and "Traceback" not in bad.stderr
    pieces = json.loads(run("tokenize", "Hall 😀", "--json").stdout)
    assert pieces[0] == {"id": 34194, "piece": "Hall"}
    assert pieces[1]["bytes"] == "20 f0 9f 98" and pieces[1]["part_of"] == " 😀"
