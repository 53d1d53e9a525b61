// Small helpers shared by the views.

export const $ = (sel, root = document) => root.querySelector(sel);

/** Element factory: el("span", {class: "x", title: "y"}, "text", child) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role" || key === "title") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.flush = (...args) => {
    clearTimeout(timer);
    fn(...args);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** 134515008 -> "135M", 6053381344 -> "6.1B" */
export function formatParams(n) {
  if (typeof n !== "number" || !isFinite(n)) return n ? String(n) : "";
  if (n >= 1e9) return `${(n / 1e9).toFixed(n >= 1e10 ? 0 : 1)}B`;
  if (n >= 1e6) return `${Math.round(n / 1e6)}M`;
  if (n >= 1e3) return `${Math.round(n / 1e3)}K`;
  return String(n);
}

export const formatInt = (n) => Number(n).toLocaleString("en-US");

/** A token's text with its whitespace made visible: " the" -> "␣the", "\n" -> "↵". */
export function visibleToken(s) {
  if (s === "") return "∅";
  return s.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

/** Parses the stop-sequence field: comma or newline separated; \n \t \r \s \, \\ escapes;
 * spaces right after a separator are ignored (write \s for a leading space). */
export function parseStops(input) {
  const out = [];
  let cur = "";
  let atStart = true;
  const escapes = { n: "\n", t: "\t", r: "\r", s: " ", "\\": "\\", ",": "," };
  for (let i = 0; i < input.length; i++) {
    const c = input[i];
    if (c === "\\" && i + 1 < input.length) {
      const next = input[++i];
      cur += escapes[next] ?? "\\" + next;
      atStart = false;
    } else if (c === "," || c === "\n") {
      if (cur) out.push(cur);
      cur = "";
      atStart = true;
    } else if (atStart && c === " ") {
      continue;
    } else {
      cur += c;
      atStart = false;
    }
  }
  if (cur) out.push(cur);
  return [...new Set(out)];
}

/** The inverse of parseStops, for filling the field from a preset. */
export function formatStops(list) {
  return (list || [])
    .map((s) =>
      s
        .replace(/\\/g, "\\\\")
        .replace(/\n/g, "\\n")
        .replace(/\t/g, "\\t")
        .replace(/\r/g, "\\r")
        .replace(/,/g, "\\,")
        .replace(/^ /, "\\s"),
    )
    .join(", ");
}

export function clamp(x, lo, hi) {
  return Math.min(hi, Math.max(lo, x));
}

/** localStorage that never throws (private windows, disabled storage). */
export const store = {
  key: "gptj-studio:v1",
  load() {
    try {
      return JSON.parse(localStorage.getItem(this.key) || "{}") || {};
    } catch {
      return {};
    }
  },
  save(patch) {
    try {
      localStorage.setItem(this.key, JSON.stringify({ ...this.load(), ...patch }));
    } catch {
      /* storage unavailable: nothing is remembered */
    }
  },
};
