// Markdown for the chat's replies, rendered safely: markdown-it with raw HTML off (a `<img
// onerror=…>` written by the model stays text), no images (nothing is fetched), links checked by
// markdown-it and opened in a new tab; DOMPurify then keeps only the tags markdown makes. Code
// blocks get a header with their language and a Copy button.
// Both libraries are vendored beside this file (licences: *.LICENSE.txt).

import markdownit from "./markdown-it.min.js";
import DOMPurify from "./purify.es.js";
import { el } from "./util.js";

const md = markdownit({ html: false, linkify: false, typographer: false, breaks: true });
md.disable(["image"]); // `![alt](url)` stays text: the page fetches nothing the model names
// Table cells' alignment comes as style="text-align:…", which the page's CSP refuses (no inline
// styles): a class instead.
md.core.ruler.push("align_class", (state) => {
  for (const token of state.tokens) {
    const style = token.attrGet("style");
    if (style === null) continue;
    token.attrs = token.attrs.filter(([name]) => name !== "style");
    const align = /text-align:\s*(left|right|center)/.exec(style);
    if (align) token.attrJoin("class", `align-${align[1]}`);
  }
});

const TAGS = ["a", "p", "br", "hr", "em", "strong", "s", "del", "code", "pre", "blockquote", "ul", "ol", "li",
  "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td"];
const ATTRS = ["href", "title", "class", "start"];

/** Renders `text` (Markdown) into `target`, replacing what it held. */
export function renderMarkdown(target, text) {
  const html = DOMPurify.sanitize(md.render(text), {
    ALLOWED_TAGS: TAGS,
    ALLOWED_ATTR: ATTRS,
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
    RETURN_DOM_FRAGMENT: true,
  });
  for (const a of html.querySelectorAll("a[href]")) {
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
  }
  for (const pre of html.querySelectorAll("pre")) {
    const block = codeBlock(pre);
    pre.replaceWith(block);
    block.append(pre);
  }
  target.replaceChildren(html);
}

/** The frame of a code block: its language and a Copy button (the <pre> goes in after). */
function codeBlock(pre) {
  const code = pre.querySelector("code");
  const lang = (code?.className.match(/language-([\w#+.-]+)/) || [])[1] || "";
  const copy = el("button", { type: "button", class: "copy-code", "data-testid": "copy-code", title: "Copy the code" }, "Copy");
  copy.addEventListener("click", () => copyText((code || pre).textContent, copy));
  return el("div", { class: "code-block", "data-testid": "code-block" },
    el("div", { class: "code-head" }, el("span", { class: "code-lang" }, lang), copy));
}

/** Copies `text`; `button` says "Copied" for a moment. Works without the clipboard API too
 * (plain http on another host than localhost). */
export async function copyText(text, button = null) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    const area = el("textarea", { value: text, readOnly: true, class: "offscreen" });
    document.body.append(area);
    area.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
  }
  if (button) {
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.textContent = ok ? "Copied" : "Copy failed";
    button.classList.toggle("done", ok);
    clearTimeout(button.copyTimer);
    button.copyTimer = setTimeout(() => {
      button.textContent = label;
      button.classList.remove("done");
    }, 1500);
  }
  return ok;
}
