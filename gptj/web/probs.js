// The probability view: clicking a generated token shows the alternatives the model
// considered at that position, with their probabilities.

import { $, el, visibleToken } from "./util.js";

const pct = (lp) => {
  const p = Math.exp(lp) * 100;
  return p >= 99.95 ? "100%" : p >= 10 ? `${p.toFixed(1)}%` : p >= 0.01 ? `${p.toFixed(2)}%` : "<0.01%";
};

export class ProbPopover {
  constructor() {
    this.box = $("#prob-popover");
    this.anchor = null;
    document.addEventListener("mousedown", (e) => {
      if (!this.open || this.box.contains(e.target)) return;
      // A click on another token re-targets the popover instead (the editor handles it).
      if (e.target.id === "prompt") return;
      this.close();
    });
    const follow = () => this.open && this.position();
    window.addEventListener("resize", follow);
    document.addEventListener("scroll", follow, true);
  }

  get open() {
    return !this.box.hidden;
  }

  close() {
    this.box.hidden = true;
    this.anchor?.classList.remove("active");
    this.anchor = null;
  }

  show(mark, span) {
    if (!mark || !mark.toks) return;
    this.anchor?.classList.remove("active");
    this.anchor = span;
    span.classList.add("active");
    const parts = [
      el("div", { class: "pp-title" },
        el("span", {}, mark.toks.length > 1 ? `${mark.toks.length} tokens` : "Token"),
        el("button", { class: "pp-close", type: "button", "aria-label": "Close", onclick: () => this.close() }, "×")),
    ];
    for (const tok of mark.toks) parts.push(this.renderToken(tok));
    if (mark.toks.length > 1) {
      parts.push(el("p", { class: "hint" }, "These tokens together make up the highlighted text (a character split over tokens, or a cut stop sequence)."));
    }
    this.box.replaceChildren(...parts);
    this.box.hidden = false;
    this.position();
    if (this.sheet && span.getBoundingClientRect().bottom > this.box.getBoundingClientRect().top - 8) {
      span.scrollIntoView({ block: "center" }); // keep the token visible above the bottom sheet
    }
  }

  get sheet() {
    return window.matchMedia("(max-width: 640px)").matches;
  }

  renderToken(tok) {
    const rows = [...(tok.top || [])].sort((a, b) => b[1] - a[1]);
    let chosenListed = false;
    const list = el("ol", { class: "pp-list", "data-testid": "prob-list" });
    for (const [text, lp] of rows) {
      const chosen = text === tok.text;
      chosenListed ||= chosen;
      list.append(this.row(text, lp, chosen));
    }
    if (!chosenListed && tok.logprob !== null && tok.logprob !== undefined) list.append(this.row(tok.text, tok.logprob, true, true));
    return el("div", { class: "pp-token" },
      el("div", { class: "pp-head" },
        el("code", { class: "tokchip", title: JSON.stringify(tok.text) }, visibleToken(tok.text)),
        el("span", { class: "pp-prob", "data-testid": "prob-chosen" }, tok.logprob === null || tok.logprob === undefined ? "" : pct(tok.logprob)),
        el("span", { class: "pp-meta" },
          [tok.id !== null && tok.id !== undefined ? `id ${tok.id}` : "", tok.logprob !== null && tok.logprob !== undefined ? `logprob ${tok.logprob.toFixed(3)}` : ""]
            .filter(Boolean).join(" · "))),
      rows.length ? list : el("p", { class: "hint" }, "No alternatives were sent for this token."));
  }

  row(text, lp, chosen, outside = false) {
    const width = Math.max(0.5, Math.exp(lp) * 100);
    return el("li", { class: chosen ? "chosen" : "", "data-testid": "prob-row" },
      el("code", { class: "tokchip", title: JSON.stringify(text) }, visibleToken(text)),
      el("span", { class: "bar" }, el("span", { class: "fill", style: { width: `${width}%` } })),
      el("span", { class: "pct" }, pct(lp)),
      outside ? el("span", { class: "pp-note" }, "chosen") : null);
  }

  position() {
    if (!this.anchor || !this.anchor.isConnected) return this.close();
    if (this.sheet) {
      this.box.style.left = this.box.style.top = "";
      return; // a bottom sheet on phones (CSS)
    }
    const rects = this.anchor.getClientRects();
    const r = rects[rects.length - 1] || this.anchor.getBoundingClientRect();
    const box = this.box.getBoundingClientRect();
    const margin = 8;
    let left = Math.min(Math.max(margin, r.left), window.innerWidth - box.width - margin);
    let top = r.bottom + 6;
    if (top + box.height > window.innerHeight - margin) top = Math.max(margin, r.top - box.height - 6);
    this.box.style.left = `${left}px`;
    this.box.style.top = `${top}px`;
  }
}
