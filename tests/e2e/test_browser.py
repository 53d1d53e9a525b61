"""The playground page in a real headless Chromium, against a real `gptj serve` on the bundled
model: model info, presets, streaming into the editor, stop, undo/regenerate, the probability
view, the token viewer and the chat. Screenshots go to artifacts/."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


# ---- fixtures ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """`gptj serve` on the bundled model on a free loopback port; yields its base URL."""
    port = _free_port()
    tmp = tmp_path_factory.mktemp("serve")
    exe = Path(sys.executable).with_name("gptj")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from gptj.cli import main; sys.exit(main())"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "GPTJ_CONFIG_DIR": str(tmp / "config")}  # no user presets
    env.pop("GPTJ_API_KEY", None)
    log = open(tmp / "serve.log", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"gptj serve exited with {proc.returncode}:\n{log.read().decode(errors='replace')[-3000:]}")
            try:
                _get(base + "health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("gptj serve did not answer /health within 120 s")
                time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def info(server: str) -> dict:
    return _get(server + "api/info")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server: str):
    """A fresh page (own storage) on the playground, with the presets loaded."""
    # bypass_csp: the tests' own wait_for_function predicates are evaluated strings, which the
    # page's Content-Security-Policy forbids; test_page_runs_under_its_csp runs without it.
    context = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server)
    pg.wait_for_function("document.querySelector('#preset-select').options.length > 1")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_setting(pg, name: str, value: str) -> None:
    pg.fill(f"#set-{name}", value)
    pg.dispatch_event(f"#set-{name}", "change")


def wait_idle(pg, timeout: float = 60_000) -> None:
    pg.wait_for_function("!document.querySelector('#generate-btn').disabled", timeout=timeout)


def format_params(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{round(n / 1e6)}M"


# ---- tests -------------------------------------------------------------------------------------


def test_page_runs_under_its_csp(browser, server: str) -> None:
    """The page works under its own Content-Security-Policy: it loads, fills the presets and
    streams a generation, and the browser reports no violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    refused: list[str] = []
    pg.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    pg.on("pageerror", lambda e: refused.append(str(e)))
    response = pg.goto(server)
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    sync_api.expect(pg.locator("#preset-select option")).not_to_have_count(0)
    set_setting(pg, "max_new_tokens", "4")
    pg.fill("#prompt", "Once upon a time")
    pg.click("#generate-btn")
    sync_api.expect(pg.locator("#generate-btn")).to_be_enabled(timeout=120_000)
    assert pg.input_value("#prompt") != "Once upon a time"
    context.close()
    assert not refused, refused


def test_header_shows_model_info(page, info: dict) -> None:
    sync_api.expect(page.get_by_test_id("model-name")).to_have_text(info["name"])
    sync_api.expect(page.get_by_test_id("info-architecture")).to_have_text(info["architecture"])
    sync_api.expect(page.get_by_test_id("info-parameters")).to_have_text(f"{format_params(info['parameters'])} params")
    sync_api.expect(page.get_by_test_id("info-context")).to_have_text(f"{info['context_length']:,} ctx")
    sync_api.expect(page.get_by_test_id("info-quantization")).to_have_text(info["quantization"])
    # The sliders start from the server's defaults.
    d = info["defaults"]
    assert float(page.input_value("#set-temperature")) == pytest.approx(d["temperature"])
    assert int(page.input_value("#set-max_new_tokens")) == d["max_new_tokens"]


def test_preset_fills_prompt_and_settings(page, server: str) -> None:
    presets = {p["name"]: p for p in _get(server + "api/presets")["presets"]}
    assert {"code", "chat", "story", "translation", "knowledge"} <= set(presets)

    tr = presets["translation"]
    page.select_option("#preset-select", "translation")
    assert page.input_value("#prompt") == tr["template"].replace("{input}", tr["example"])
    assert float(page.input_value("#set-temperature")) == tr["settings"]["temperature"]
    assert int(page.input_value("#set-max_new_tokens")) == tr["settings"]["max_new_tokens"]
    assert page.input_value("#stop-input") == "\\n"
    sync_api.expect(page.locator("#stop-chips .chip")).to_have_count(1)

    code = presets["code"]
    page.select_option("#preset-select", "code")
    assert page.input_value("#prompt") == code["template"].replace("{input}", code["example"])
    assert float(page.input_value("#set-top_p")) == code["settings"]["top_p"]
    # The stop field round-trips: what the page would send equals the preset's stops.
    assert page.evaluate("gptjStudio.settings.stops") == code["stop"]
    assert page.is_enabled("#undo-btn")  # the text before the preset can be restored

    chat = presets["chat"]
    page.select_option("#preset-select", "chat")
    sync_api.expect(page.locator("#panel-chat")).to_be_visible()
    assert page.input_value("#chat-system") == chat["intro"]


def test_generate_streams_marks_and_probabilities(page, server: str) -> None:
    prompt = "The old lighthouse keeper climbed the stairs and"
    page.fill("#prompt", prompt)
    set_setting(page, "max_new_tokens", "16")
    set_setting(page, "temperature", "0.8")
    page.fill("#seed-input", "7")
    # Record the editor's length each time streamed text lands in it.
    page.evaluate("""() => { window.__lens = [];
        window.__observer = new MutationObserver(() => window.__lens.push(document.querySelector('#prompt').value.length));
        window.__observer.observe(document.querySelector('#editor-backdrop'), {childList: true}); }""")
    page.press("#prompt", "Control+Enter")
    sync_api.expect(page.locator("#stop-btn")).to_be_enabled()
    assert page.is_disabled("#generate-btn")
    wait_idle(page)
    lens = page.evaluate("() => { window.__observer.disconnect(); return window.__lens; }")
    text = page.input_value("#prompt")
    assert text.startswith(prompt) and len(text) > len(prompt)
    partial = {n for n in lens if len(prompt) < n < len(text)}
    assert partial, f"the text did not grow in steps: {sorted(set(lens))}"
    # The generated part is marked, token by token, and is exactly the appended text.
    generated = page.eval_on_selector_all("#editor-backdrop .gen", "els => els.map(e => e.textContent).join('')")
    assert generated == text[len(prompt):]
    assert page.locator("#editor-backdrop .tok").count() >= 2
    assert page.is_disabled("#stop-btn") and page.is_enabled("#undo-btn") and page.is_enabled("#regenerate-btn")
    assert "tokens" in page.inner_text("#gen-status")
    # The live token count follows the editor's text.
    count = _post(server + "tokenize", {"text": text})["count"]
    sync_api.expect(page.get_by_test_id("token-count")).to_have_text(f"{count:,}")

    # Probability view: click a generated token (through the transparent textarea, which
    # lies exactly over the highlights: the caret lands inside the clicked token).
    tok = page.locator("#editor-backdrop .tok").nth(1)
    x, y, start, end = tok.evaluate(
        """span => { const r = span.getClientRects()[0]; let off = 0;
            for (const n of span.parentNode.childNodes) { if (n === span) break; off += n.textContent.length; }
            return [r.left + r.width / 2, r.top + r.height / 2, off, off + span.textContent.length]; }"""
    )
    page.mouse.click(x, y)
    assert start <= page.evaluate("document.querySelector('#prompt').selectionStart") <= end
    popover = page.get_by_test_id("prob-popover")
    sync_api.expect(popover).to_be_visible()
    assert json.loads(popover.locator(".pp-head .tokchip").first.get_attribute("title")) == tok.text_content()
    rows = popover.get_by_test_id("prob-row")
    assert rows.count() >= 2
    assert "%" in rows.first.inner_text()
    widths = page.eval_on_selector_all("#prob-popover .fill", "els => els.map(e => parseFloat(e.style.width))")
    assert all(0 < w <= 100 for w in widths)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    page.keyboard.press("Escape")
    sync_api.expect(popover).to_be_hidden()

    # Regenerate with the same seed gives the same text.
    page.click("#regenerate-btn")
    wait_idle(page)
    assert page.input_value("#prompt") == text

    # Phone width: the controls go under the editor.
    page.set_viewport_size({"width": 375, "height": 812})
    editor, settings = page.locator("#editor-scroll").bounding_box(), page.locator("#settings").bounding_box()
    assert settings["y"] >= editor["y"] + editor["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(ARTIFACTS / "playground-mobile.png"), full_page=True)

    # Undo restores the text from before the generation.
    page.click("#undo-btn")
    assert page.input_value("#prompt") == prompt
    assert page.locator("#editor-backdrop .gen").count() == 0
    assert page.is_disabled("#undo-btn")


def test_stop_ends_generation_early(page) -> None:
    page.fill("#prompt", "Chapter 1\n\nIt was a cold morning in the village when")
    set_setting(page, "max_new_tokens", "2000")
    set_setting(page, "temperature", "1")
    for how in ("escape", "button"):
        for _ in range(3):  # a sampled run may end by itself (end of text) before it can be stopped: again
            before = page.locator("#editor-backdrop .tok").count()
            page.click("#generate-btn")
            page.wait_for_function(f"document.querySelectorAll('#editor-backdrop .tok').length >= {before + 3}"
                                   " || !document.querySelector('#generate-btn').disabled", timeout=120_000)
            if page.is_disabled("#generate-btn"):
                break
        if how == "escape":
            page.keyboard.press("Escape")
        else:
            page.click("#stop-btn")
        wait_idle(page, timeout=10_000)
        assert page.get_attribute("#gen-status", "data-finish") == "stopped"
        assert page.locator("#editor-backdrop .tok").count() < 300
        assert page.is_disabled("#stop-btn") and page.is_enabled("#generate-btn")
        assert page.get_attribute("#prompt", "readonly") is None
    # The text stays editable and the server still answers.
    page.click("#prompt")
    page.keyboard.press("End")
    page.keyboard.type("!")
    assert page.input_value("#prompt").endswith("!")


def test_server_error_is_shown(page) -> None:
    page.fill("#prompt", "Hello")
    page.fill("#stop-input", ",".join(f"s{i}" for i in range(17)))  # the server allows 16
    page.click("#generate-btn")
    banner = page.get_by_test_id("error-banner")
    sync_api.expect(banner).to_be_visible()
    assert "16" in page.inner_text("#error-message")
    assert page.input_value("#prompt") == "Hello"
    assert page.is_disabled("#undo-btn")  # nothing was generated, nothing to undo
    page.click("#error-close")
    sync_api.expect(banner).to_be_hidden()


def test_token_viewer_counts_like_the_server(page, server: str) -> None:
    text = "Hello world! naïve café — a 🦜 parrot\n\tsaid: tokens, tokens."
    page.click("#tab-tokens")
    page.fill("#tokens-input", text)
    want = _post(server + "tokenize", {"text": text})
    sync_api.expect(page.get_by_test_id("tokens-count")).to_have_text(str(want["count"]))
    sync_api.expect(page.get_by_test_id("token-piece")).to_have_count(want["count"])
    assert page.inner_text("#chars-count") == str(len(text))
    ids = page.eval_on_selector_all("[data-testid=token-piece]", "els => els.map(e => +e.dataset.id)")
    assert ids == want["tokens"]
    n_bytes = sum(p["text"] is None for p in want["pieces"])
    assert n_bytes > 0
    assert page.locator(".piece.bytes").count() == n_bytes
    assert page.locator(".piece.bytes").first.inner_text().startswith("<")

    gptj = _post(server + "tokenize", {"text": text, "tokenizer": "gpt-j"})
    page.get_by_text("GPT-J (GPT-2 BPE)", exact=True).click()
    sync_api.expect(page.get_by_test_id("tokens-count")).to_have_text(str(gptj["count"]))
    # the two tokenizers may give the same count: wait for GPT-J's own first id, not just the count
    sync_api.expect(page.get_by_test_id("token-piece").first).to_have_attribute("data-id", str(gptj["tokens"][0]))
    ids = page.eval_on_selector_all("[data-testid=token-piece]", "els => els.map(e => +e.dataset.id)")
    assert ids == gptj["tokens"]
    page.get_by_text("Token IDs", exact=True).click()
    assert json.loads(page.inner_text("[data-testid=token-ids]")) == gptj["tokens"]


def test_chat_reply_streams(page) -> None:
    page.click("#tab-chat")
    set_setting(page, "max_new_tokens", "12")
    page.fill("#chat-input", "Hello! Who are you?")
    page.press("#chat-input", "Enter")
    sync_api.expect(page.locator("[data-testid=msg-user] .msg-body")).to_have_text("Hello! Who are you?")
    sync_api.expect(page.locator("#chat-stop")).to_be_enabled()
    page.wait_for_function("!document.querySelector('#chat-send').disabled", timeout=60_000)
    reply = page.locator("[data-testid=msg-assistant] .msg-body")
    sync_api.expect(reply).to_have_count(1)
    assert reply.inner_text().strip()
    assert page.input_value("#chat-input") == ""
    page.click("#chat-reset")
    sync_api.expect(page.locator(".msg")).to_have_count(0)


def test_chat_dropped_messages_note(page) -> None:
    """The note about messages left out, with the server's stream stubbed by the browser."""

    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    body = (
        event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
               "gptj": {"dropped_messages": 3}})
        + event({"choices": [{"index": 0, "delta": {"content": "Still "}, "finish_reason": None}]})
        + event({"choices": [{"index": 0, "delta": {"content": "here."}, "finish_reason": None}]})
        + event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + "data: [DONE]\n\n"
    )
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=body, content_type="text/event-stream"))
    page.click("#tab-chat")
    page.fill("#chat-input", "Do you remember?")
    page.click("#chat-send")
    sync_api.expect(page.get_by_test_id("chat-note")).to_have_text("3 earlier messages were left out to fit the context window")
    sync_api.expect(page.locator("[data-testid=msg-assistant] .msg-body")).to_have_text("Still here.")
    # Retry replaces the last reply (and its note) instead of adding one.
    page.click("#chat-retry")
    sync_api.expect(page.locator("#chat-send")).to_be_enabled()
    sync_api.expect(page.locator("[data-testid=msg-assistant]")).to_have_count(1)
    sync_api.expect(page.get_by_test_id("chat-note")).to_have_count(1)

    error = {"error": {"message": "messages: the conversation is too long", "type": "invalid_request_error", "param": "messages"}}
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=400, body=json.dumps(error), content_type="application/json"))
    page.fill("#chat-input", "Again?")
    page.press("#chat-input", "Enter")
    sync_api.expect(page.get_by_test_id("error-message")).to_have_text("messages: the conversation is too long")
    sync_api.expect(page.locator("[data-testid=msg-assistant]")).to_have_count(1)


def test_stop_field_and_token_marks_helpers(page) -> None:
    """The page's pure helpers: the stop-sequence field's escapes, and how streamed tokens are
    laid over the streamed text (a character split over tokens shares one mark)."""
    stops = ["\n\n", "\n# ", " END", "a,b", "back\\slash", "\t"]
    got = page.evaluate(
        """async (stops) => {
            const u = await import('./static/util.js');
            return [u.parseStops(u.formatStops(stops)), u.parseStops('foo, bar\\nbaz,, \\\\n,\\\\sx')];
        }""",
        stops,
    )
    assert got[0] == stops
    assert got[1] == ["foo", "bar", "baz", "\n", " x"]
    marks = page.evaluate(
        """async () => {
            const {splitIntoMarks} = await import('./static/editor.js');
            const t = (text) => ({text, id: 1, logprob: -1, top: []});
            return [
                splitIntoMarks(' the cat', 10, [t(' the'), t(' cat')]),
                splitIntoMarks(' 🦜', 0, [t(' \\ufffd'), t('\\ufffd')]),
                splitIntoMarks('ab', 0, null),
            ].map(ms => ms.map(m => [m.start, m.end, m.toks ? m.toks.length : null]));
        }"""
    )
    assert marks == [[[10, 14, 1], [14, 18, 1]], [[0, 3, 2]], [[0, 2, None]]]


def test_json_toggle_gets_json_back(page) -> None:
    """Advanced › JSON output: the continuation is JSON valid for the schema in the box (any
    JSON object when the box is empty); a box that is not JSON is flagged as it is typed."""
    jsonschema = pytest.importorskip("jsonschema")
    name = {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"}
    schema = {"type": "object", "properties": {"name": name, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "city": name},
              "required": ["name", "age", "city"], "additionalProperties": False}
    prompt = "A made-up person, as JSON:"
    page.fill("#prompt", prompt)
    set_setting(page, "max_new_tokens", "120")
    page.fill("#seed-input", "5")
    page.click("#advanced summary")
    sync_api.expect(page.get_by_test_id("setting-json-schema")).to_be_hidden()
    page.check("#set-json")
    sync_api.expect(page.get_by_test_id("advanced-count")).to_contain_text("1 on")
    page.fill("#set-json-schema", "{not json")
    sync_api.expect(page.get_by_test_id("json-schema-hint")).to_contain_text("Not valid JSON")
    page.fill("#set-json-schema", json.dumps(schema))
    sync_api.expect(page.get_by_test_id("json-schema-hint")).to_have_text("")
    page.click("#generate-btn")
    wait_idle(page)
    assert page.get_attribute("#gen-status", "data-finish") == "stop"
    text = page.input_value("#prompt")
    assert text.startswith(prompt)
    jsonschema.validate(json.loads(text[len(prompt):]), schema)

    # Any JSON object, greedy. A JSON number may run on forever, and whether greedy text closes
    # the object within the budget rests on float rounding that differs between CPUs (AVX2 torch
    # writes " {\", \": 1000…" without end for the prompt above), so a one-line example leads it.
    page.click("#undo-btn")
    page.fill("#set-json-schema", "")
    few_shot = 'A person, as JSON:\n{"name": "Ann Lee", "age": 31, "city": "Paris"}\nAnother person, as JSON:\n'
    page.fill("#prompt", few_shot)
    set_setting(page, "temperature", "0")
    set_setting(page, "max_new_tokens", "300")
    page.click("#generate-btn")
    wait_idle(page)
    assert page.get_attribute("#gen-status", "data-finish") == "stop"
    assert isinstance(json.loads(page.input_value("#prompt")[len(few_shot):]), dict)

    # View code's gptj command asks for the same: --json-schema object, which the CLI takes
    page.click("#view-code")
    page.get_by_text("gptj CLI", exact=True).click()
    code = page.get_by_test_id("code-text")
    sync_api.expect(code).to_contain_text("--json-schema object")
    from gptj.cli.main import build_parser

    script = code.inner_text()  # bash reads it: the prompt may be $'...' quoted
    words = subprocess.run(["bash", "-c", f"gptj() {{ printf '%s\\0' \"$@\"; }}\n{script}\n"],
                           capture_output=True, check=True).stdout.decode().split("\0")[:-1]
    args = build_parser().parse_args(["generate", *words[1:]])
    assert args.json_schema == "object" and args.prompt == page.input_value("#prompt")
