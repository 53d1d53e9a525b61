"""Chat: play scripts that never speak for the user, context trimming, chat templates, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gptj
from gptj.api import Model
from gptj.chat import ChatSession, ChatTemplate, PlayScript, fit_messages
from gptj.cli.chat import ChatREPL
from gptj.loading import ModelInfo
from gptj.models.gptj import GPTJConfig
from gptj.presets import apply_preset, load_presets


class ScriptedLM(nn.Module):
    """A stand-in model that emits a fixed token sequence after any prompt."""

    architecture = "gptj"

    def __init__(self, script: list[int], vocab: int = 50400) -> None:
        super().__init__()
        self.config = GPTJConfig(n_embd=8, n_head=1, n_layer=1, rotary_dim=8, n_positions=512, vocab_size=vocab)
        self.script, self.vocab = script, vocab
        self.base: int | None = None  # the position of a request's first decode step
        self.last_end = 0

    def forward(self, input_ids, positions=None, cache=None, rows=slice(0, 1), last_only=False, logits=True):  # noqa: ANN001, ANN201
        if positions is None:
            positions = torch.arange(input_ids.shape[1])[None]
        end = int(positions[0, -1]) + 1
        # A new request: a prefill (its last prompt token comes next, in a decode step), or a
        # decode step that does not follow the previous one (its prompt was cached).
        if input_ids.shape[1] > 1 or self.base is None or end <= self.last_end:
            self.base = end if input_ids.shape[1] > 1 else end - 1
        self.last_end = end
        step = max(0, end - 1 - self.base)
        if not logits:
            return None
        out = torch.zeros(input_ids.shape[0], 1 if last_only else input_ids.shape[1], self.vocab)
        out[..., self.script[min(step, len(self.script) - 1)]] = 10.0
        return out


def scripted_model(text: str) -> Model:
    tok = gptj.load_tokenizer("gpt-j")
    ids = tok.encode(text) + [tok.eos_token_id]
    info = ModelInfo("scripted", "gptj", "-", 0, "none", "float32", 512, "test", 50400)
    return Model(ScriptedLM(ids), tok, info)


def test_reply_stops_where_the_user_line_begins() -> None:
    model = scripted_model(" Sure, here it is.\nYou: now I speak for the user\nGPT-J: and on")
    session = ChatSession(model, PlayScript(user_name="You", bot_name="GPT-J"))
    reply = session.reply([{"role": "user", "content": "Hello"}], temperature=0, max_new_tokens=40)
    assert reply.text == "Sure, here it is."
    assert reply.finish_reason == "stop"
    assert "".join(session.stream([{"role": "user", "content": "Hello"}], temperature=0, max_new_tokens=40)) == "Sure, here it is."


def test_reply_drops_a_line_by_another_speaker() -> None:
    model = scripted_model(" Fine.\nAlice: hi both\nmore")
    session = ChatSession(model, PlayScript(user_name="You", bot_name="GPT-J"))
    assert session.reply([{"role": "user", "content": "How are you?"}], temperature=0, max_new_tokens=20).text == "Fine."


def test_user_name_is_configurable() -> None:
    script = PlayScript(intro="A chat.", user_name="Ada", bot_name="Babbage")
    prompt = script.prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sum?"}])
    assert prompt == "A chat.\n\nAda: hi\nBabbage: hello\nAda: sum?\nBabbage:"
    assert "\nAda:" in script.stops()


def test_trimming_keeps_system_and_first_exchange_and_reports_drops() -> None:
    msgs = [{"role": "system", "content": "S"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"u{i}" * 10}, {"role": "assistant", "content": f"a{i}" * 10}]
    msgs.append({"role": "user", "content": "last"})

    def size(ms: list[dict]) -> int:
        return sum(len(m["content"]) for m in ms)

    kept, dropped = fit_messages(msgs, size, budget=size(msgs) - 50)
    assert kept[0]["role"] == "system"
    assert kept[1]["content"].startswith("u0") and kept[2]["content"].startswith("a0")  # first exchange kept
    assert kept[-1]["content"] == "last"
    assert dropped == 4 and len(kept) == len(msgs) - 4  # two whole exchanges (user + reply) went
    assert size(kept) <= size(msgs) - 50
    kept_none, dropped_none = fit_messages(msgs, size, budget=10_000)
    assert dropped_none == 0 and kept_none == msgs
    kept2, _ = fit_messages(msgs, size, budget=size(msgs) - 50, keep_first=0)
    assert not kept2[1]["content"].startswith("u0")


def test_long_chat_on_a_small_window_drops_messages() -> None:
    model = gptj.load(context_length=200)
    session = ChatSession(model)
    msgs = []
    for i in range(12):
        msgs += [{"role": "user", "content": f"Tell me fact number {i} about the sea."}, {"role": "assistant", "content": f"Fact {i}: the sea is big and blue and deep."}]
    msgs.append({"role": "user", "content": "Thanks!"})
    prompt, settings, dropped = session.prepare(msgs, {"max_new_tokens": 20})
    assert dropped > 0
    assert len(model.tokenizer.encode(prompt, allow_special=True)) + 20 <= 200
    assert "fact number 0" in prompt and "Thanks!" in prompt


def test_chat_template_matches_transformers_rendering() -> None:
    from transformers import AutoTokenizer

    from gptj.loading.gguf import bundled_gguf_path

    path = bundled_gguf_path()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model_tok = gptj.load_tokenizer("smollm2")
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    ours = ChatTemplate(model_tok.chat_template).render(msgs)
    assert ours == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert ChatTemplate(model_tok.chat_template).render(with_system) == ref.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)


def test_template_sandbox_blocks_python_internals() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_instruct_model_answers_through_its_template() -> None:
    model = gptj.load()
    reply = ChatSession(model).reply([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_new_tokens=24)
    assert "Paris" in reply.text and "<|im_end|>" not in reply.text


def test_repl_commands(tmp_path: Path) -> None:
    import io

    model = scripted_model(" Hi!\nYou: x")
    out = io.StringIO()
    repl = ChatREPL(ChatSession(model, PlayScript()), {"temperature": 0, "max_new_tokens": 10}, out=out)
    assert repl.turn("hello") == "Hi!"
    save = tmp_path / "c.json"
    repl.command(f"/save {save}")
    repl.command("/reset")
    assert repl.messages == []
    repl.command(f"/load {save}")
    assert [m["content"] for m in repl.messages] == ["hello", "Hi!"]
    repl.command("/system Be nice.")
    assert repl.conversation()[0] == {"role": "system", "content": "Be nice."}
    assert repl.command("/quit") is False


# ---- presets ---------------------------------------------------------------------------------------


def test_builtin_presets() -> None:
    presets, errors = load_presets(Path("/nonexistent"))
    assert errors == []
    assert {"code", "chat", "story", "translation", "knowledge"} <= set(presets)
    prompt, settings = apply_preset("translation", "Vine", {})
    assert prompt.endswith("English: Vine\nFrench:") and settings["stop"] == ["\n"]
    prompt, settings = apply_preset("code", "# add two numbers\n", {"temperature": 0.5})
    assert settings["temperature"] == 0.5 and "\ndef " in settings["stop"]


def test_user_presets_and_a_broken_one(tmp_path: Path) -> None:
    (tmp_path / "haiku.json").write_text(json.dumps({"description": "Haiku", "template": "A haiku about {input}:\n", "settings": {"temperature": 0.9}, "stop": ["\n\n"]}))
    (tmp_path / "broken.json").write_text(json.dumps({"description": "x", "template": "{input}", "settings": {"temprature": 1}}))
    (tmp_path / "notjson.json").write_text("{nope")
    presets, errors = load_presets(tmp_path)
    assert "haiku" in presets and presets["haiku"].source.endswith("haiku.json")
    assert "broken" not in presets and "code" in presets
    assert any("broken.json" in e and "'settings'" in e and "temprature" in e for e in errors)
    assert any("notjson.json" in e for e in errors)


def test_python_api_and_cli_use_user_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    folder = tmp_path / "gptj" / "presets"
    folder.mkdir(parents=True)
    (folder / "capital.json").write_text(json.dumps({
        "description": "Capitals", "template": "The capital of {input} is", "settings": {"temperature": 0, "max_new_tokens": 4}, "stop": ["."],
    }))
    monkeypatch.setenv("GPTJ_CONFIG_DIR", str(tmp_path / "gptj"))
    out = gptj.load().generate("France", preset="capital")
    assert out.text.strip() == "Paris" and out.finish_reason == "stop"
    env = {**__import__("os").environ, "GPTJ_CONFIG_DIR": str(tmp_path / "gptj")}
    listing = subprocess.run([sys.executable, "-m", "gptj.cli", "presets", "--json"], capture_output=True, text=True, env=env, timeout=120)
    names = {p["name"]: p["source"] for p in json.loads(listing.stdout)["presets"]}
    assert names["capital"].endswith("capital.json") and names["translation"] == "built-in"
