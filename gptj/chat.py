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

from gptj.chat_template import (
    MAX_MESSAGES,
    ROLES,
    ChatTemplate,
    ChatTemplateError,
    Message,
    normalise_messages,
)
from gptj.errors import InvalidRequest

__all__ = ["MAX_MESSAGES", "ROLES", "ChatReply", "ChatSession", "ChatTemplate", "ChatTemplateError", "PlayScript",
           "fit_messages", "normalise_messages"]


@dataclass
class PlayScript:
    intro: str = "The following is a conversation between a human and a helpful AI assistant."
    user_name: str = "You"
    bot_name: str = "GPT-J"

    def prompt(self, messages: list[Message] | list[tuple[str, str]], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """The script up to the bot's next line ("GPT-J:"); without `add_generation_prompt`, up to the
        end of the last line. `continue_final_message`: the last line stays open, its text as it is
        (trailing spaces kept), for the model to go on with."""
        msgs = normalise_messages(messages)
        lines = []
        intro = self.intro
        for i, m in enumerate(msgs):
            if m["role"] == "system":
                intro = m["content"]
            else:
                name = self.user_name if m["role"] == "user" else self.bot_name
                last_open = continue_final_message and i == len(msgs) - 1
                text = m["content"].lstrip() if last_open else m["content"].strip()
                lines.append(f"{name}: {text}" if text else f"{name}:")
        head = f"{intro.strip()}\n\n" if intro.strip() else ""
        if continue_final_message and lines:
            return head + "\n".join(lines)
        return head + "".join(line + "\n" for line in lines) + (f"{self.bot_name}:" if add_generation_prompt else "")

    def stops(self) -> list[str]:
        return [f"\n{self.user_name}:", f"\n{self.bot_name}:"]

    def clean_reply(self, text: str, continuing: bool = False) -> str:
        """Drops a line where the model begins speaking as anybody else ("Name:"). A reply's text
        is stripped; a continuation's keeps its start (" and Berlin" goes on from the text before)."""
        match = re.search(r"\n[^\n:]{1,40}:", text)
        kept = text[: match.start()] if match else text
        return kept.rstrip() if continuing else kept.strip()


def fit_messages(
    messages: list[Message], count_tokens: Callable[[list[Message]], int], budget: int, keep_first: int = 1
) -> tuple[list[Message], int]:
    """Drops the oldest exchanges (after the system prompt and the first `keep_first` user
    turns with their replies) until the rendered conversation fits `budget` tokens.
    Returns the kept messages and how many were dropped."""
    msgs = normalise_messages(messages)
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
    # The conversations to try, from the whole one down: drop whole exchanges (a user turn and the
    # replies up to the next user turn) from the front of `middle`, never its last message, and
    # then `head`. Tokens only shrink along this list, so a binary search finds the longest that
    # fits in a few renders (one when everything fits).
    cuts = [0]
    while cuts[-1] < len(middle) - 1:
        n = cuts[-1] + 1
        while n < len(middle) - 1 and middle[n]["role"] != "user":
            n += 1
        cuts.append(n)
    tries = [(system + head + middle[c:], c) for c in cuts]
    if head:
        tries.append((system + middle[cuts[-1]:], cuts[-1] + len(head)))
    fits: dict[int, bool] = {}

    def fit(i: int) -> bool:
        if i not in fits:
            fits[i] = count_tokens(tries[i][0]) <= budget
        return fits[i]

    if fit(0):
        return tries[0]
    if not fit(len(tries) - 1):
        raise InvalidRequest("messages", f"the last message alone does not fit the context window ({budget} tokens for the prompt)")
    lo, hi = 1, len(tries) - 1  # tries[lo - 1] does not fit, tries[hi] does
    while lo < hi:
        mid = (lo + hi) // 2
        if fit(mid):
            hi = mid
        else:
            lo = mid + 1
    return tries[hi]


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
        self.template = (ChatTemplate(source, "", tok.decode([tok.eos_token_id]), name=getattr(model, "name", "the model"))
                         if source and script is None else None)
        self.script = script or PlayScript(bot_name="GPT-J" if model.info.architecture == "gptj" else "Bot")
        self.keep_first = keep_first

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        if self.template:
            return self.template.render(messages, add_generation_prompt, continue_final_message)
        return self.script.prompt(messages, add_generation_prompt, continue_final_message)

    @staticmethod
    def continues(messages: list[Message], continue_final_message: bool) -> bool:
        """Whether the generated text goes on with the last message's text (rather than begin a
        reply): continue_final_message on a last message that has text."""
        return continue_final_message and bool(messages) and bool(normalise_messages(messages[-1:])[0]["content"].strip())

    def stops(self) -> list[str]:
        return [] if self.template else self.script.stops()

    def prepare(self, messages: list[Message], settings: dict, *, continue_final_message: bool = False,
                add_generation_prompt: bool | None = None) -> tuple[str, dict, int]:
        """The prompt, the settings for the engine and how many earlier messages were left out.
        `continue_final_message` (vLLM's): the last message, the assistant's, is continued, not
        answered; `add_generation_prompt` (default: when not continuing) starts the reply's turn."""
        if not messages:
            raise InvalidRequest("messages", "must not be empty")
        if continue_final_message:
            if add_generation_prompt:  # vLLM refuses the pair too
                raise InvalidRequest("add_generation_prompt", "cannot be true with continue_final_message: "
                                     "the last message is continued, so no new turn starts")
            last = normalise_messages(messages[-1:])[0]["role"]
            if last != "assistant":
                raise InvalidRequest("continue_final_message", f"needs the assistant's message last (the reply to "
                                     f"continue); the last message is the {last}'s")
        add_generation_prompt = not continue_final_message if add_generation_prompt is None else add_generation_prompt
        max_new = settings.get("max_new_tokens") or 128
        budget = self.model.context_length - max_new
        if budget < 1:
            raise InvalidRequest("max_new_tokens", f"must be below the context window of {self.model.context_length} tokens")

        rendered: dict[int, str] = {}  # by message count: each conversation tried has its own

        def count(ms: list[Message]) -> int:
            rendered[len(ms)] = self.render(ms, add_generation_prompt, continue_final_message)
            return len(self.model.tokenizer.encode(rendered[len(ms)], allow_special=True))

        kept, dropped = fit_messages(messages, count, budget, self.keep_first)
        stops = list(dict.fromkeys(list(settings.get("stop") or []) + self.stops()))
        # No token healing where the prompt ends in the template's generation prompt or the
        # script's "Name:", a boundary the model knows exactly as it stands (gptj.runtime.healing).
        # A continued message ends in free text, as a completion's prompt does: healing as asked.
        healing = settings.get("token_healing", True) if self.continues(messages, continue_final_message) else False
        return rendered[len(kept)], {**settings, "stop": stops, "token_healing": healing}, dropped

    def reply(self, messages: list[Message], *, continue_final_message: bool = False, **settings: object) -> ChatReply:
        """The model's reply, or with `continue_final_message` the text that goes on with the last
        (the assistant's) message: add it to that message as it is."""
        prompt, settings, dropped = self.prepare(messages, settings, continue_final_message=continue_final_message)
        result = self.model.generate(prompt, **settings)
        continuing = self.continues(messages, continue_final_message)
        text = result.text if self.template else self.script.clean_reply(result.text, continuing)
        return ChatReply(text, result.finish_reason, dropped, result.prompt_tokens, result.completion_tokens,
                         result.cached_prompt_tokens, prompt)

    def stream(self, messages: list[Message], *, continue_final_message: bool = False, **settings: object) -> Iterator[str]:
        prompt, settings, _ = self.prepare(messages, settings, continue_final_message=continue_final_message)
        first = not self.continues(messages, continue_final_message)  # a continuation keeps its first space
        pieces = self.model.stream(prompt, **settings)
        try:
            for piece in pieces:
                if first and not self.template:
                    piece = piece.lstrip()  # the play script puts a space after "Name:"
                first = first and not piece
                if piece:
                    yield piece
        finally:  # closing this stream (Ctrl+C in `gptj chat`) cancels the generation at once
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
