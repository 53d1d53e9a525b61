// The next-token view (text-generation-webui's Logits tab): for the editor's text as it stands,
// the tokens the model finds most likely to come next, with their probabilities. Nothing is
// generated into the text: one POST /v1/completions with max_tokens 1 and logprobs at the
// server's limit, of which only the first token's top_logprobs are shown.

import { isAbort, postJSON } from "./api.js";
import { $, debounce, el, visibleToken } from "./util.js";

export const TOP_N = 20; // the OpenAI API's (and this server's) limit for `logprobs`

const pct = (lp) => {
  const p = Math.exp(lp) * 100;
  return p >= 99.95 ? "100%" : p >= 10 ? `${p.toFixed(1)}%` : p >= 0.01 ? `${p.toFixed(2)}%` : "<0.01%";
};

export class NextTokens {
  constructor({ getText, insert, isBusy }) {
    this.getText = getText;
    this.insert = insert;
    this.isBusy = isBusy;
    this.toggle = $("#next-toggle");
    this.panel = $("#next-panel");
    this.list = $("#next-list");
    this.note = $("#next-note");
    this.controller = null;
    this.seq = 0;
    this.shownFor = null;
    this.refreshSoon = debounce(() => this.refresh(), 400);
    this.toggle.addEventListener("change", () => this.setOpen(this.toggle.checked));
    $("#next-refresh").addEventListener("click", () => this.refresh());
  }

  get open() {
    return !this.panel.hidden;
  }

  setOpen(open) {
    this.toggle.checked = open;
    this.panel.hidden = !open;
    $("#pg-body").classList.toggle("with-next", open);
    if (open) this.refresh();
    else {
      this.controller?.abort();
      this.refreshSoon.cancel();
    }
  }

  /** The editor's text changed: refresh when the view is open and nothing is generating. */
  textChanged() {
    if (this.open && !this.isBusy()) this.refreshSoon();
  }

  async refresh() {
    if (!this.open) return;
    this.refreshSoon.cancel();
    const text = this.getText();
    this.controller?.abort();
    const seq = ++this.seq;
    if (!text) {
      this.list.replaceChildren();
      this.note.textContent = "Write some text: the model's guesses for the token after it appear here.";
      this.panel.dataset.state = "empty";
      return;
    }
    this.controller = new AbortController();
    this.panel.dataset.state = "loading";
    this.list.classList.add("stale");
    try {
      const res = await postJSON("v1/completions",
        { prompt: text, max_tokens: 1, logprobs: TOP_N, temperature: 0 },
        { signal: this.controller.signal });
      if (seq !== this.seq) return;
      const lp = res.choices && res.choices[0] && res.choices[0].logprobs;
      const top = lp && lp.top_logprobs && lp.top_logprobs[0];
      // token healing (on by default): a text that ends in a space or newline is continued by tokens that
      // begin with it, shown without it; "" is its own last token kept as it is, then something else
      const rows = top ? Object.entries(top).filter(([t]) => t !== "").sort((a, b) => b[1] - a[1]) : [];
      this.render(rows);
      this.note.textContent = /[ \t]$/.test(text)
        ? "The text ends with a space: the tokens shown begin with it (token healing), so they are shown without it."
        : "";
      this.shownFor = text;
      this.panel.dataset.state = "ready";
    } catch (err) {
      if (isAbort(err) || seq !== this.seq) return;
      this.list.replaceChildren();
      this.note.textContent = err.message;
      this.panel.dataset.state = "error";
    } finally {
      if (seq === this.seq) this.list.classList.remove("stale");
    }
  }

  render(rows) {
    this.list.replaceChildren(...rows.map(([token, lp]) => {
      const width = Math.max(0.5, Math.exp(lp) * 100);
      // "\ufffd": a token that is only part of a character (its bytes alone are not text)
      const partial = token.includes("\ufffd");
      const row = el("li", { "data-testid": "next-row", class: partial ? "partial" : "",
        title: `logprob ${lp.toFixed(3)} · ${partial ? "part of a character: cannot be added alone" : `click to add ${JSON.stringify(token)}`}` },
        el("code", { class: "tokchip", "data-testid": "next-token" }, visibleToken(token)),
        el("span", { class: "bar" }, el("span", { class: "fill", style: { width: `${width}%` } })),
        el("span", { class: "pct", "data-testid": "next-prob" }, pct(lp)));
      row.tabIndex = 0;
      row.dataset.token = token;
      const add = () => {
        if (!partial && !this.isBusy()) this.insert(token);
      };
      row.addEventListener("click", add);
      row.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          add();
        }
      });
      return row;
    }));
  }
}
