"""`gptj chat`: a terminal conversation with history and slash commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptj.chat import ChatSession, PlayScript

HELP = """commands:
  /reset          forget the conversation
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /system TEXT    set the system prompt (the intro of a play script)
  /help           this text
  /quit           leave (or Ctrl+D)"""


class ChatREPL:
    def __init__(self, session: ChatSession, settings: dict, system: str | None = None, out=sys.stdout) -> None:  # noqa: ANN001
        self.session, self.settings, self.out = session, settings, out
        self.system = system
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def command(self, line: str) -> bool:
        """Runs a slash command; False means quit."""
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
                Path(arg).write_text(json.dumps({"system": self.system, "messages": self.messages}, indent=2, ensure_ascii=False))
                self.say(f"(saved {len(self.messages)} messages to {arg})")
        elif name == "load":
            try:
                data = json.loads(Path(arg).read_text())
                self.system, self.messages = data.get("system"), list(data["messages"])
                self.say(f"(loaded {len(self.messages)} messages from {arg})")
            except (OSError, ValueError, KeyError) as exc:
                self.say(f"(could not load {arg!r}: {exc})")
        elif name == "system":
            self.system = arg or None
            self.say("(system prompt set)" if arg else "(system prompt cleared)")
        else:
            self.say(HELP)
        return True

    def turn(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        _, _, dropped = self.session.prepare(self.conversation(), dict(self.settings))
        if dropped:
            self.say(f"(the conversation is longer than the context window: {dropped} earlier messages left out)")
        pieces = []
        for piece in self.session.stream(self.conversation(), **self.settings):
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        self.out.write("\n")
        reply = "".join(pieces)
        if not self.session.template:
            reply = self.session.script.clean_reply(reply)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def say(self, text: str) -> None:
        print(text, file=self.out)


def run_chat(args: argparse.Namespace) -> int:
    from gptj.cli import load_model, sampling_settings

    model = load_model(args)
    script = None
    if model.info.architecture == "gptj" or args.bot_name or not model.tokenizer.chat_template:
        script = PlayScript(user_name=args.user_name, bot_name=args.bot_name or "GPT-J")
        if args.system:
            script.intro = args.system
    session = ChatSession(model, script)
    settings = {"max_new_tokens": 256, **sampling_settings(args)}
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
        if not line.strip():
            continue
        if line.startswith("/"):
            if not repl.command(line.strip()):
                return 0
            continue
        repl.turn(line)
