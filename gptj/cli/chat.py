"""`gptj chat`: a terminal conversation with history and slash commands."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from gptj.cli import common
from gptj.errors import InvalidRequest

if TYPE_CHECKING:  # gptj.chat imports jinja2: loaded by the commands that chat, not by `gptj --help`
    from gptj.chat import ChatSession

MAX_SAVED_BYTES = 64 << 20  # a conversation file that /load reads at once

HELP = """commands:
  /reset          forget the conversation
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /system TEXT    set the system prompt (the intro of a play script)
  /help           this text
  /quit           leave (or Ctrl+D)"""


class ChatREPL:
    def __init__(self, session: ChatSession, settings: dict, system: str | None = None, out: TextIO | None = None) -> None:
        self.session, self.settings = session, settings
        self.out = out if out is not None else sys.stdout  # looked up now: stdout may have been redirected
        self.system = system
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def command(self, line: str) -> bool:
        """Runs a slash command; False means quit. A command that fails says why; the session goes on."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            self.messages = []
            self.say("(conversation cleared)")
        elif name == "save":
            if not arg:
                self.say("usage: /save FILE")
            else:
                try:
                    save_conversation(Path(arg), {"system": self.system, "messages": self.messages})
                    self.say(f"(saved {len(self.messages)} messages to {arg})")
                except OSError as exc:
                    self.say(f"(could not save {arg!r}: {exc.strerror or exc})")
        elif name == "load":
            if not arg:
                self.say("usage: /load FILE")
            else:
                try:
                    self.system, self.messages = load_conversation(Path(arg))
                    self.say(f"(loaded {len(self.messages)} messages from {arg})")
                except (OSError, ValueError, RecursionError) as exc:
                    self.say(f"(could not load {arg!r}: {exc})")
        elif name == "system":
            self.system = arg or None
            self.say("(system prompt set)" if arg else "(system prompt cleared)")
        else:
            self.say(HELP)
        return True

    def turn(self, text: str) -> str:
        """One exchange. Ctrl+C stops the reply (the generation is cancelled) and keeps what came
        so far; a reply stopped before any text, or a message the model cannot take, leaves the
        conversation as it was."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        with _ctrl_c_stops() as stopped:
            try:
                _, _, dropped = self.session.prepare(self.conversation(), dict(self.settings))
                if dropped:
                    self.say(f"(the conversation is longer than the context window: {dropped} earlier messages left out)")
                if not stopped.is_set():
                    self._stream(pieces, stopped)
            except InvalidRequest as exc:
                self.messages.pop()
                self.say(f"(error: {exc})")
                return ""
            except KeyboardInterrupt:  # a second Ctrl+C, or one while the engine stepped
                stopped.set()
        self.out.write("\n")
        if stopped.is_set():
            self.say("(reply stopped)")
        reply = "".join(pieces)
        if not self.session.template:
            reply = self.session.script.clean_reply(reply)
        if stopped.is_set() and not reply:
            self.messages.pop()
            return ""
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _stream(self, pieces: list[str], stopped: threading.Event) -> None:
        stream = self.session.stream(self.conversation(), **self.settings)
        try:
            for piece in stream:
                if stopped.is_set():
                    break
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        finally:  # closing the stream cancels the generation
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def say(self, text: str) -> None:
        print(text, file=self.out)


@contextmanager
def _ctrl_c_stops() -> Iterator[threading.Event]:
    """While a reply streams, the first Ctrl+C only sets the event, so the reply stops between two
    pieces (not in the middle of an engine step); a second one raises KeyboardInterrupt."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield stopped
        return

    def on_sigint(signum: int, frame: object) -> None:
        if stopped.is_set():
            raise KeyboardInterrupt
        stopped.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def save_conversation(path: Path, data: dict) -> None:
    """Writes atomically: a temporary file in the same folder, then a rename over `path`, so a
    failed save never leaves a half-written or truncated file."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_conversation(path: Path) -> tuple[str | None, list[dict]]:
    """The system prompt and messages of a file written by /save; ValueError says what is wrong."""
    if path.stat().st_size > MAX_SAVED_BYTES:
        raise ValueError(f"over the limit of {MAX_SAVED_BYTES} bytes")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ValueError('not a saved conversation: expected {"system": ..., "messages": [...]}')
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("system: must be a string or null")
    from gptj.chat import normalise_messages

    messages = normalise_messages(data["messages"])  # InvalidRequest (a ValueError) names the bad message
    return system, messages


def run_chat(args: argparse.Namespace) -> int:
    from gptj.chat import ChatSession, PlayScript

    model = common.model_from_args(args)
    common.print_weights(model, args)
    script = None
    if model.info.architecture == "gptj" or args.bot_name or not model.tokenizer.chat_template:
        script = PlayScript(user_name=args.user_name, bot_name=args.bot_name or "GPT-J")
        if args.system:
            script.intro = args.system
    session = ChatSession(model, script)
    settings = {"max_new_tokens": 256, **common.sampling_settings(args)}
    repl = ChatREPL(session, settings, system=args.system if script is None else None)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model.name}; /help for commands, Ctrl+D to leave")
    while True:
        try:
            line = input(f"{args.user_name}> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:  # Ctrl+C at the prompt leaves (during a reply it stops the reply)
            print()
            return 130
        if not line.strip():
            continue
        if line.startswith("/"):
            if not repl.command(line.strip()):
                return 0
            continue
        repl.turn(line)
