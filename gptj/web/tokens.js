// The token viewer: text split into coloured pieces, with ids, counts and a choice of tokenizer.

import { isAbort, postJSON } from "./api.js";
import { $, debounce, el, formatInt } from "./util.js";

const hex = (bytes) => `<${bytes.map((b) => b.toString(16).padStart(2, "0")).join(" ")}>`;

export class TokenViewer {
  constructor({ banner, getPlaygroundText, onChange = () => {} }) {
    this.banner = banner;
    this.onChange = onChange;
    this.input = $("#tokens-input");
    this.output = $("#tokens-output");
    this.count = $("#tokens-count");
    this.chars = $("#chars-count");
    this.controller = null;
    this.seq = 0;
    this.pieces = [];
    this.refresh = debounce(() => this.tokenize(), 200);
    this.input.addEventListener("input", () => {
      this.chars.textContent = formatInt([...this.input.value].length);
      this.refresh();
      this.onChange();
    });
    for (const radio of document.querySelectorAll('input[name="tokenizer"]')) {
      radio.addEventListener("change", () => {
        this.refresh.flush();
        this.onChange();
      });
    }
    for (const radio of document.querySelectorAll('input[name="tokens-view"]')) {
      radio.addEventListener("change", () => this.render());
    }
    $("#tokens-from-editor").addEventListener("click", () => this.setText(getPlaygroundText()));
    $("#tokens-clear").addEventListener("click", () => this.setText(""));
  }

  get tokenizer() {
    return document.querySelector('input[name="tokenizer"]:checked')?.value || "";
  }

  set tokenizer(value) {
    const radio = document.querySelector(`input[name="tokenizer"][value="${value === "gpt-j" ? "gpt-j" : ""}"]`);
    if (radio) radio.checked = true;
  }

  get view() {
    return document.querySelector('input[name="tokens-view"]:checked')?.value || "text";
  }

  setText(text) {
    this.input.value = text;
    this.chars.textContent = formatInt([...text].length);
    this.refresh.flush();
    this.onChange();
  }

  async tokenize() {
    const text = this.input.value;
    this.controller?.abort();
    const seq = ++this.seq;
    if (!text) {
      this.pieces = [];
      this.count.textContent = "0";
      this.count.dataset.count = "0";
      this.render();
      return;
    }
    this.controller = new AbortController();
    this.output.classList.add("stale");
    try {
      const body = { text };
      if (this.tokenizer) body.tokenizer = this.tokenizer;
      const res = await postJSON("tokenize", body, { signal: this.controller.signal });
      if (seq !== this.seq) return;
      this.pieces = res.pieces || (res.tokens || []).map((id) => ({ id, text: null, bytes: [] }));
      this.count.textContent = formatInt(res.count);
      this.count.dataset.count = String(res.count);
      this.render();
    } catch (err) {
      if (!isAbort(err) && seq === this.seq) this.banner.show(err.message, err);
    } finally {
      if (seq === this.seq) this.output.classList.remove("stale");
    }
  }

  render() {
    const view = this.view;
    this.output.dataset.view = view;
    if (view === "ids") {
      this.output.replaceChildren(el("code", { class: "ids", "data-testid": "token-ids" }, `[${this.pieces.map((p) => p.id).join(", ")}]`));
      return;
    }
    const frag = document.createDocumentFragment();
    this.pieces.forEach((p, i) => {
      const isBytes = p.text === null || p.text === undefined;
      const shown = isBytes ? hex(p.bytes || []) : p.text;
      const title = `id ${p.id}${isBytes ? ` · bytes ${hex(p.bytes || [])} (part of a character)` : ""}`;
      const piece = el("span", { class: `piece c${i % 5}${isBytes ? " bytes" : ""}`, title, "data-testid": "token-piece", "data-id": p.id });
      if (view === "both") {
        piece.append(el("span", { class: "piece-text" }, visibleBreaks(shown, isBytes, true)), el("span", { class: "piece-id" }, String(p.id)));
        frag.append(piece);
        if (!isBytes && shown.includes("\n")) frag.append(el("span", { class: "break" }));
      } else {
        piece.append(visibleBreaks(shown, isBytes, false));
        frag.append(piece);
      }
    });
    this.output.replaceChildren(frag);
  }
}

/** Newlines get a faint ↵ so that newline tokens stay visible; in the "both" view they do not
 * break the line inside the piece (a separate break element follows it). */
function visibleBreaks(text, isBytes, inline) {
  if (isBytes || !text.includes("\n")) return text;
  const frag = document.createDocumentFragment();
  text.split("\n").forEach((part, i, all) => {
    if (part) frag.append(part);
    if (i < all.length - 1) frag.append(el("span", { class: "nl" }, "↵"), inline ? "" : "\n");
  });
  return frag;
}
