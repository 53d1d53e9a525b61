// "View code": the request the page would send now (the playground's prompt or the chat's
// conversation, with the current settings) as a curl command, Python with the `openai` client,
// and a `gptj` CLI command, as the OpenAI playground shows it.

import { hasApiKey } from "./api.js";
import { copyText } from "./markdown.js";
import { $ } from "./util.js";

// Request fields the `openai` client takes as keyword arguments; the others go in extra_body.
const OPENAI_ARGS = new Set(["max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty"]);
// `gptj generate` / `gptj chat` flags for the request fields (the CLI has no penalties but the repetition one).
const CLI_FLAGS = [
  ["max_tokens", "--max-new-tokens"], ["temperature", "--temperature"], ["top_p", "--top-p"], ["top_k", "--top-k"],
  ["min_p", "--min-p"], ["repetition_penalty", "--repetition-penalty"], ["seed", "--seed"],
];

/** A word for bash: '…' (with ' as '\''), or $'…' when it holds control characters that
 * would be invisible between plain quotes (`ansi`: newlines and tabs too). */
export function shellQuote(s, { ansi = false } = {}) {
  const control = ansi ? /[\u0000-\u001f\u007f]/ : /[\u0000-\u0008\u000b-\u001f\u007f]/;
  if (!control.test(s)) return /^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`;
  const named = { "\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\", "'": "\\'" };
  const body = [...s].map((c) => named[c] ?? (c.charCodeAt(0) < 0x20 || c === "\u007f"
    ? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}` : c)).join("");
  return `$'${body}'`;
}

/** A Python literal: JSON's strings and numbers are Python's too; dicts and lists spaced as Python prints them. */
function py(v) {
  if (v === null || v === undefined) return "None";
  if (v === true || v === false) return v ? "True" : "False";
  if (Array.isArray(v)) return `[${v.map(py).join(", ")}]`;
  if (typeof v === "object") return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${py(x)}`).join(", ")}}`;
  return JSON.stringify(v);
}

export function baseUrl() {
  return new URL(".", window.location.href).href.replace(/\/$/, "");
}

/** The three snippets for a request: `kind` "completions" (body.prompt) or "chat" (body.messages). */
export function snippets({ kind, body, info = {}, base = baseUrl(), withKey = hasApiKey() }) {
  const endpoint = kind === "chat" ? "/v1/chat/completions" : "/v1/completions";
  const request = { model: info.name || undefined, ...body };

  const curl = [
    `curl ${base}${endpoint} \\`,
    `  -H "Content-Type: application/json" \\`,
    ...(withKey ? [`  -H "Authorization: Bearer $GPTJ_API_KEY" \\`] : []),
    `  -d ${shellQuote(JSON.stringify(request, null, 2))}`,
  ].join("\n");

  const args = [`    model=${py(info.name || "gptj")},`];
  if (kind === "chat") {
    args.push("    messages=[", ...body.messages.map((m) => `        ${py(m)},`), "    ],");
  } else {
    args.push(`    prompt=${py(body.prompt)},`);
  }
  const extra = {};
  for (const [k, v] of Object.entries(body)) {
    if (k === "prompt" || k === "messages") continue;
    if (OPENAI_ARGS.has(k)) args.push(`    ${k}=${py(v)},`);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) args.push(`    extra_body=${py(extra)},`);
  const python = [
    ...(withKey ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(`${base}/v1`)}, api_key=${withKey ? 'os.environ["GPTJ_API_KEY"]' : '"none"'})`,
    "",
    `result = client.${kind === "chat" ? "chat.completions" : "completions"}.create(`,
    ...args,
    ")",
    `print(result.choices[0].${kind === "chat" ? "message.content" : "text"})`,
  ].join("\n");

  const flags = [];
  if (info.path || info.name) flags.push(["--model", shellQuote(info.path || info.name)]);
  if (["bf16", "int8", "int4"].includes(info.quantization)) flags.push(["--quantize", info.quantization]);
  for (const [field, flag] of CLI_FLAGS) if (body[field] !== undefined) flags.push([flag, String(body[field])]);
  for (const stop of body.stop || []) flags.push(["--stop", shellQuote(stop, { ansi: true })]);
  if (body.token_healing === false) flags.push(["--no-token-healing", ""]);
  const format = body.response_format;
  if (format?.type === "json_object") flags.push(["--json-schema", "object"]);
  if (format?.type === "json_schema") flags.push(["--json-schema", shellQuote(JSON.stringify(format.json_schema?.schema ?? {}))]);
  const notes = [];
  const missing = ["presence_penalty", "frequency_penalty"].filter((k) => body[k] !== undefined);
  if (missing.length) notes.push(`# gptj ${kind === "chat" ? "chat" : "generate"} has no flag for ${missing.join(" or ")}: the Python API and the HTTP API take them`);
  let cli;
  if (kind === "chat") {
    const system = body.messages.find((m) => m.role === "system");
    if (system) flags.push(["--system", shellQuote(system.content)]);
    const turns = body.messages.filter((m) => m.role !== "system").length;
    if (turns) notes.push("# to go on from this conversation: Export it from the chat list, then type /load FILE in gptj chat");
    cli = [...notes, `gptj chat ${flagLines(flags)}`].join("\n");
  } else {
    const prompt = shellQuote(body.prompt);
    cli = [...notes, `gptj generate ${flagLines(flags)}${flags.length ? " \\\n  " : ""}${body.prompt.startsWith("-") ? "-- " : ""}${prompt}`].join("\n");
  }
  return { curl, python, cli };
}

function flagLines(flags) {
  const lines = [];
  let line = [];
  for (const [flag, value] of flags) {
    line.push(value === "" ? flag : `${flag} ${value}`);
    if (flag === "--model" || flag === "--system" || line.join(" ").length > 60) {
      lines.push(line.join(" "));
      line = [];
    }
  }
  if (line.length) lines.push(line.join(" "));
  return lines.join(" \\\n  ");
}

export class CodeView {
  /** `current()` gives {kind, body, hint} for the request as it would go now. */
  constructor({ current, getInfo }) {
    this.current = current;
    this.getInfo = getInfo;
    this.dialog = $("#code-dialog");
    this.code = $("#code-text");
    this.texts = null;
    $("#view-code").addEventListener("click", () => this.show());
    $("#code-close").addEventListener("click", () => this.dialog.close());
    this.dialog.addEventListener("click", (e) => {
      if (e.target === this.dialog) this.dialog.close(); // a click on the backdrop
    });
    for (const radio of document.querySelectorAll('input[name="code-lang"]')) radio.addEventListener("change", () => this.render());
    $("#code-copy").addEventListener("click", (e) => copyText(this.code.textContent, e.currentTarget));
  }

  get lang() {
    return document.querySelector('input[name="code-lang"]:checked')?.value || "curl";
  }

  show() {
    const { kind, body, hint } = this.current();
    this.texts = snippets({ kind, body, info: this.getInfo() || {} });
    $("#code-hint").textContent = hint;
    this.render();
    if (!this.dialog.open) this.dialog.showModal();
  }

  render() {
    if (!this.texts) return;
    const lang = this.lang;
    this.code.textContent = this.texts[lang];
    this.code.dataset.lang = lang;
    $("#code-note").textContent = { curl: "bash", python: "python · pip install openai", cli: "bash · the model runs in the command itself" }[lang];
  }
}
