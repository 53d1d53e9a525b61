"""Chat on top of the engine, one code path for the CLI, the Python API and the server.

Base models (GPT-J) chat through a play script: an intro, then `You: ...` / `GPT-J: ...`
lines, and the reply stops where the model starts someone's next line. Instruct models use
their own chat template (from the GGUF metadata), rendered in a sandboxed Jinja environment.
When the conversation outgrows the context window, the oldest exchanges are dropped, keeping
the intro/system prompt and the first exchange.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptj.sampling import InvalidRequest

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


@dataclass
class PlayScript:
    intro: str = "The following is a conversation between a human and a helpful AI assistant."
    user_name: str = "You"
    bot_name: str = "GPT-J"

    def prompt(self, messages: list[Message] | list[tuple[str, str]]) -> str:
        lines = []
        intro = self.intro
        for m in _normalise(messages):
            if m["role"] == "system":
                intro = m["content"]
            else:
                name = self.user_name if m["role"] == "user" else self.bot_name
                lines.append(f"{name}: {m['content'].strip()}")
        head = f"{intro.strip()}\n\n" if intro.strip() else ""
        return head + "".join(line + "\n" for line in lines) + f"{self.bot_name}:"

    def stops(self) -> list[str]:
        return [f"\n{self.user_name}:", f"\n{self.bot_name}:"]

    def clean_reply(self, text: str) -> str:
        """Drops a line where the model begins speaking as anybody else ("Name:")."""
        match = re.search(r"\n[^\n:]{1,40}:", text)
        return (text[: match.start()] if match else text).strip()


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=_normalise(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise InvalidRequest("messages", f"the chat template rejected them: {exc}") from None


def _normalise(messages: list[Message] | list[tuple[str, str]]) -> list[Message]:
    out = []
    for i, m in enumerate(messages):
        role, content = (m if isinstance(m, tuple) else (m.get("role"), m.get("content")))
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")
        out.append({"role": role, "content": content})
    return out


def fit_messages(
    messages: list[Message], count_tokens: Callable[[list[Message]], int], budget: int, keep_first: int = 1
) -> tuple[list[Message], int]:
    """Drops the oldest exchanges (after the system prompt and the first `keep_first` user
    turns with their replies) until the rendered conversation fits `budget` tokens.
    Returns the kept messages and how many were dropped."""
    msgs = _normalise(messages)
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
    if not middle:  # nothing after the kept first exchange: keep the latest turn itself
        head, middle = [], rest
    dropped = 0
    while count_tokens(system + head + middle) > budget:
        if len(middle) > 1:
            # Drop a whole exchange: the user turn and the replies up to the next user turn.
            n = 1
            while n < len(middle) - 1 and middle[n]["role"] != "user":
                n += 1
            middle, dropped = middle[n:], dropped + n
        elif head:
            head, dropped = [], dropped + len(head)
        else:
            raise InvalidRequest("messages", f"the last message alone does not fit the context window ({budget} tokens for the prompt)")
    return system + head + middle, dropped


@dataclass
class ChatReply:
    text: str
    finish_reason: str
    dropped_messages: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    prompt: str = ""
    extra: dict = field(default_factory=dict)


class ChatSession:
    """Formats conversations for one model: its chat template, or a play script for base models."""

    def __init__(self, model, script: PlayScript | None = None, keep_first: int = 1) -> None:  # noqa: ANN001
        self.model = model
        tok = model.tokenizer
        source = tok.chat_template
        self.template = ChatTemplate(source, "", tok.decode([tok.eos_token_id])) if source and script is None else None
        self.script = script or PlayScript(bot_name="GPT-J" if model.info.architecture == "gptj" else "Bot")
        self.keep_first = keep_first

    def render(self, messages: list[Message]) -> str:
        return self.template.render(messages) if self.template else self.script.prompt(messages)

    def stops(self) -> list[str]:
        return [] if self.template else self.script.stops()

    def prepare(self, messages: list[Message], settings: dict) -> tuple[str, dict, int]:
        if not messages:
            raise InvalidRequest("messages", "must not be empty")
        max_new = settings.get("max_new_tokens") or 128
        budget = self.model.context_length - max_new
        if budget < 1:
            raise InvalidRequest("max_new_tokens", f"must be below the context window of {self.model.context_length} tokens")

        def count(ms: list[Message]) -> int:
            return len(self.model.tokenizer.encode(self.render(ms), allow_special=True))

        kept, dropped = fit_messages(messages, count, budget, self.keep_first)
        stops = list(dict.fromkeys(list(settings.get("stop") or []) + self.stops()))
        return self.render(kept), {**settings, "stop": stops}, dropped

    def reply(self, messages: list[Message], **settings: object) -> ChatReply:
        prompt, settings, dropped = self.prepare(messages, settings)
        result = self.model.generate(prompt, **settings)
        text = result.text if self.template else self.script.clean_reply(result.text)
        return ChatReply(text, result.finish_reason, dropped, result.prompt_tokens, result.completion_tokens,
                         result.cached_prompt_tokens, prompt)

    def stream(self, messages: list[Message], **settings: object) -> Iterator[str]:
        prompt, settings, _ = self.prepare(messages, settings)
        first = True
        for piece in self.model.stream(prompt, **settings):
            if first and not self.template:
                piece = piece.lstrip()  # the play script puts a space after "Name:"
            first = first and not piece
            if piece:
                yield piece
