"""The playground's studio features in headless Chromium (issue #17): chats kept in the browser
(list, rename, delete, export/import in `gptj chat`'s /save format), edit/continue/branches,
Markdown without HTML from the model, the next-token view, View code, the advanced sampler
settings, the connection dot and the status line.

Chat replies come from a stub (page.route) that answers at once: these tests are about the page,
and stay fast and exact on a busy machine; the next-token view, View code's commands and the
CSP check use the real `gptj serve` of test_browser.py's fixtures. Waits are on the page's state,
never fixed sleeps."""

# ruff: noqa: F811  (the tests take the fixtures imported from test_browser as parameters)

from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

import pytest
from test_browser import (  # noqa: F401  (fixtures: pytest finds them by name)
    ARTIFACTS,
    _post,
    browser,
    info,
    page,
    server,
    set_setting,
    sync_api,
    wait_idle,
)

pytestmark = pytest.mark.browser
expect = sync_api.expect
expect.set_options(timeout=15_000)  # an upper bound for a busy machine: waits end as soon as the page is there


# ---- a stub for the chat endpoint ----------------------------------------------------------------


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def chat_stream(text: str, finish: str = "stop", dropped: int = 0) -> str:
    """A /v1/chat/completions event stream that sends `text` in a few pieces."""
    out = _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                  "gptj": {"dropped_messages": dropped}})
    step = max(1, len(text) // 3)
    for i in range(0, len(text), step):
        out += _event({"choices": [{"index": 0, "delta": {"content": text[i:i + step]}, "finish_reason": None}]})
    out += _event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return out + "data: [DONE]\n\n"


def completion_stream(text: str, finish: str = "stop") -> str:
    out = _event({"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]})
    out += _event({"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})
    return out + "data: [DONE]\n\n"


class FakeChat:
    """Answers /v1/chat/completions in the browser: `reply(body, n)` -> text or (text, finish);
    by default "Reply n to: <the last message>". Keeps the request bodies."""

    def __init__(self, pg, reply=None) -> None:
        self.requests: list[dict] = []
        self.reply = reply or (lambda body, n: f"Reply {n} to: {body['messages'][-1]['content']}")
        pg.route("**/v1/chat/completions", self.handle)

    def handle(self, route) -> None:  # noqa: ANN001
        body = route.request.post_data_json
        self.requests.append(body)
        out = self.reply(body, len(self.requests))
        text, finish = out if isinstance(out, tuple) else (out, "stop")
        route.fulfill(status=200, body=chat_stream(text, finish), content_type="text/event-stream")


def bodies(pg) -> list[str]:  # noqa: ANN001
    return pg.locator("#chat-messages .msg .msg-body").all_inner_texts()


def send(pg, text: str, replies: int) -> None:  # noqa: ANN001
    """Sends a message and waits for its reply (the `replies`-th assistant message shown)."""
    pg.fill("#chat-input", text)
    pg.press("#chat-input", "Enter")
    expect(pg.get_by_test_id("msg-assistant")).to_have_count(replies)
    expect(pg.locator("#chat-send")).to_be_enabled()


def chat_titles(pg) -> list[str]:  # noqa: ANN001
    return pg.get_by_test_id("chat-item-title").all_inner_texts()


def reload(pg) -> None:  # noqa: ANN001
    pg.reload()
    pg.wait_for_function("document.querySelector('#preset-select').options.length > 1")


# ---- conversations kept in the browser ----------------------------------------------------------


def test_chats_survive_a_reload(page) -> None:
    """Three turns, a reload: the conversation is still there, and so is the list of chats."""
    fake = FakeChat(page)
    page.click("#tab-chat")
    page.fill("#chat-system", "You are terse.")
    for i, q in enumerate(["First question?", "Second one.", "And a third."], 1):
        send(page, q, i)
    want = bodies(page)
    assert want == ["First question?", "Reply 1 to: First question?", "Second one.", "Reply 2 to: Second one.",
                    "And a third.", "Reply 3 to: And a third."]
    # The whole conversation went back each turn, after the system prompt.
    assert [m["role"] for m in fake.requests[-1]["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]

    reload(page)
    expect(page.get_by_test_id("msg-assistant")).to_have_count(3)
    assert bodies(page) == want
    expect(page.locator("#panel-chat")).to_be_visible()  # the tab is remembered too
    assert page.input_value("#chat-system") == "You are terse."
    assert chat_titles(page) == ["First question?"]

    # A new chat: the first stays in the list; either can be opened, and survives a reload.
    page.click("#chat-reset")
    expect(page.locator(".msg")).to_have_count(0)
    send(page, "Another topic", 1)
    other = bodies(page)
    assert chat_titles(page) == ["Another topic", "First question?"]
    page.get_by_test_id("chat-item-title").filter(has_text="First question?").click()
    expect(page.get_by_test_id("msg-assistant")).to_have_count(3)
    assert bodies(page) == want
    reload(page)
    expect(page.get_by_test_id("msg-assistant")).to_have_count(3)
    assert page.get_attribute("[data-testid=chat-item][aria-current=true] [data-testid=chat-item-title]", "title") == "First question?"
    page.get_by_test_id("chat-item-title").filter(has_text="Another topic").click()
    expect(page.get_by_test_id("msg-assistant")).to_have_count(1)
    assert bodies(page) == other == ["Another topic", "Reply 4 to: Another topic"]


def test_chats_rename_and_delete(page) -> None:
    FakeChat(page)
    page.click("#tab-chat")
    send(page, "Alpha", 1)
    page.click("#chat-reset")
    send(page, "Beta", 1)
    assert chat_titles(page) == ["Beta", "Alpha"]

    item = page.get_by_test_id("chat-item").filter(has_text="Alpha")
    item.hover()
    item.get_by_test_id("chat-rename").click()
    page.get_by_test_id("chat-rename-input").fill("Greek letters")
    page.get_by_test_id("chat-rename-input").press("Enter")
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["Beta", "Greek letters"])
    reload(page)
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["Beta", "Greek letters"])
    # A renamed chat keeps its name when it goes on.
    page.get_by_test_id("chat-item-title").filter(has_text="Greek letters").click()
    send(page, "Gamma", 2)
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["Greek letters", "Beta"])

    # Deleting asks first; No keeps it.
    page.once("dialog", lambda d: d.dismiss())
    page.get_by_test_id("chat-item").filter(has_text="Beta").get_by_test_id("chat-delete").click(force=True)
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["Greek letters", "Beta"])
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("chat-item").filter(has_text="Beta").get_by_test_id("chat-delete").click(force=True)
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["Greek letters"])
    # Deleting the chat shown shows another (or a new one).
    page.once("dialog", lambda d: d.accept())
    page.get_by_test_id("chat-item").filter(has_text="Greek letters").get_by_test_id("chat-delete").click()
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["New chat"])
    reload(page)
    expect(page.locator(".msg")).to_have_count(0)
    assert page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('gptj-studio:chat:')).length") == 0


def test_export_import_round_trip_in_the_cli_format(page, tmp_path: Path) -> None:
    """Export writes exactly what `gptj chat`'s /save writes, /load reads it; a file from /save
    imports, and exports again byte for byte."""
    from gptj.cli.chat import load_conversation, save_conversation

    tricky = 'Quotes " and \\ backslash, ünïcødé 🦜,\nnew line, <b>tags</b>'
    FakeChat(page, lambda body, n: tricky if n == 1 else "Second reply")
    page.click("#tab-chat")
    page.fill("#chat-system", "Be kind.")
    send(page, "Hello there", 1)
    send(page, "More?", 2)
    item = page.locator("[data-testid=chat-item][aria-current=true]")
    with page.expect_download() as dl:
        item.get_by_test_id("chat-export").click()
    assert dl.value.suggested_filename == "Hello there.json"
    exported = tmp_path / dl.value.suggested_filename
    dl.value.save_as(exported)
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": tricky},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Second reply"}]
    by_cli = tmp_path / "by-cli.json"
    save_conversation(by_cli, {"system": "Be kind.", "messages": messages})
    assert exported.read_bytes() == by_cli.read_bytes()
    assert load_conversation(exported) == ("Be kind.", messages)

    # A conversation saved by the CLI (no system prompt) imports as a new chat named after its file.
    saved = tmp_path / "From the terminal.json"
    cli_messages = [{"role": "user", "content": "Hi from gptj chat"}, {"role": "assistant", "content": "Hello, **terminal**!"},
                    {"role": "user", "content": "Bye"}]
    save_conversation(saved, {"system": None, "messages": cli_messages})
    page.set_input_files("#chat-import-file", str(saved))
    expect(page.get_by_test_id("chat-item-title")).to_have_text(["From the terminal", "Hello there"])
    expect(page.locator(".msg")).to_have_count(3)
    assert bodies(page) == ["Hi from gptj chat", "Hello, terminal!", "Bye"]  # shown as Markdown
    assert page.input_value("#chat-system") == ""
    with page.expect_download() as dl:
        page.locator("[data-testid=chat-item][aria-current=true]").get_by_test_id("chat-export").click()
    again = tmp_path / "again.json"
    dl.value.save_as(again)
    assert again.read_bytes() == saved.read_bytes()
    reload(page)
    expect(page.locator(".msg")).to_have_count(3)

    # A file that is not a conversation says why, as /load does, and changes nothing.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"system": None, "messages": [{"role": "robot", "content": "x"}]}))
    page.set_input_files("#chat-import-file", str(bad))
    expect(page.get_by_test_id("error-message")).to_contain_text("messages[0].role: must be one of system, user, assistant")
    expect(page.get_by_test_id("chat-item")).to_have_count(2)


# ---- edit, retry (branches), continue -----------------------------------------------------------


def test_edit_a_message_and_regenerate_from_there(page) -> None:
    fake = FakeChat(page)
    page.click("#tab-chat")
    send(page, "Tell me about cats", 1)
    send(page, "And their food?", 2)

    first = page.get_by_test_id("msg-user").first
    first.hover()
    first.get_by_test_id("msg-edit").click()
    page.get_by_test_id("msg-edit-input").fill("Tell me about dogs")
    page.get_by_test_id("msg-edit-save").click()
    expect(page.get_by_test_id("msg-assistant")).to_have_count(1)
    expect(page.locator("#chat-send")).to_be_enabled()
    assert bodies(page) == ["Tell me about dogs", "Reply 3 to: Tell me about dogs"]
    # The model got the conversation up to the edited message, not what followed the old one.
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "Tell me about dogs"}]
    # The old version stays, with its whole continuation.
    expect(page.get_by_test_id("msg-user").first.get_by_test_id("msg-branch")).to_have_text("2/2")
    page.get_by_test_id("msg-user").first.get_by_test_id("msg-prev").click()
    expect(page.get_by_test_id("msg-user").first.get_by_test_id("msg-branch")).to_have_text("1/2")
    assert bodies(page) == ["Tell me about cats", "Reply 1 to: Tell me about cats", "And their food?", "Reply 2 to: And their food?"]

    # An edited reply is a new version of the reply (no request); Escape cancels an edit.
    n = len(fake.requests)
    last = page.get_by_test_id("msg-assistant").last
    last.get_by_test_id("msg-edit").click()
    page.get_by_test_id("msg-edit-input").press("Escape")
    expect(page.get_by_test_id("msg-edit-input")).to_have_count(0)
    last.get_by_test_id("msg-edit").click()
    page.get_by_test_id("msg-edit-input").fill("Kibble, mostly.")
    page.get_by_test_id("msg-edit-input").press("Enter")
    expect(page.get_by_test_id("msg-assistant").last.locator(".msg-body")).to_have_text("Kibble, mostly.")
    expect(page.get_by_test_id("msg-assistant").last.get_by_test_id("msg-branch")).to_have_text("2/2")
    expect(page.get_by_test_id("msg-assistant").last.get_by_test_id("msg-meta")).to_have_text("edited")
    assert len(fake.requests) == n
    # The next turn builds on the edited reply.
    send(page, "Thanks", 3)
    assert fake.requests[-1]["messages"][-2] == {"role": "assistant", "content": "Kibble, mostly."}
    reload(page)
    assert bodies(page)[:4] == ["Tell me about cats", "Reply 1 to: Tell me about cats", "And their food?", "Kibble, mostly."]


def test_retry_keeps_the_alternatives(page) -> None:
    FakeChat(page)
    page.click("#tab-chat")
    send(page, "Pick a number", 1)
    reply = page.get_by_test_id("msg-assistant")
    page.click("#chat-retry")
    expect(reply.get_by_test_id("msg-branch")).to_have_text("2/2")
    expect(page.locator("#chat-send")).to_be_enabled()
    reply.get_by_test_id("msg-retry").click()  # the reply's own Retry does the same
    expect(reply.get_by_test_id("msg-branch")).to_have_text("3/3")
    expect(reply.locator(".msg-body")).to_have_text("Reply 3 to: Pick a number")
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(reply).to_have_count(1)  # alternatives, not more messages

    reply.get_by_test_id("msg-prev").click()
    expect(reply.get_by_test_id("msg-branch")).to_have_text("2/3")
    expect(reply.locator(".msg-body")).to_have_text("Reply 2 to: Pick a number")
    reply.get_by_test_id("msg-prev").click()
    reply.get_by_test_id("msg-prev").click()  # wraps round
    expect(reply.get_by_test_id("msg-branch")).to_have_text("3/3")
    reply.get_by_test_id("msg-next").click()
    expect(reply.get_by_test_id("msg-branch")).to_have_text("1/3")
    expect(reply.locator(".msg-body")).to_have_text("Reply 1 to: Pick a number")
    reload(page)  # the alternatives and the one chosen are kept
    expect(page.get_by_test_id("msg-assistant").get_by_test_id("msg-branch")).to_have_text("1/3")
    expect(page.get_by_test_id("msg-assistant").locator(".msg-body")).to_have_text("Reply 1 to: Pick a number")


def test_continue_a_reply_that_stopped(page) -> None:
    # the server continues the reply itself, so what comes back goes on from it as it is (" was")
    fake = FakeChat(page, lambda body, n: ("Once upon a time there", "length") if n == 1 else " was a fox.")
    page.click("#tab-chat")
    send(page, "A story please", 1)
    reply = page.get_by_test_id("msg-assistant")
    expect(reply.get_by_test_id("msg-meta")).to_contain_text("cut off at max new tokens")
    reply.get_by_test_id("msg-continue").click()
    expect(reply.locator(".msg-body")).to_have_text("Once upon a time there was a fox.")
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(reply.get_by_test_id("msg-meta")).to_have_count(0)
    expect(reply).to_have_count(1)
    # The model got the reply so far as the last message, left open (vLLM's continue_final_message).
    assert fake.requests[-1]["messages"][-1] == {"role": "assistant", "content": "Once upon a time there"}
    assert fake.requests[-1]["continue_final_message"] is True and fake.requests[-1]["add_generation_prompt"] is False
    assert "continue_final_message" not in fake.requests[0]
    assert page.is_enabled("#chat-continue")


# ---- Markdown --------------------------------------------------------------------------------------


def test_markdown_replies_without_html_from_the_model(page) -> None:
    evil = ('Here is **bold** and <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
            'and [a link](javascript:window.__pwned=3) and [docs](https://example.org/docs).\n\n'
            '```python\nprint("hi <b>")\n```\n')
    FakeChat(page, lambda body, n: evil)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#tab-chat")
    send(page, "Say something **bold**", 1)
    body = page.get_by_test_id("msg-assistant").locator(".msg-body")
    expect(body.locator("strong")).to_have_text("bold")
    assert body.locator("img, script, iframe, [onerror]").count() == 0
    assert '<img src=x onerror="window.__pwned=1">' in body.inner_text()
    assert "<script>window.__pwned=2</script>" in body.inner_text()
    hrefs = body.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    assert hrefs == ["https://example.org/docs"]
    assert body.locator("a").get_attribute("rel") == "noopener noreferrer nofollow"
    assert page.evaluate("window.__pwned") is None
    # The user's own message stays plain text.
    expect(page.get_by_test_id("msg-user").locator(".msg-body")).to_have_text("Say something **bold**")

    # A code block, with a copy button that copies the code.
    block = body.get_by_test_id("code-block")
    expect(block).to_have_count(1)
    expect(block.locator(".code-lang")).to_have_text("python")
    expect(block.locator("pre")).to_have_text('print("hi <b>")\n')
    block.get_by_test_id("copy-code").click()
    expect(block.get_by_test_id("copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == 'print("hi <b>")\n'

    # Raw: exactly what the model wrote, as text.
    page.uncheck("#chat-markdown")
    expect(body.locator("strong")).to_have_count(0)
    assert body.inner_text() == evil
    reload(page)  # the choice is remembered
    expect(page.get_by_test_id("msg-assistant").locator(".msg-body")).to_have_text(evil)
    page.check("#chat-markdown")
    expect(page.get_by_test_id("msg-assistant").locator(".msg-body strong")).to_have_text("bold")
    assert page.evaluate("window.__pwned") is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-markdown.png"))


# ---- the next-token view ------------------------------------------------------------------------


def test_next_token_view_shows_the_models_probabilities(page, server: str) -> None:
    prompt = "The capital of France is"
    want = _post(server + "v1/completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 20, "temperature": 0})
    top = sorted(want["choices"][0]["logprobs"]["top_logprobs"][0].items(), key=lambda kv: -kv[1])
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/completions") else None)
    page.fill("#prompt", prompt)
    page.check("#next-toggle")
    panel = page.get_by_test_id("next-panel")
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("data-state", "ready", timeout=60_000)
    rows = page.get_by_test_id("next-row")
    expect(rows).to_have_count(len(top))
    assert len(top) == 20  # the server's limit for logprobs
    # Nothing was generated: one token asked for, only to read its alternatives.
    assert page.input_value("#prompt") == prompt
    assert sent[-1]["max_tokens"] == 1 and sent[-1]["logprobs"] == 20 and sent[-1]["prompt"] == prompt
    shown = rows.evaluate_all("rs => rs.map(r => r.dataset.token)")
    assert shown[0] == top[0][0] and set(shown) == {t for t, _ in top}
    pcts = [float(p.rstrip("%").lstrip("<")) for p in page.get_by_test_id("next-prob").all_inner_texts()]
    assert pcts == sorted(pcts, reverse=True) and 0 < pcts[0] <= 100
    first_pct = 100 * 2.718281828459045 ** top[0][1]
    assert pcts[0] == pytest.approx(first_pct, abs=0.1)

    # Clicking a token adds it to the text, and the view follows the new text.
    token = top[0][0]
    with page.expect_request(lambda r: r.url.endswith("/v1/completions") and (r.post_data_json or {}).get("prompt") == prompt + token):
        rows.first.click()
    assert page.input_value("#prompt") == prompt + token
    expect(panel).to_have_attribute("data-state", "ready", timeout=60_000)
    assert page.is_enabled("#undo-btn")  # Undo takes the token back
    page.click("#undo-btn")
    assert page.input_value("#prompt") == prompt
    # The panel is remembered across a reload.
    reload(page)
    expect(page.get_by_test_id("next-panel")).to_be_visible()
    expect(page.get_by_test_id("next-row")).to_have_count(20, timeout=60_000)


# ---- settings, View code ----------------------------------------------------------------------------


def test_advanced_settings_reach_the_request(page) -> None:
    sent: list[dict] = []

    def completions(route) -> None:  # noqa: ANN001
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, body=completion_stream(" done."), content_type="text/event-stream")

    page.route("**/v1/completions", completions)
    fake = FakeChat(page)
    page.fill("#prompt", "Hello")
    page.click("#generate-btn")
    wait_idle(page)
    # At their neutral values the advanced settings are not sent.
    assert not {"min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"} & set(sent[-1])
    expect(page.locator("#set-min_p")).to_be_hidden()  # folded away
    page.click("#advanced summary")
    set_setting(page, "min_p", "0.05")
    set_setting(page, "presence_penalty", "0.5")
    set_setting(page, "frequency_penalty", "-0.25")
    set_setting(page, "repetition_penalty", "1.2")
    expect(page.get_by_test_id("advanced-count")).to_have_text("· 4 on")
    page.click("#generate-btn")
    wait_idle(page)
    body = sent[-1]
    assert (body["min_p"], body["presence_penalty"], body["frequency_penalty"], body["repetition_penalty"]) == (0.05, 0.5, -0.25, 1.2)
    assert body["prompt"].startswith("Hello") and body["stream"] is True
    # The chat sends them too.
    page.click("#tab-chat")
    send(page, "Hi", 1)
    chat = fake.requests[-1]
    assert (chat["min_p"], chat["presence_penalty"], chat["frequency_penalty"], chat["repetition_penalty"]) == (0.05, 0.5, -0.25, 1.2)
    # They are remembered, and Reset puts them back.
    reload(page)
    assert page.input_value("#set-presence_penalty") == "0.5"
    page.click("#settings-reset")
    expect(page.get_by_test_id("advanced-count")).to_have_text("")


def test_token_healing_checkbox_reaches_the_request(page) -> None:
    """On by default (not sent: the server heals by default); off, a request says
    token_healing: false, the fold counts it, View code's CLI has --no-token-healing, a reload
    remembers it and Reset turns it back on."""
    from gptj.cli.main import build_parser

    sent: list[dict] = []

    def completions(route) -> None:  # noqa: ANN001
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, body=completion_stream(" done."), content_type="text/event-stream")

    page.route("**/v1/completions", completions)
    page.fill("#prompt", "def f(n):\n")
    page.click("#generate-btn")
    wait_idle(page)
    assert "token_healing" not in sent[-1]
    page.click("#advanced summary")
    box = page.get_by_test_id("setting-token_healing")
    expect(box).to_be_checked()
    box.uncheck()
    expect(page.get_by_test_id("advanced-count")).to_have_text("· 1 on")
    page.click("#generate-btn")
    wait_idle(page)
    assert sent[-1]["token_healing"] is False
    page.click("#view-code")
    page.get_by_text("gptj CLI", exact=True).click()
    cli = page.get_by_test_id("code-text").inner_text()
    assert "--no-token-healing" in cli
    assert build_parser().parse_args(["generate", *_bash_args(cli, "gptj")[1:]]).token_healing is False
    page.keyboard.press("Escape")
    reload(page)
    expect(page.get_by_test_id("setting-token_healing")).not_to_be_checked()
    page.click("#settings-reset")
    expect(page.get_by_test_id("setting-token_healing")).to_be_checked()
    expect(page.get_by_test_id("advanced-count")).to_have_text("")


def _bash_args(script: str, command: str) -> list[str]:
    """The arguments bash would pass to `command` in `script` (it runs as a function that
    prints them): checks the quoting as a shell reads it."""
    prog = f"{command}() {{ printf '%s\\0' \"$@\"; }}\n{script}\n"
    out = subprocess.run(["bash", "-c", prog], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def test_view_code_for_the_current_prompt_and_settings(page, info: dict) -> None:
    from gptj.cli.main import build_parser

    prompt = "Q: What's \"2 + 2\"?\n\tA: $HOME `ls` \\ 🦜\n"
    page.fill("#prompt", prompt)
    set_setting(page, "temperature", "0.3")
    set_setting(page, "max_new_tokens", "42")
    page.click("#advanced summary")
    set_setting(page, "min_p", "0.05")
    set_setting(page, "presence_penalty", "0.5")
    page.fill("#stop-input", "\\n\\n, END")
    page.fill("#seed-input", "7")
    page.click("#view-code")
    dialog = page.get_by_test_id("code-dialog")
    expect(dialog).to_be_visible()
    code = page.get_by_test_id("code-text")

    # curl: the body is the request the page would send (bash reads the quoting).
    args = _bash_args(code.inner_text(), "curl")
    assert args[0].endswith("/v1/completions")
    body = json.loads(args[args.index("-d") + 1])
    assert body == {"model": info["name"], "prompt": prompt, "max_tokens": 42, "temperature": 0.3, "top_p": pytest.approx(body["top_p"]),
                    "top_k": body["top_k"], "min_p": 0.05, "presence_penalty": 0.5, "stop": ["\n\n", "END"], "seed": 7}

    # Python with the openai client: valid Python, the same prompt and settings.
    page.get_by_text("Python (openai)", exact=True).click()
    expect(code).to_contain_text("from openai import OpenAI")
    tree = ast.parse(code.inner_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "create")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kwargs["prompt"] == prompt and kwargs["max_tokens"] == 42 and kwargs["stop"] == ["\n\n", "END"] and kwargs["seed"] == 7
    assert kwargs["presence_penalty"] == 0.5 and kwargs["extra_body"]["min_p"] == 0.05

    # gptj generate: flags that the CLI's own parser takes, the same prompt and stops.
    page.get_by_text("gptj CLI", exact=True).click()
    expect(code).to_contain_text("gptj generate")
    cli = code.inner_text()
    assert "presence_penalty" in cli.splitlines()[0]  # a comment: the CLI has no flag for it
    args = build_parser().parse_args(["generate", *_bash_args(cli, "gptj")[1:]])
    assert (args.prompt, args.temperature, args.max_new_tokens, args.min_p, args.stop, args.seed) == (prompt, 0.3, 42, 0.05, ["\n\n", "END"], 7)

    # Copy puts the snippet on the clipboard.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_test_id("code-copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == cli
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # In the chat tab: the conversation, as a chat request.
    FakeChat(page)
    page.click("#tab-chat")
    send(page, "Hello?", 1)
    page.fill("#chat-input", "Next question")
    page.click("#view-code")
    page.get_by_text("curl", exact=True).click()
    body = json.loads(_bash_args(code.inner_text(), "curl")[-1])
    assert body["messages"] == [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Reply 1 to: Hello?"},
                                {"role": "user", "content": "Next question"}]
    assert "stop" not in body
    page.get_by_text("gptj CLI", exact=True).click()
    args = build_parser().parse_args(["chat", *_bash_args(code.inner_text(), "gptj")[1:]])
    assert args.temperature == 0.3 and args.min_p == 0.05


# ---- the small things --------------------------------------------------------------------------------


def test_connection_dot_goes_red_when_the_server_is_unreachable(page) -> None:
    conn = page.get_by_test_id("conn")
    expect(conn).to_have_class("conn ok")
    page.route("**/*", lambda route: route.abort())
    page.fill("#prompt", "Hello")
    page.click("#generate-btn")
    expect(page.get_by_test_id("error-message")).to_contain_text("Cannot reach the server")
    expect(conn).to_have_class("conn bad")
    assert "Cannot reach the server" in conn.get_attribute("title")
    # Back again: the page asks /health while the dot is red, and clears the banner.
    page.unroute("**/*")
    expect(conn).to_have_class("conn ok", timeout=30_000)
    expect(page.get_by_test_id("error-banner")).to_be_hidden()


def test_status_stays_on_one_line_apart_from_the_token_count(page) -> None:
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, body=completion_stream(" and more.", finish="length"), content_type="text/event-stream"))
    page.fill("#prompt", "Some text")
    page.click("#generate-btn")
    wait_idle(page)
    status = page.get_by_test_id("gen-status")
    expect(status).to_contain_text("max tokens reached: 5 new tokens")
    count = page.get_by_test_id("token-count-box")
    expect(count).to_contain_text("Context")
    # The status and the count are apart: neither runs into the other.
    s, c = status.bounding_box(), count.bounding_box()
    assert s["x"] + s["width"] <= c["x"]
    # However long the status, it stays one line beside the buttons (cut with an ellipsis).
    long = "max tokens reached: 123,456 new tokens · 12.3 tok/s · " + "and a very long tail " * 20
    page.evaluate("(t) => gptjStudio.playground.setStatus(t)", long)
    s, g = status.bounding_box(), page.locator("#generate-btn").bounding_box()
    line = page.evaluate("parseFloat(getComputedStyle(document.querySelector('#gen-status')).lineHeight)")
    assert s["height"] <= line * 1.5
    assert abs((s["y"] + s["height"] / 2) - (g["y"] + g["height"] / 2)) < 4  # on the buttons' row
    assert status.get_attribute("title") == long
    assert page.evaluate("(e => e.scrollWidth > e.clientWidth)(document.querySelector('#gen-status'))")


def test_code_preset_switches_on_monospace(page) -> None:
    assert not page.is_checked("#mono")
    page.select_option("#preset-select", "code")
    assert page.is_checked("#mono")
    expect(page.locator("#editor-box")).to_have_class("editor-box mono")
    page.select_option("#preset-select", "story")  # it was the preset's doing: off again
    assert not page.is_checked("#mono")
    page.check("#mono")  # the user's own choice stays
    page.select_option("#preset-select", "code")
    page.select_option("#preset-select", "knowledge")
    assert page.is_checked("#mono")


def test_new_views_run_under_the_csp(browser, server: str) -> None:
    """Markdown with a code block, the chat list, View code and the next-token view under the
    page's own Content-Security-Policy: no violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    refused: list[str] = []
    pg.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    pg.on("pageerror", lambda e: refused.append(str(e)))
    pg.goto(server)
    expect(pg.locator("#preset-select option")).not_to_have_count(1)
    FakeChat(pg, lambda body, n: "# Title\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n\n![img](https://example.org/x.png) "
                                  "<img src=x onerror=alert(1)>\n\n```js\nconsole.log(1)\n```")
    pg.click("#tab-chat")
    send(pg, "Show me", 1)
    expect(pg.get_by_test_id("copy-code")).to_have_count(1)
    expect(pg.get_by_test_id("msg-assistant").locator("table td.align-right")).to_have_text("2")
    pg.click("#view-code")
    expect(pg.get_by_test_id("code-text")).to_contain_text("/v1/chat/completions")
    pg.keyboard.press("Escape")
    pg.click("#tab-playground")
    pg.fill("#prompt", "Once upon a")
    pg.check("#next-toggle")
    expect(pg.get_by_test_id("next-row")).to_have_count(20, timeout=60_000)
    pg.screenshot(path=str(ARTIFACTS / "next-token.png"))
    context.close()
    assert not refused, refused
