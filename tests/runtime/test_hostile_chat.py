"""Hostile input to chat templates, conversation trimming, presets and `gptj chat`: a clear
error naming the field or file, never a traceback, never unbounded work or memory."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptj.chat import ChatSession, ChatTemplate, PlayScript, fit_messages
from gptj.cli.chat import ChatREPL, run_chat
from gptj.errors import ModelLoadError
from gptj.presets import load_presets
from gptj.runtime.sampling import InvalidRequest

USER = [{"role": "user", "content": "hi"}]


# ---- fakes -----------------------------------------------------------------------------------------


class FakeTokenizer:
    """One token per character; the chat template is whatever the test sets."""

    eos_token_id = 0

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "</s>"


class FakeModel:
    """Just enough of gptj.Model for ChatSession: streams a fixed reply."""

    def __init__(self, chat_template: str | None = None, reply: tuple[str, ...] = ("Hi", " there"),
                 context_length: int = 4096) -> None:
        self.name = "fake-model"
        self.tokenizer = FakeTokenizer(chat_template)
        self.info = SimpleNamespace(architecture="llama" if chat_template else "gptj", quantization="none",
                                    dtype="float32", path="")  # what `gptj chat`'s banner reads
        self.context_length = context_length
        self.reply = reply
        self.closed = 0

    def stream(self, prompt: str, **settings: object) -> Iterator[str]:
        try:
            yield from self.reply
        finally:
            self.closed += 1  # closing the stream cancels the generation


# ---- 1. chat templates -----------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["1 + 'a'", "1 // 0", "range(10 ** 9)|list", "messages.nope()", "none.x.y"])
def test_a_runtime_error_in_the_template_names_its_line(expr: str) -> None:
    template = ChatTemplate("{% for m in messages %}{{ m.content }}\n{% endfor %}\n{{ " + expr + " }}")
    with pytest.raises(InvalidRequest, match="line 3") as err:
        template.render(USER)
    assert err.value.field == "messages" and "chat template" in str(err.value)


def test_raise_exception_still_rejects_with_its_message() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequest, match="roles must alternate") as err:
        template.render(USER)
    assert err.value.field == "messages"


def test_a_syntax_error_is_a_load_error_naming_model_and_line() -> None:
    with pytest.raises(ModelLoadError, match=r"fake-model.*line 2") as err:
        ChatSession(FakeModel("{{ messages }}\n{% for m in %}{% endfor %}"))
    assert isinstance(err.value, ValueError)
    with pytest.raises(ModelLoadError, match="fake-model"):
        ChatSession(FakeModel("{{" * 20_000))  # too deep for the parser


def test_gptj_chat_reports_a_broken_template_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from gptj import cli
    from gptj.cli import common

    monkeypatch.setattr(common, "model_from_args", lambda args, max_batch=1: FakeModel("{% if %}"))
    assert cli.main(["chat"]) == 2
    err = capsys.readouterr().err
    assert "gptj: error:" in err and "fake-model" in err and "line 1" in err and "Traceback" not in err


HOSTILE = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops, no calls": "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% for k in r %}"
                              "{% endfor %}{% endfor %}{% endfor %}",
    "nested loops printing": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "string times": "{{ 'x' * 100000000 }}",
    "list times": "{{ ([1, 2, 3] * 3000000)|length }}",
    "power": "{{ 10 ** 100000000 }}",
    "center method": "{{ 'x'.center(100000000) }}",
    "center filter": "{{ 'x'|center(100000000) }}",
    "percent width": "{{ '%0100000000d' % 1 }}",
    "format width": "{{ '{:>100000000}'.format(1) }}",
    "replace": "{{ ('x' * 5000)|replace('', 'y' * 5000) }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                "{{ ns.s|length }}",
    "join of a generator": "{{ range(20)|map('replace', 'nothing', '')|map('center', 1000000)|join|length }}",
    "macro buffer": "{% set s = 'x' * 1000000 %}{% macro m() %}{% for i in range(20) %}{{ s }}{% endfor %}{% endmacro %}"
                    "{{ m()|length }}",
    "list printed": "{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s] }}",
    "recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_stop_with_a_named_limit(name: str) -> None:
    template = ChatTemplate(HOSTILE[name], time_limit=0.5)
    with pytest.raises(InvalidRequest, match="chat template") as err:
        template.render(USER)
    assert err.value.field == "messages"
    if name != "recursion":
        assert "limit" in str(err.value)


def test_limits_leave_ordinary_templates_alone() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = ("{% for m in messages %}{{ '%s: %s' % (m.role, m.content|trim) }}{{ '{}'.format(loop.index) }}"
              "{{ (m.content * 2)|center(10)|indent(2) }}{{ [m.role, m.content]|join(' ') }}{{ m.content ~ loop.length }}"
              "{% endfor %}{{ messages|map(attribute='content')|join(',') }}{{ 2 ** 10 }}{{ '-' * 3 }}"
              "{{ range(3)|list }}{{ messages }}{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(1) }}{% set b %}B{% endset %}{{ b }}")
    messages = [{"role": "user", "content": " ab "}, {"role": "assistant", "content": "cd\n"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    expected = plain.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    assert ChatTemplate(source).render(messages) == expected


def test_limits_leave_large_but_ordinary_work_alone() -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = ("{% for m in messages %}{{ '\\n\\n'.join([m.content, 'x']) }}{{ m.content|trim|replace('a', 'b') }}"
              "{{ '%s: %s' % (m.role, m.content[:10]) }}{{ [m.content, m.role]|join('\\n') }}{% endfor %}")
    messages = [{"role": "user", "content": "a" * 900_000}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    expected = plain.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    assert ChatTemplate(source).render(messages) == expected
    with pytest.raises(InvalidRequest, match="4000000") as err:  # the conversation itself is over the limit
        ChatTemplate("{{ messages|length }}").render([{"role": "user", "content": "a" * 4_000_001}])
    assert err.value.field == "messages"
    with pytest.raises(ModelLoadError, match="over the limit"):
        ChatTemplate("x" * 1_000_001)


# ---- 2. trimming a long conversation ---------------------------------------------------------------


def _old_fit(messages: list[dict], count_tokens: Callable[[list[dict]], int], budget: int,
             keep_first: int = 1) -> tuple[list[dict], int]:
    """The quadratic trimming this replaces, kept as the reference for what is kept."""
    msgs = [dict(m) for m in messages]
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    head_len, users = 0, 0
    for m in rest:
        if m["role"] == "user":
            if users == keep_first:
                break
            users += 1
        head_len += 1
    head, middle = rest[:head_len], rest[head_len:]
    if not middle:
        head, middle = [], rest
    dropped = 0
    while count_tokens(system + head + middle) > budget:
        if len(middle) > 1:
            n = 1
            while n < len(middle) - 1 and middle[n]["role"] != "user":
                n += 1
            middle, dropped = middle[n:], dropped + n
        elif head:
            head, dropped = [], dropped + len(head)
        else:
            raise InvalidRequest("messages", "too long")
    return system + head + middle, dropped


def _random_chat(rng: random.Random, n: int) -> list[dict]:
    msgs = [{"role": "system", "content": "be kind"}] if rng.random() < 0.5 else []
    role = rng.choice(["user", "user", "assistant"])
    for _ in range(n):
        msgs.append({"role": role, "content": "w" * rng.randint(1, 30)})
        role = rng.choice(["user", "assistant", "assistant"]) if role == "user" else rng.choice(["user", "user", "assistant"])
    return msgs


def test_trimming_keeps_what_the_old_algorithm_kept() -> None:
    rng = random.Random(0)

    def size(ms: list[dict]) -> int:
        return sum(len(m["content"]) + 3 for m in ms)

    for _ in range(300):
        msgs = _random_chat(rng, rng.randint(1, 25))
        keep_first = rng.choice([0, 1, 2])
        budget = rng.randint(1, size(msgs) + 5)
        try:
            expected = _old_fit(msgs, size, budget, keep_first)
        except InvalidRequest:
            with pytest.raises(InvalidRequest, match="messages"):
                fit_messages(msgs, size, budget, keep_first)
            continue
        assert fit_messages(msgs, size, budget, keep_first) == expected, (msgs, budget, keep_first)


def _long_chat(n: int) -> list[dict]:
    msgs = []
    for i in range(n // 2):
        msgs += [{"role": "user", "content": f"Question {i}: tell me about the number {i} please."},
                 {"role": "assistant", "content": f"Answer {i}: the number {i} is a fine one."}]
    return msgs


def test_a_long_chat_is_trimmed_in_a_handful_of_renders(bundled_model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    session = ChatSession(bundled_model)
    calls = {"render": 0, "encode": 0}
    render, encode = session.render, bundled_model.tokenizer.encode

    def counted(name: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            assert calls[name] <= 60, f"{name} called more than 60 times"
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(session, "render", counted("render", render))
    monkeypatch.setattr(bundled_model.tokenizer, "encode", counted("encode", encode))
    msgs = _long_chat(2000)
    assert len(json.dumps(msgs)) > 80_000
    max_new = bundled_model.context_length - 300
    prompt, _, dropped = session.prepare(msgs, {"max_new_tokens": max_new})
    assert calls["render"] <= 30 and calls["encode"] <= 30
    assert len(encode(prompt, allow_special=True)) <= 300
    assert "Question 0:" in prompt and "Answer 0:" in prompt and "Answer 999:" in prompt
    assert "Question 500:" not in prompt and dropped > 1900

    # the same messages as the old algorithm, on a chat it can afford
    monkeypatch.setattr(session, "render", render)
    monkeypatch.setattr(bundled_model.tokenizer, "encode", encode)

    def count(ms: list[dict]) -> int:
        return len(encode(session.render(ms), allow_special=True))

    small = _long_chat(60) + [{"role": "user", "content": "And the last one?"}]
    for budget in (20, 60, 100, 200, 450, 10_000):
        assert _outcome(fit_messages, small, count, budget) == _outcome(_old_fit, small, count, budget), budget


def _outcome(fit: Callable, *args: object) -> object:
    try:
        return fit(*args)
    except InvalidRequest:
        return "too long"


def test_message_count_and_shape_are_bounded() -> None:
    def size(ms: list[dict]) -> int:
        return len(ms)

    with pytest.raises(InvalidRequest, match="at most 10000") as err:
        fit_messages([{"role": "user", "content": "x"}] * 10_001, size, 10**9)
    assert err.value.field == "messages"
    with pytest.raises(InvalidRequest) as err:
        fit_messages(["hello"], size, 10)  # type: ignore[list-item]
    assert err.value.field == "messages[0]"
    with pytest.raises(InvalidRequest) as err:
        PlayScript().prompt([("user", "a", "b")])  # type: ignore[list-item]
    assert err.value.field == "messages[0]"


# ---- 3. presets -------------------------------------------------------------------------------------


GOOD = {"description": "Haiku", "template": "A haiku about {input}:\n"}


def _bad_preset_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "haiku.json").write_text(json.dumps(GOOD))
    (folder / "deep.json").write_text("[" * 100_000)
    (folder / "big.json").write_text(json.dumps({**GOOD, "example": "x" * 300_000}))
    (folder / "latin.json").write_bytes(json.dumps({**GOOD, "description": "Café"}, ensure_ascii=False).encode("latin-1"))
    return folder


def test_bad_preset_files_are_reported_by_name(tmp_path: Path) -> None:
    folder = _bad_preset_dir(tmp_path)
    presets, errors = load_presets(folder)
    assert "haiku" in presets and "code" in presets
    assert not {"deep", "big", "latin"} & set(presets)
    for name in ("deep", "big", "latin"):
        assert sum(f"{name}.json" in e for e in errors) == 1, errors
    assert any("big.json" in e and "262144" in e for e in errors)


def test_asking_for_a_broken_preset_says_what_is_wrong_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gptj.presets import PresetError, apply_preset

    _bad_preset_dir(tmp_path / "gptj" / "presets")
    monkeypatch.setenv("GPTJ_CONFIG_DIR", str(tmp_path / "gptj"))
    with pytest.raises(PresetError, match=r"latin\.json: not UTF-8"):
        apply_preset("latin", "x", {})
    assert apply_preset("haiku", "rain", {})[0] == "A haiku about rain:\n"


def test_preset_fields_are_bounded(tmp_path: Path) -> None:
    (tmp_path / "long.json").write_text(json.dumps({**GOOD, "template": "{input}" + "x" * 70_000}))
    (tmp_path / "name.json").write_text(json.dumps({**GOOD, "kind": "chat", "bot_name": 5}))
    (tmp_path / "intro.json").write_text(json.dumps({**GOOD, "kind": "chat", "intro": ["x"]}))
    _, errors = load_presets(tmp_path)
    assert any("long.json" in e and "'template'" in e for e in errors)
    assert any("name.json" in e and "'bot_name'" in e for e in errors)
    assert any("intro.json" in e and "'intro'" in e for e in errors)


def test_a_preset_that_is_not_a_regular_file_is_skipped(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.json")  # reading it would wait forever
    (tmp_path / "folder.json").mkdir()
    presets, errors = load_presets(tmp_path)
    assert "code" in presets
    assert any("pipe.json" in e for e in errors) and any("folder.json" in e for e in errors)


def test_the_cli_still_runs_presets_beside_a_bad_file(tmp_path: Path) -> None:
    _bad_preset_dir(tmp_path / "gptj" / "presets")
    env = {**os.environ, "GPTJ_CONFIG_DIR": str(tmp_path / "gptj")}
    cmd = [sys.executable, "-m", "gptj.cli"]
    listing = subprocess.run([*cmd, "presets", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert "haiku" in {p["name"] for p in data["presets"]} and len(data["errors"]) == 3
    out = subprocess.run([*cmd, "generate", "def add(a, b):", "--preset", "code", "-n", "1", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert len(json.loads(out.stdout)["tokens"]) == 1


# ---- 4. gptj chat -----------------------------------------------------------------------------------


def _repl(reply: tuple[str, ...] = ("Hi", " there")) -> tuple[ChatREPL, io.StringIO, FakeModel]:
    out = io.StringIO()
    model = FakeModel(reply=reply)
    return ChatREPL(ChatSession(model, PlayScript()), {"max_new_tokens": 8}, out=out), out, model


def test_save_errors_keep_the_session(tmp_path: Path) -> None:
    repl, out, _ = _repl()
    repl.turn("hello")
    assert repl.command(f"/save {tmp_path / 'missing' / 'c.json'}") is True
    assert repl.command(f"/save {tmp_path}") is True
    assert out.getvalue().count("could not save") == 2
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left behind
    assert len(repl.messages) == 2


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repl, out, _ = _repl()
    repl.turn("hello")
    target = tmp_path / "c.json"
    target.write_text("the earlier conversation")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    repl.command(f"/save {target}")
    assert target.read_text() == "the earlier conversation"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"] and "disk full" in out.getvalue()
    monkeypatch.undo()
    repl.command(f"/save {target}")
    assert json.loads(target.read_text())["messages"][0]["content"] == "hello"


@pytest.mark.parametrize("content", [
    "[1, 2]", '{"messages": 5}', '{"messages": [{"role": "user"}]}', '{"messages": [{"content": "x"}]}',
    '{"messages": [{"role": "wizard", "content": "x"}]}', '{"messages": ["hi"]}',
    '{"system": 5, "messages": []}', "[" * 100_000, b"{\"messages\": [], \"system\": \"caf\xe9\"}", "",
])
def test_load_of_a_file_that_is_not_a_conversation(tmp_path: Path, content: str | bytes) -> None:
    repl, out, _ = _repl()
    repl.turn("hello")
    f = tmp_path / "c.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert repl.command(f"/load {f}") is True
    assert "could not load" in out.getvalue()
    assert [m["content"] for m in repl.messages] == ["hello", "Hi there"] and repl.system is None


def _turn(repl: ChatREPL, text: str) -> str:
    """A turn where a Ctrl+C that escapes fails the test instead of stopping pytest."""
    try:
        return repl.turn(text)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the turn")


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_conversation() -> None:
    repl, out, model = _repl(reply=("Hel", "lo", " world"))

    def interrupted(prompt: str, **settings: object) -> Iterator[str]:
        try:
            yield "Hel"
            yield "lo"
            raise KeyboardInterrupt  # Ctrl+C inside the engine
        finally:
            model.closed += 1

    model.stream = interrupted  # type: ignore[method-assign]
    assert _turn(repl, "hello") == "Hello"
    assert repl.messages[-1] == {"role": "assistant", "content": "Hello"} and model.closed == 1
    assert "stopped" in out.getvalue()


def test_ctrl_c_signal_during_a_reply_cancels_the_generation() -> None:
    repl, out, model = _repl()

    def signalled(prompt: str, **settings: object) -> Iterator[str]:
        try:
            yield "Hel"
            signal.raise_signal(signal.SIGINT)  # Ctrl+C between two pieces
            yield "lo"
            yield " world"
        finally:
            model.closed += 1

    model.stream = signalled  # type: ignore[method-assign]
    handler = signal.getsignal(signal.SIGINT)
    reply = _turn(repl, "hello")
    assert reply in ("Hel", "Hello") and model.closed == 1
    assert signal.getsignal(signal.SIGINT) is handler
    # a reply stopped before any text leaves no dangling user turn

    def at_once(prompt: str, **settings: object) -> Iterator[str]:
        raise KeyboardInterrupt
        yield ""

    model.stream = at_once  # type: ignore[method-assign]
    _turn(repl, "again")
    assert [m["role"] for m in repl.messages] == ["user", "assistant"]


def _chat_args() -> argparse.Namespace:
    return argparse.Namespace(user_name="You", bot_name=None, system=None, model=None, quantize=None)


def test_run_chat_survives_bad_commands_and_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    from gptj.cli import common

    model = FakeModel(context_length=600)
    monkeypatch.setattr(common, "model_from_args", lambda args, max_batch=1: model)
    (tmp_path / "list.json").write_text("[1, 2]")
    lines = iter([f"/save {tmp_path / 'no' / 'c.json'}", f"/save {tmp_path}", f"/load {tmp_path / 'list.json'}",
                  "/load", "x" * 1000, "hello"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", fake_input)
    try:
        assert run_chat(_chat_args()) in (0, 130)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped run_chat")
    out = capsys.readouterr()
    assert "Hi there" in out.out and "Traceback" not in out.out + out.err
    assert out.out.count("could not save") == 2 and "could not load" in out.out and "usage: /load" in out.out
    assert "context window" in out.out  # the over-long message was refused, the session went on
