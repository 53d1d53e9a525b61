// The playground's editor: a plain <textarea> (so editing, selection, undo and IME behave as
// everywhere) laid over a "backdrop" that holds the same text with the generated parts wrapped
// in highlighted spans. The textarea's background is transparent, so the highlights show
// through; the backdrop's own text is invisible. Both grow with their content, and the
// surrounding box scrolls.
//
// Generated text is kept as "marks": {start, end, toks} ranges of the text, where toks is the
// list of tokens (with their log-probabilities) that produced the range, or null when the
// server sent no log-probabilities. Editing inside a mark turns it into plain text.

import { el } from "./util.js";

/** @typedef {{text: string, id: number|null, logprob: number|null, top: [string, number][]}} Token */

export class Editor {
  constructor({ textarea, backdrop, scroller, onEdit = () => {}, onTokenClick = () => {} }) {
    this.textarea = textarea;
    this.backdrop = backdrop;
    this.scroller = scroller;
    this.onEdit = onEdit;
    this.onTokenClick = onTokenClick;
    this.marks = [];
    this.lastText = textarea.value;
    this.pending = []; // tokens whose text has not arrived yet (part of a multi-byte character)
    this.spanMark = new WeakMap();
    this.hovered = null;
    this.sentinel = document.createTextNode("\u200b"); // keeps a final empty line visible

    textarea.addEventListener("input", () => this.handleInput());
    // The textarea never scrolls itself: it is as tall as its text.
    textarea.addEventListener("scroll", () => {
      textarea.scrollTop = 0;
      textarea.scrollLeft = 0;
    });
    textarea.addEventListener("click", (e) => {
      if (textarea.selectionStart !== textarea.selectionEnd) return; // a drag-selection, not a click
      const span = this.tokenAt(e.clientX, e.clientY);
      this.onTokenClick(span ? this.spanMark.get(span) : null, span);
    });
    let frame = 0;
    textarea.addEventListener("mousemove", (e) => {
      if (frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        this.setHovered(this.tokenAt(e.clientX, e.clientY));
      });
    });
    textarea.addEventListener("mouseleave", () => this.setHovered(null));
    this.render();
  }

  get text() {
    return this.textarea.value;
  }

  get generating() {
    return this.textarea.readOnly;
  }

  /** The token span under a point: the textarea covers the backdrop, so look through it. */
  tokenAt(x, y) {
    for (const node of document.elementsFromPoint(x, y)) {
      if (node.classList && node.classList.contains("tok") && this.backdrop.contains(node)) return node;
    }
    return null;
  }

  setHovered(span) {
    if (span === this.hovered) return;
    this.hovered?.classList.remove("hover");
    this.hovered = span;
    span?.classList.add("hover");
    this.textarea.classList.toggle("over-token", !!span);
  }

  snapshot() {
    return { text: this.text, marks: this.marks.map((m) => ({ ...m })) };
  }

  restore(snap) {
    this.setText(snap.text, snap.marks.map((m) => ({ ...m })));
  }

  setText(text, marks = []) {
    this.textarea.value = text;
    this.lastText = text;
    this.marks = marks;
    this.render();
    this.textarea.setSelectionRange(text.length, text.length);
    this.onEdit(text);
  }

  /** Keeps the marks on the right characters after a user edit (diffs the old and new text). */
  handleInput() {
    const old = this.lastText;
    const now = this.textarea.value;
    const max = Math.min(old.length, now.length);
    let p = 0;
    while (p < max && old.charCodeAt(p) === now.charCodeAt(p)) p++;
    let s = 0;
    while (s < max - p && old.charCodeAt(old.length - 1 - s) === now.charCodeAt(now.length - 1 - s)) s++;
    const oldEnd = old.length - s;
    const delta = now.length - old.length;
    this.marks = this.marks
      .filter((m) => m.end <= p || m.start >= oldEnd)
      .map((m) => (m.start >= oldEnd && delta ? { ...m, start: m.start + delta, end: m.end + delta } : m));
    this.lastText = now;
    this.render();
    if (this.textarea.selectionEnd === now.length && this.nearBottom(80)) this.scrollToBottom();
    this.onEdit(now);
  }

  render() {
    const text = this.text;
    const frag = document.createDocumentFragment();
    let pos = 0;
    for (const m of this.marks) {
      if (m.start > pos) frag.append(text.slice(pos, m.start));
      frag.append(this.spanFor(m, text.slice(m.start, m.end)));
      pos = m.end;
    }
    frag.append(text.slice(pos), this.sentinel);
    this.backdrop.replaceChildren(frag);
    this.hovered = null;
  }

  spanFor(mark, text) {
    const span = el("span", { class: mark.toks ? "gen tok" : "gen" }, text);
    if (mark.toks && mark.toks.length) {
      const lp = mark.toks.reduce((sum, t) => sum + (t.logprob ?? 0), 0);
      span.style.setProperty("--p", Math.exp(lp).toFixed(3));
    }
    this.spanMark.set(span, mark);
    return span;
  }

  nearBottom(slack = 40) {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight <= slack;
  }

  scrollToBottom() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  beginGeneration() {
    this.textarea.readOnly = true;
    this.pending = [];
    this.textarea.closest(".editor-box")?.classList.add("generating");
  }

  endGeneration() {
    this.textarea.readOnly = false;
    this.pending = [];
    this.textarea.closest(".editor-box")?.classList.remove("generating");
  }

  /** Appends a streamed piece at the end of the text. `tokens` (or null) are the tokens that
   * arrived with it; a piece may carry tokens but no text yet (a character split over tokens). */
  append(text, tokens) {
    if (tokens) this.pending.push(...tokens);
    if (!text) return;
    const follow = this.nearBottom();
    const start = this.text.length;
    const toks = tokens ? this.pending : null;
    this.pending = [];
    const marks = splitIntoMarks(text, start, toks);
    this.textarea.value += text;
    this.lastText = this.textarea.value;
    for (const m of marks) {
      this.marks.push(m);
      this.backdrop.insertBefore(this.spanFor(m, text.slice(m.start - start, m.end - start)), this.sentinel);
    }
    if (follow) this.scrollToBottom();
    this.onEdit(this.lastText);
  }
}

/** One mark per token when the tokens spell out the text exactly; tokens that do not
 * (a character split over tokens, a stop sequence cut off) share one mark for the rest. */
export function splitIntoMarks(text, start, toks) {
  if (!toks || !toks.length) return [{ start, end: start + text.length, toks: null }];
  const marks = [];
  let pos = 0;
  let i = 0;
  for (; i < toks.length; i++) {
    const t = toks[i].text;
    if (!t || t.includes("\ufffd") || !text.startsWith(t, pos)) break;
    if (i === toks.length - 1 && pos + t.length !== text.length) break;
    marks.push({ start: start + pos, end: start + pos + t.length, toks: [toks[i]] });
    pos += t.length;
  }
  if (i < toks.length || pos < text.length) {
    if (pos < text.length) marks.push({ start: start + pos, end: start + text.length, toks: toks.slice(i) });
    else if (marks.length) marks[marks.length - 1].toks.push(...toks.slice(i));
  }
  return marks;
}
