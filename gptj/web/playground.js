// The playground: generate into the editor, stop, regenerate, undo, live token count, presets.

import { isAbort, postJSON, streamEvents } from "./api.js";
import { Editor } from "./editor.js";
import { NextTokens } from "./nexttoken.js";
import { ProbPopover } from "./probs.js";
import { $, debounce, formatInt } from "./util.js";

const FINISH = {
  length: "max tokens reached",
  stop: "finished",
  stopped: "stopped",
};

export class Playground {
  constructor({ settings, banner, onTextChange = () => {} }) {
    this.settings = settings;
    this.banner = banner;
    this.onTextChange = onTextChange;
    this.undoStack = [];
    this.controller = null;
    this.contextLength = null;
    this.popover = new ProbPopover();
    this.editor = new Editor({
      textarea: $("#prompt"),
      backdrop: $("#editor-backdrop"),
      scroller: $("#editor-scroll"),
      onEdit: (text) => {
        this.countTokens(text);
        this.onTextChange(text);
        if (!this.busy) this.popover.close();
        this.next?.textChanged();
      },
      onTokenClick: (mark, span) => (mark ? this.popover.show(mark, span) : this.popover.close()),
    });
    this.buttons = {
      generate: $("#generate-btn"),
      stop: $("#stop-btn"),
      regenerate: $("#regenerate-btn"),
      undo: $("#undo-btn"),
    };
    this.buttons.generate.addEventListener("click", () => this.generate());
    this.buttons.stop.addEventListener("click", () => this.stop());
    this.buttons.regenerate.addEventListener("click", () => this.generate({ regenerate: true }));
    this.buttons.undo.addEventListener("click", () => this.undo());
    this.status = $("#gen-status");
    this.tokenCount = $("#token-count");
    this.countController = null;
    this.countSeq = 0;
    this.countTokens = debounce((text) => this.fetchCount(text), 300);

    this.next = new NextTokens({
      getText: () => this.editor.text,
      insert: (token) => this.insertAtEnd(token),
      isBusy: () => this.busy,
    });

    $("#prob-colors").addEventListener("change", (e) => {
      $("#editor-box").classList.toggle("probs", e.target.checked);
      this.onTextChange();
    });
    $("#mono").addEventListener("change", (e) => {
      $("#editor-box").classList.toggle("mono", e.target.checked);
      this.onTextChange();
    });
    this.updateButtons();
  }

  get mono() {
    return $("#mono").checked;
  }

  set mono(on) {
    $("#mono").checked = !!on;
    $("#editor-box").classList.toggle("mono", !!on);
  }

  get probColors() {
    return $("#prob-colors").checked;
  }

  set probColors(on) {
    $("#prob-colors").checked = !!on;
    $("#editor-box").classList.toggle("probs", !!on);
  }

  /** Adds text at the end (a token picked in the next-token view); Undo takes it back. */
  insertAtEnd(text) {
    if (this.busy) return;
    this.pushUndo("edit");
    const snap = this.editor.snapshot();
    this.editor.setText(snap.text + text, snap.marks);
    this.editor.scrollToBottom();
    this.updateButtons();
  }

  setStatus(text, { live = false, finish = undefined } = {}) {
    this.status.textContent = text;
    this.status.title = text;
    this.status.className = live ? "status gen-status live" : "status gen-status";
    if (finish !== undefined) this.status.dataset.finish = finish;
  }

  get busy() {
    return this.controller !== null;
  }

  setContextLength(n) {
    this.contextLength = n;
    $("#token-count-max").textContent = n ? ` / ${formatInt(n)}` : "";
  }

  async fetchCount(text) {
    this.countController?.abort();
    const seq = ++this.countSeq;
    if (!text) {
      this.tokenCount.textContent = "0";
      return;
    }
    this.countController = new AbortController();
    try {
      const res = await postJSON("tokenize", { text }, { signal: this.countController.signal });
      if (seq === this.countSeq) {
        this.tokenCount.textContent = formatInt(res.count);
        this.tokenCount.dataset.count = String(res.count);
        const over = this.contextLength && res.count >= this.contextLength;
        this.tokenCount.parentElement.classList.toggle("over", !!over);
      }
    } catch (err) {
      if (!isAbort(err) && seq === this.countSeq) this.tokenCount.textContent = "?";
    }
  }

  /** Replaces the text (a preset); Undo brings the old text back. */
  setText(text) {
    if (this.busy) this.stop();
    this.pushUndo("edit");
    this.editor.setText(text);
    this.updateButtons();
  }

  /** Undo entries: the editor as it was before a generation ("generation") or before the
   * page replaced the text ("edit"). Regenerate only redoes a generation. */
  pushUndo(kind) {
    this.undoStack.push({ kind, snap: this.editor.snapshot() });
    if (this.undoStack.length > 50) this.undoStack.shift();
  }

  get canRegenerate() {
    const top = this.undoStack[this.undoStack.length - 1];
    return !!top && top.kind === "generation";
  }

  updateButtons() {
    const busy = this.busy;
    this.buttons.generate.disabled = busy;
    this.buttons.stop.disabled = !busy;
    this.buttons.regenerate.disabled = busy || !this.canRegenerate;
    this.buttons.undo.disabled = busy || this.undoStack.length === 0;
    $("#panel-playground").classList.toggle("busy", busy);
  }

  undo() {
    if (this.busy || !this.undoStack.length) return;
    this.popover.close();
    this.editor.restore(this.undoStack.pop().snap);
    this.setStatus("", { finish: "" });
    this.updateButtons();
    this.editor.textarea.focus();
  }

  stop() {
    this.controller?.abort();
  }

  async generate({ regenerate = false } = {}) {
    if (this.busy) return;
    if (regenerate) {
      if (!this.canRegenerate) return;
      this.editor.restore(this.undoStack.pop().snap);
    }
    const prompt = this.editor.text;
    if (!prompt) {
      this.banner.show("Write a prompt first: the model continues the text in the editor.");
      this.editor.textarea.focus();
      return;
    }
    this.banner.hide();
    this.popover.close();
    this.pushUndo("generation");
    const controller = new AbortController();
    this.controller = controller;
    this.updateButtons();
    this.editor.beginGeneration();
    this.editor.scrollToBottom(); // the continuation appears at the end
    // stream_options: the usage comes in a last chunk (as OpenAI's), only when asked for
    const body = { prompt, logprobs: 5, stream_options: { include_usage: true }, ...this.settings.request({ withStops: true }) };
    const t0 = performance.now();
    let tokens = 0;
    let chars = 0;
    let finish = null;
    let usage = null;
    this.setStatus("Generating…", { live: true });
    try {
      for await (const chunk of streamEvents("v1/completions", body, controller.signal)) {
        if (controller.signal.aborted) break; // events already buffered when Stop was pressed
        const choice = chunk.choices && chunk.choices[0];
        if (chunk.usage) usage = chunk.usage;
        if (!choice) continue;
        const toks = tokensOf(choice.logprobs);
        if (choice.text || toks) this.editor.append(choice.text || "", toks);
        tokens += toks ? toks.length : 0;
        chars += (choice.text || "").length;
        if (choice.finish_reason) finish = choice.finish_reason;
        this.setStatus(`Generating… ${tokens || ""}${tokens ? " tokens · " : ""}${rate(tokens, t0)}`, { live: true });
      }
      if (controller.signal.aborted) finish = "stopped";
    } catch (err) {
      if (isAbort(err)) {
        finish = "stopped";
      } else {
        this.banner.show(err.message, err);
        finish = "error";
        if (!chars) this.undoStack.pop(); // nothing changed: nothing to undo
      }
    } finally {
      this.controller = null;
      this.editor.endGeneration();
      this.updateButtons();
    }
    const n = usage ? usage.completion_tokens : tokens;
    const summary = `${FINISH[finish] || finish || "done"}: ${formatInt(n)} new token${n === 1 ? "" : "s"} · ${rate(n, t0)}`;
    this.setStatus(finish === "error" ? "" : summary, { finish: finish || "" });
    this.next.textChanged();
  }
}

/** The streamed logprobs of a chunk as a list of tokens, or null. */
export function tokensOf(lp) {
  if (!lp || !Array.isArray(lp.tokens) || !lp.tokens.length) return null;
  return lp.tokens.map((text, i) => ({
    text,
    id: lp.token_ids ? lp.token_ids[i] : null,
    logprob: lp.token_logprobs ? lp.token_logprobs[i] : null,
    top: lp.top_logprobs && lp.top_logprobs[i] ? Object.entries(lp.top_logprobs[i]) : [],
  }));
}

function rate(n, t0) {
  const s = (performance.now() - t0) / 1000;
  return n && s > 0.05 ? `${(n / s).toFixed(1)} tok/s` : `${s.toFixed(1)} s`;
}
