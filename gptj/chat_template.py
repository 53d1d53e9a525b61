"""A model's chat template, rendered as Hugging Face's apply_chat_template renders it, in Jinja's
sandbox and within a time and a size bound: templates come with the model file, so they are not
trusted, and neither is the conversation fed to them."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.runtime import Context, Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

from gptj.errors import InvalidRequest, ModelLoadError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 10_000  # per conversation: trimming and rendering stay cheap
# Marks the end of a message to be continued while it renders (private-use characters, which no
# tokenizer gives a meaning and no template looks for); cut off with everything after it.
CONTINUE_MARK = "\ue000gptj-continue\ue001"


def normalise_messages(messages: list[Message] | list[tuple[str, str]]) -> list[Message]:
    """The messages as {role, content} dicts; InvalidRequest names the first bad one."""
    if not isinstance(messages, list | tuple):
        raise InvalidRequest("messages", "must be a list of {role, content} messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, tuple) and len(m) == 2:
            role, content = m
        elif isinstance(m, dict):
            role, content = m.get("role"), m.get("content")
        else:
            raise InvalidRequest(f"messages[{i}]", "must be an object with a role and a content")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")
        out.append({"role": role, "content": content})
    return out



# Chat templates come with the model (a GGUF or a model folder), so they are not trusted: they
# render in a sandbox, and within a time limit and a size limit, so that a template (or a
# conversation fed to it) can neither run for minutes nor fill the memory.
TEMPLATE_TIME_LIMIT = 2.0  # seconds per render
TEMPLATE_SIZE_LIMIT = 4_000_000  # characters: the output, and any value the template builds
TEMPLATE_INT_BITS = 65_536  # the largest number a template may compute
TEMPLATE_SOURCE_LIMIT = 1_000_000  # characters of template source

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("gptj_template_deadline", default=None)


class ChatTemplateError(ModelLoadError):
    """A chat template that does not compile: the model cannot chat, so loading it fails."""


class _TemplateRaised(TemplateError):
    """The template's own raise_exception(): it refuses the conversation."""


class _TemplateLimit(Exception):
    """A template went over a time or size limit."""


def _check_time() -> None:
    current = _DEADLINE.get()
    if current is not None and time.monotonic() > current[0]:
        raise _TemplateLimit(f"it ran over its time limit of {current[1]:g} s")


def _size(value: object, limit: int = TEMPLATE_SIZE_LIMIT) -> int:
    """About how many characters `value` becomes as text (containers count every item, so many
    references to one long string count in full); stops counting once past `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, dict):
            total += 1 + 2 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            total += 1 + len(v)
            stack.extend(v)
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        else:
            total += 1
    return total


def _refuse(size: int) -> None:
    if size > TEMPLATE_SIZE_LIMIT:
        raise _TemplateLimit(f"it made a value over the size limit of {TEMPLATE_SIZE_LIMIT} characters")


def _checked(value: Any) -> Any:
    """`value`, unless it is over the size limit (or a number over the bit limit)."""
    if isinstance(value, int) and value.bit_length() > TEMPLATE_INT_BITS:
        raise _TemplateLimit(f"it made a number over the limit of {TEMPLATE_INT_BITS} bits")
    if not isinstance(value, str) or len(value) > TEMPLATE_SIZE_LIMIT:
        _refuse(_size(value))
    return value


def _materialised(value: Any) -> Any:
    """An iterator (a generator from map or select) as a list, counted as it is read, so that
    what consumes it (join, list, sum, ...) is known not to outgrow the size limit."""
    if not isinstance(value, Iterator):
        return value
    items, total = [], 0
    for item in value:
        _check_time()
        total += 1 + _size(item)
        _refuse(total)
        items.append(item)
    return items


_FORMAT_FIELD = re.compile(r"%[^a-zA-Z%]*|\{[^{}]*")
_WIDTH_CALLS = {"center", "ljust", "rjust", "zfill", "wordwrap", "truncate", "batch", "slice", "indent", "expandtabs",
                "tojson", "pprint"}


def _format_size(fmt: str, values: object) -> int:
    """About how long `fmt % values` or `fmt.format(*values)` gets: every field may take all the
    values, at the widest width written in the format (or passed as a value, with * or {})."""
    fields = _FORMAT_FIELD.findall(fmt)
    digits = re.findall(r"\d+", "".join(fields))
    widths = [int(d) if len(d) < 9 else TEMPLATE_SIZE_LIMIT + 1 for d in digits]
    if re.search(r"%[^a-zA-Z%]*\*|\{[^{}]*\{", fmt):
        stack = [values]
        while stack:
            v = stack.pop()
            if isinstance(v, int):
                widths.append(abs(v))
            elif isinstance(v, list | tuple):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
    return len(fmt) + len(fields) * (_size(values) + max(widths, default=0))


def _call_size(name: str, target: object, args: tuple, kwargs: dict, is_filter: bool) -> int:
    """About how large a call's result gets, for the calls (methods and filters, by name) whose
    result can be much larger than their arguments; 0 for the others."""
    if name == "format" and isinstance(target, str):
        return _format_size(target, (args, kwargs))
    if name == "replace" and isinstance(target, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        return len(target) + (target.count(old) if old else len(target) + 1) * len(new)
    if name == "join":  # the filter: items|join(separator); the method: separator.join(items)
        first = args[0] if args else kwargs.get("d", "")
        items, sep = (target, first) if is_filter else (first, target)
        count = len(items) if isinstance(items, str | list | tuple | dict) else _size(items)
        return _size(items) + _size(sep) * count
    if name in _WIDTH_CALLS:
        ints = [abs(v) for v in (*args, *kwargs.values()) if isinstance(v, int)]
        width = max([*ints, *(len(v) for v in args if name == "indent" and isinstance(v, str))], default=0)
        repeat = 1  # how many times the width can be added
        if isinstance(target, str) and name in ("indent", "expandtabs"):
            repeat += target.count("\n" if name == "indent" else "\t")
        elif name in ("tojson", "pprint"):
            repeat += _size(target)
        fill = _size([v for v in (*args, *kwargs.values()) if not isinstance(v, int)])  # fill values, e.g. batch's
        return _size(target) + width * (repeat + fill)
    return 0


def _guard(name: str, target: object, fn: Callable[..., Any], args: tuple, kwargs: dict, is_filter: bool) -> Any:
    """Calls `fn` for the template: within the deadline, its size estimated before and checked after."""
    _check_time()
    args = tuple(_materialised(a) for a in args)
    kwargs = {k: v if k.startswith("_") else _materialised(v) for k, v in kwargs.items()}
    public = {k: v for k, v in kwargs.items() if not k.startswith("_")}  # not Jinja's _loop_vars
    _refuse(_call_size(name, _materialised(target), args, public, is_filter))
    return _checked(fn(*args, **kwargs))


def _guarded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0  # the context/environment argument

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if len(args) <= skip:
            return fn(*args, **kwargs)
        value = _materialised(args[skip])
        return _guard(name, value, lambda *a, **k: fn(*args[:skip], value, *a, **k), args[skip + 1:], kwargs, True)

    return guarded


@pass_context
def _loop_filter(_: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """Around what a {% for %} loop iterates: loops with no calls in them still meet the deadline."""
    for item in iterable:
        _check_time()
        yield item


@pass_context
def _checked_filter(_: Context, value: Any) -> Any:
    return _checked(value)


@pass_context
def _concat_filter(_: Context, values: list[Any]) -> str:
    """`a ~ b ~ c`, each part counted before it becomes text."""
    parts, total = [], 0
    for v in values:
        if not isinstance(v, str):
            _refuse(_size(v))
            v = str(v)
        total += len(v)
        _refuse(total)
        parts.append(v)
    return "".join(parts)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with every call, operator, loop and output checked against the deadline and the
    size limits (see _guard); * ** % + are intercepted so that they are checked too."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_checked)
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs
        self.filters = {name: _guarded_filter(name, fn) for name, fn in self.filters.items()}
        self.filters.update(_gptj_loop=_loop_filter, _gptj_checked=_checked_filter, _gptj_concat=_concat_filter)

    @staticmethod
    def concat(parts: Iterable[str]) -> str:  # type: ignore[override]
        """Joins buffered output (macros, {% set %} blocks) within the size limit."""
        out, total = [], 0
        for part in parts:
            total += len(part)
            _refuse(total)
            out.append(part)
        return "".join(out)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return self._guard_tree(super()._parse(source, name, filename))

    def _guard_tree(self, node: Any) -> Any:
        """Puts the checks into the parsed template: around loops' iterables, literals and `~`."""
        for name, value in node.iter_fields():
            if isinstance(value, nodes.Node):
                setattr(node, name, self._guard_tree(value))
            elif isinstance(value, list):
                setattr(node, name, [self._guard_tree(v) if isinstance(v, nodes.Node) else v for v in value])
        if isinstance(node, nodes.For):
            node.iter = self._filter(node.iter, "_gptj_loop")
        elif isinstance(node, nodes.Concat):
            return self._filter(nodes.List(node.nodes, lineno=node.lineno), "_gptj_concat")
        elif isinstance(node, nodes.List | nodes.Dict) or (isinstance(node, nodes.Tuple) and node.ctx == "load"):
            return self._filter(node, "_gptj_checked")
        return node

    def _filter(self, node: nodes.Expr, name: str) -> nodes.Filter:
        wrapped = nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)
        wrapped.environment = node.environment = self
        return wrapped

    # The double underscores (as in Jinja's own) keep a template's keyword arguments from clashing.
    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        target = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        parent = super().call
        return _guard(name, target, lambda *a, **k: parent(__context, __obj, *a, **k), args, kwargs, False)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > TEMPLATE_INT_BITS:
                raise _TemplateLimit(f"it made a number over the limit of {TEMPLATE_INT_BITS} bits")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > TEMPLATE_INT_BITS:
                    raise _TemplateLimit(f"it made a number over the limit of {TEMPLATE_INT_BITS} bits")
            elif isinstance(right, int):
                _refuse(_size(left) * max(right, 0))
            elif isinstance(left, int):
                _refuse(_size(right) * max(left, 0))
        elif operator == "%" and isinstance(left, str):
            _refuse(_format_size(left, right))
        return _checked(super().call_binop(context, operator, left, right))


def _template_line(exc: BaseException) -> int | None:
    """The template line where `exc` happened: Jinja gives template code's frames the filename
    '<template>' and the template's line numbers."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A model's chat template (Jinja, as Hugging Face's apply_chat_template renders it), bounded:
    a template that does not compile raises ChatTemplateError (naming `name`, the model), and one
    that fails or goes over a limit while rendering is an InvalidRequest on "messages"."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "the model",
                 time_limit: float = TEMPLATE_TIME_LIMIT) -> None:
        if len(source) > TEMPLATE_SOURCE_LIMIT:
            raise ChatTemplateError(f"{name}: the chat template is over the limit of {TEMPLATE_SOURCE_LIMIT} characters")
        env = _BoundedSandbox()

        def raise_exception(message: str) -> None:
            raise _TemplateRaised(message)

        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{name}: the chat template has an error at line {exc.lineno}: {exc.message}") from None
        except Exception as exc:  # e.g. RecursionError: nested too deep for the parser
            raise ChatTemplateError(f"{name}: the chat template does not compile: {type(exc).__name__}: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.time_limit = time_limit

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> str:
        """The conversation as the model reads it. `continue_final_message` (vLLM's and Hugging
        Face's name) leaves the last message open: the text ends with its content exactly, no
        end-of-turn after it, so the model goes on with it (then add_generation_prompt is ignored)."""
        msgs = normalise_messages(messages)
        if continue_final_message and msgs:
            # A mark after the last message's content shows where the template put it, whatever
            # it does around it (it may trim it, or drop it when it is empty); the text ends there.
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + CONTINUE_MARK}
            text = self._render(msgs, False)
            if CONTINUE_MARK not in text:
                raise InvalidRequest("messages", "the chat template leaves out the last message, so it cannot be "
                                                 "continued")
            return text[: text.rindex(CONTINUE_MARK)]
        return self._render(msgs, add_generation_prompt)

    def _render(self, msgs: list[Message], add_generation_prompt: bool) -> str:
        if _size(msgs) > TEMPLATE_SIZE_LIMIT:
            raise InvalidRequest("messages", f"over the limit of {TEMPLATE_SIZE_LIMIT} characters for the chat template")
        reset = _DEADLINE.set((time.monotonic() + self.time_limit, self.time_limit))
        chunks = self.template.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        parts, total = [], 0
        try:
            for chunk in chunks:  # output and time are checked between chunks too
                total += len(chunk)
                if total > TEMPLATE_SIZE_LIMIT:
                    raise _TemplateLimit(f"its output went over the limit of {TEMPLATE_SIZE_LIMIT} characters")
                _check_time()
                parts.append(chunk)
        except _TemplateRaised as exc:
            raise InvalidRequest("messages", f"the chat template rejected them: {exc}") from None
        except Exception as exc:  # anything the template does wrong is the request's error, not a crash
            line = _template_line(exc)
            where = f" at line {line}" if line else ""
            why = str(exc) if isinstance(exc, _TemplateLimit | TemplateError) else f"{type(exc).__name__}: {exc}"
            raise InvalidRequest("messages", f"the chat template failed{where}: {why}") from None
        finally:
            chunks.close()
            _DEADLINE.reset(reset)
        return "".join(parts)
