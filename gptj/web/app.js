// GPT-J Studio's page: wires the header, tabs, settings, presets and the three views.
// Plain ES modules, no build step, no network beyond this server.

import { getJSON, setApiKey, UNREACHABLE } from "./api.js";
import { Chat } from "./chat.js";
import { path } from "./chatstore.js";
import { CodeView } from "./codeview.js";
import { Playground } from "./playground.js";
import { Settings } from "./settings.js";
import { TokenViewer } from "./tokens.js";
import { $, debounce, el, formatInt, formatParams, store } from "./util.js";

// ---- error banner ----------------------------------------------------------------------------

const banner = {
  box: $("#error-banner"),
  show(message, err) {
    $("#error-message").textContent = message;
    $("#api-key-form").hidden = !(err && err.status === 401);
    this.box.hidden = false;
  },
  hide() {
    this.box.hidden = true;
  },
};
$("#error-close").addEventListener("click", () => banner.hide());
$("#api-key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey($("#api-key").value.trim());
  banner.hide();
  loadServerData();
});

// ---- views -----------------------------------------------------------------------------------

const saved = store.load();
const remember = debounce(() => {
  store.save({
    prompt: playground.editor.text,
    settings: settings.state(),
    system: chat.system.value,
    tokensText: tokens.input.value,
    tokenizer: tokens.tokenizer,
    tab: currentTab,
    view: { mono: playground.mono, probs: playground.probColors, next: playground.next.open, advanced: $("#advanced").open },
  });
}, 400);

const settings = new Settings({ onChange: remember });
const playground = new Playground({ settings, banner, onTextChange: remember });
const chat = new Chat({ settings, banner, onChange: remember, initialSystem: saved.system || "" });
const tokens = new TokenViewer({ banner, getPlaygroundText: () => playground.editor.text, onChange: remember });

// ---- tabs ------------------------------------------------------------------------------------

let currentTab = "playground";
const TABS = ["playground", "chat", "tokens"];

function showTab(name, { focus = true } = {}) {
  if (!TABS.includes(name)) name = "playground";
  currentTab = name;
  for (const t of TABS) {
    const tab = $(`#tab-${t}`);
    tab.setAttribute("aria-selected", String(t === name));
    tab.tabIndex = t === name ? 0 : -1;
    $(`#panel-${t}`).hidden = t !== name;
  }
  $("#layout").dataset.tab = name;
  if (focus) {
    if (name === "playground") playground.editor.textarea.focus();
    else if (name === "chat") chat.input.focus();
    else tokens.input.focus();
  }
  if (name === "tokens" && tokens.input.value && !tokens.pieces.length) tokens.refresh.flush();
  playground.popover.close();
  remember();
}

for (const t of TABS) $(`#tab-${t}`).addEventListener("click", () => showTab(t));
$(".tabs").addEventListener("keydown", (e) => {
  const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
  if (!step) return;
  const next = TABS[(TABS.indexOf(currentTab) + step + TABS.length) % TABS.length];
  showTab(next, { focus: false });
  $(`#tab-${next}`).focus();
});

// ---- keyboard --------------------------------------------------------------------------------

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    if (currentTab === "playground") playground.generate();
    else if (currentTab === "chat") chat.send();
  } else if (e.key === "Escape") {
    if (playground.busy || chat.busy) {
      e.preventDefault();
      playground.stop();
      chat.stop();
    } else if (playground.popover.open) {
      playground.popover.close();
    }
  }
});

// ---- presets ---------------------------------------------------------------------------------

let presets = [];
let monoByPreset = false; // the code preset switched Monospace on: the next preset switches it off

function applyPreset(name) {
  const p = presets.find((x) => x.name === name);
  if (!p) return;
  $("#preset-desc").textContent = p.description || "";
  settings.apply(p.settings || {}, p.stop || []);
  const wantsMono = p.monospace === true || (p.monospace === undefined && p.name === "code");
  if (wantsMono && !playground.mono) {
    playground.mono = true;
    monoByPreset = true;
  } else if (!wantsMono && monoByPreset && p.kind !== "chat") {
    playground.mono = false;
    monoByPreset = false;
  }
  if (p.kind === "chat") {
    chat.botName = p.bot_name || "Assistant";
    chat.setSystem(p.intro || "");
    showTab("chat");
    if (p.example && !chat.input.value) {
      chat.input.value = p.example;
      chat.autosize();
    }
  } else {
    const template = p.template || "{input}";
    playground.setText(template.split("{input}").join(p.example || ""));
    showTab("playground");
  }
  settings.changed();
}

$("#preset-select").addEventListener("change", (e) => applyPreset(e.target.value));

// ---- server data -----------------------------------------------------------------------------

function renderInfo(info) {
  $("#model-name").textContent = info.name || "model";
  $("#model-name").title = info.path || info.name || "";
  document.title = `${info.name} · GPT-J Studio`;
  const chips = [
    ["architecture", info.architecture],
    ["parameters", info.parameters ? `${formatParams(info.parameters)} params` : null],
    ["quantization", info.quantization],
    ["dtype", info.dtype],
    ["context", info.context_length ? `${formatInt(info.context_length)} ctx` : null],
  ];
  $("#model-chips").replaceChildren(
    ...chips.filter(([, v]) => v).map(([k, v]) => el("span", { class: "chip", title: k, "data-testid": `info-${k}` }, String(v))),
  );
}

// The dot in the header follows every request (api.js tells): red as soon as one cannot reach
// the server, green again with the next answer. While red, /health is asked every few seconds.
let connected = null;
let serverInfo = null;
let healthTimer = null;

function setConnected(ok, text) {
  const conn = $("#conn");
  conn.classList.toggle("ok", ok);
  conn.classList.toggle("bad", !ok);
  conn.title = text;
  conn.dataset.state = ok ? "ok" : "bad";
  conn.setAttribute("aria-label", text);
  const was = connected;
  connected = ok;
  if (ok && was === false) {
    if ($("#error-message").textContent.includes(UNREACHABLE)) banner.hide();
    if (!serverInfo) loadServerData();
  }
  scheduleHealth();
}

function scheduleHealth() {
  clearTimeout(healthTimer);
  healthTimer = setTimeout(checkHealth, connected === false ? 2000 : 15000);
}

async function checkHealth() {
  if (document.hidden && connected !== false) return scheduleHealth();
  try {
    await getJSON("health");
  } catch {
    /* the connection event has set the dot */
  }
  scheduleHealth();
}

window.addEventListener("gptj:connection", (e) => {
  const { ok, message } = e.detail;
  if (ok !== connected) setConnected(ok, ok ? (serverInfo ? `Connected: ${serverInfo.name}` : "Connected") : message);
});

async function loadServerData() {
  try {
    const info = await getJSON("api/info");
    serverInfo = info;
    renderInfo(info);
    settings.setDefaults(info.defaults, info.context_length);
    playground.setContextLength(info.context_length);
    if (!settingsRestored) settings.apply(info.defaults || {}, undefined);
    setConnected(true, `Connected: ${info.name}`);
  } catch (err) {
    $("#model-name").textContent = "Not connected";
    if (err.status !== 0) setConnected(true, `The server answered: ${err.message}`);
    banner.show(err.message, err);
    return;
  }
  try {
    const res = await getJSON("api/presets");
    presets = res.presets || [];
    const select = $("#preset-select");
    select.replaceChildren(el("option", { value: "" }, "Choose a preset…"));
    for (const p of presets) {
      select.append(el("option", { value: p.name, title: p.description || "" }, `${p.name}${p.kind === "chat" ? " (chat)" : ""}`));
    }
    const warn = $("#preset-warning");
    warn.hidden = !(res.errors && res.errors.length);
    warn.textContent = res.errors && res.errors.length ? `Some presets could not be loaded: ${res.errors.join("; ")}` : "";
  } catch (err) {
    banner.show(`Presets: ${err.message}`, err);
  }
}

// ---- start -----------------------------------------------------------------------------------

const settingsRestored = !!saved.settings;
settings.apply({}, []);
if (saved.settings) settings.restore(saved.settings);
if (saved.prompt) playground.editor.setText(saved.prompt);
if (saved.view) {
  playground.mono = saved.view.mono;
  playground.probColors = saved.view.probs;
  $("#advanced").open = !!saved.view.advanced;
}
if (saved.tokenizer) tokens.tokenizer = saved.tokenizer;
if (saved.tokensText) tokens.setText(saved.tokensText);
showTab(saved.tab || "playground", { focus: false });
if (saved.view && saved.view.next) playground.next.setOpen(true);
$("#advanced").addEventListener("toggle", () => remember());
window.addEventListener("pagehide", () => remember.flush()); // a reload right after a change keeps it
$("#next-toggle").addEventListener("change", () => remember());
loadServerData();

// ---- view code -------------------------------------------------------------------------------

const codeView = new CodeView({
  getInfo: () => serverInfo,
  current() {
    if (currentTab === "chat") {
      const messages = chat.messagesUpTo(path(chat.chat).at(-1));
      const pending = chat.input.value.trim();
      if (pending) messages.push({ role: "user", content: pending });
      return {
        kind: "chat",
        body: { messages, ...settings.request({ withStops: false }) },
        hint: "The conversation shown (with the message being written) and the current settings, as a request for the next reply.",
      };
    }
    return {
      kind: "completions",
      body: { prompt: playground.editor.text, ...settings.request({ withStops: true }) },
      hint: "The playground's text and the current settings, as a request for its continuation.",
    };
  },
});

// For debugging and tests.
window.gptjStudio = { playground, chat, tokens, settings, showTab, codeView };
