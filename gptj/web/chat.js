// The chat: conversations kept in the browser (chatstore.js), a list of them, messages that can
// be edited, asked again (every alternative stays: ‹ 2/3 ›) or continued, replies streamed from
// /v1/chat/completions and shown as Markdown (markdown.js) or as raw text.

import { isAbort, streamEvents } from "./api.js";
import {
  addNode, autoTitle, chatStore, fromSaved, hasMessages, MAX_IMPORT_BYTES, newChat, path, removeNode,
  savedText, siblings, switchSibling, titleOf, touch,
} from "./chatstore.js";
import { copyText, renderMarkdown } from "./markdown.js";
import { $, debounce, el, store } from "./util.js";

const WHO = { user: "You", system: "System" };
const FINISH_NOTE = {
  stopped: "stopped",
  length: "cut off at max new tokens: Continue asks for more",
  empty: "the model replied with nothing: try Retry",
  edited: "edited",
};

export class Chat {
  constructor({ settings, banner, onChange = () => {}, initialSystem = "" }) {
    this.settings = settings;
    this.banner = banner;
    this.onChange = onChange;
    this.controller = null;
    this.streaming = null; // {node, body, bubble} while a reply streams
    this.editing = null; // id of the message being edited
    this.botName = "Assistant";
    this.list = $("#chat-messages");
    this.empty = $("#chat-empty");
    this.input = $("#chat-input");
    this.system = $("#chat-system");
    this.status = $("#chat-status");
    this.chatList = $("#chat-list");
    this.markdown = $("#chat-markdown");
    this.buttons = {
      send: $("#chat-send"), stop: $("#chat-stop"), retry: $("#chat-retry"), cont: $("#chat-continue"),
      reset: $("#chat-reset"), import: $("#chat-import"),
    };
    this.saveSoon = debounce(() => this.save(), 800);

    $("#chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    this.input.addEventListener("input", () => this.autosize());
    this.buttons.stop.addEventListener("click", () => this.stop());
    this.buttons.retry.addEventListener("click", () => this.retry());
    this.buttons.cont.addEventListener("click", () => this.continueLast());
    this.buttons.reset.addEventListener("click", () => this.reset());
    this.buttons.import.addEventListener("click", () => $("#chat-import-file").click());
    $("#chat-import-file").addEventListener("change", (e) => {
      const file = e.target.files && e.target.files[0];
      e.target.value = "";
      if (file) this.importFile(file);
    });
    this.system.addEventListener("input", () => {
      this.chat.system = this.system.value;
      touch(this.chat);
      this.saveSoon();
      this.onChange();
    });
    const saved = store.load();
    this.markdown.checked = saved.chatMarkdown !== false;
    this.markdown.addEventListener("change", () => {
      store.save({ chatMarkdown: this.markdown.checked });
      this.renderMessages({ keepScroll: true });
    });
    window.addEventListener("pagehide", () => {
      if (!this.busy) this.save(); // the system prompt's pending save (a reply in flight saved what came)
    });
    window.addEventListener("storage", (e) => {
      if (e.key === "gptj-studio:chats") this.renderList();
    });
    if (window.matchMedia("(max-width: 640px)").matches) $("#chat-system-box").open = false; // room for the messages

    this.chat = (saved.chatId && chatStore.load(saved.chatId)) || null;
    if (!this.chat) {
      const recent = chatStore.list()[0];
      this.chat = (recent && chatStore.load(recent.id)) || newChat(initialSystem);
    }
    this.show();
  }

  get busy() {
    return this.controller !== null;
  }

  /** The messages sent to the model: the system prompt and the path shown up to `last`. */
  messagesUpTo(last) {
    const out = [];
    const system = this.chat.system.trim();
    if (system) out.push({ role: "system", content: system });
    for (const m of path(this.chat)) {
      if (!(m.role === "assistant" && !m.content)) out.push({ role: m.role, content: m.content });
      if (m === last) break;
    }
    return out;
  }

  autosize(area = this.input, max = 200) {
    area.style.height = "auto";
    area.style.height = `${Math.min(area.scrollHeight + 2, max)}px`;
  }

  updateButtons() {
    const busy = this.busy;
    const last = path(this.chat).at(-1);
    this.buttons.send.disabled = busy;
    this.buttons.stop.disabled = !busy;
    this.buttons.retry.disabled = busy || !last;
    this.buttons.cont.disabled = busy || !(last && last.role === "assistant" && last.content);
    this.buttons.reset.disabled = busy;
    this.buttons.import.disabled = busy;
    this.empty.hidden = this.list.querySelector(".msg") !== null;
    $("#panel-chat").classList.toggle("busy", busy);
  }

  setSystem(text) {
    this.system.value = text || "";
    this.chat.system = this.system.value;
    touch(this.chat);
    this.save();
    $("#chat-system-box").open = true;
    this.onChange();
  }

  // ---- conversations ---------------------------------------------------------------------------

  save() {
    this.saveSoon.cancel?.();
    if (!hasMessages(this.chat) && !this.chat.system) {
      chatStore.remove(this.chat.id); // an empty chat is not worth a row in the list
      this.renderList();
      return;
    }
    if (!chatStore.save(this.chat)) {
      this.banner.show("This browser refused to store the conversation (storage full or turned off): export it to keep it.");
    }
    store.save({ chatId: this.chat.id });
    this.renderList();
  }

  /** Shows the current chat: its system prompt, messages and the list. */
  show() {
    this.editing = null;
    this.system.value = this.chat.system || "";
    store.save({ chatId: this.chat.id });
    this.renderMessages();
    this.renderList();
    this.status.textContent = "";
  }

  open(id) {
    if (this.busy || id === this.chat.id) return;
    const chat = chatStore.load(id);
    if (!chat) {
      this.renderList();
      return;
    }
    if (!hasMessages(this.chat)) chatStore.remove(this.chat.id);
    this.chat = chat;
    this.show();
    this.onChange();
  }

  /** A new, empty conversation (the system prompt carries over); the old one stays in the list. */
  reset() {
    if (this.busy) return;
    if (hasMessages(this.chat)) {
      this.save();
      this.chat = newChat(this.chat.system);
    }
    this.input.value = "";
    this.autosize();
    this.show();
    this.input.focus();
    this.onChange();
  }

  remove(id) {
    if (this.busy) return;
    const entry = chatStore.list().find((c) => c.id === id);
    const title = entry ? entry.title : titleOf(this.chat);
    if (!window.confirm(`Delete the chat “${title}”? This cannot be undone (export it first to keep a copy).`)) return;
    chatStore.remove(id);
    if (id === this.chat.id) {
      const next = chatStore.list()[0];
      this.chat = (next && chatStore.load(next.id)) || newChat(this.chat.system);
      this.show();
    } else {
      this.renderList();
    }
    this.onChange();
  }

  rename(id, title) {
    const chat = id === this.chat.id ? this.chat : chatStore.load(id);
    if (!chat) return;
    chat.title = title.trim();
    chat.titled = !!chat.title;
    if (!chat.titled) autoTitle(chat);
    if (chat === this.chat) this.save();
    else chatStore.save(chat);
    this.renderList();
  }

  exportChat(id) {
    const chat = id === this.chat.id ? this.chat : chatStore.load(id);
    if (!chat) return;
    const name = `${titleOf(chat).replace(/[\\/:*?"<>|\u0000-\u001f]+/g, " ").trim().slice(0, 60) || "chat"}.json`;
    const url = URL.createObjectURL(new Blob([savedText(chat)], { type: "application/json" }));
    const a = el("a", { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  async importFile(file) {
    if (this.busy) return;
    try {
      if (file.size > MAX_IMPORT_BYTES) throw new Error(`over the limit of ${MAX_IMPORT_BYTES} bytes`);
      const chat = fromSaved(await file.text(), file.name.replace(/\.json$/i, ""));
      if (!hasMessages(this.chat)) chatStore.remove(this.chat.id);
      this.chat = chat;
      this.save();
      this.show();
      this.banner.hide();
      this.onChange();
    } catch (err) {
      this.banner.show(`Could not import ${file.name}: ${err.message}`);
    }
  }

  renderList() {
    const rows = chatStore.list();
    if (!rows.some((c) => c.id === this.chat.id)) rows.unshift({ id: this.chat.id, title: titleOf(this.chat) });
    this.chatList.replaceChildren(...rows.map((c) => this.listItem(c)));
  }

  listItem(c) {
    const current = c.id === this.chat.id;
    const title = current ? titleOf(this.chat) : c.title || "New chat";
    const open = el("button", { type: "button", class: "chat-open", "data-testid": "chat-item-title", title, disabled: this.busy && !current },
      title);
    open.addEventListener("click", () => this.open(c.id));
    const tool = (label, testid, glyph, fn) => {
      const b = el("button", { type: "button", class: "icon", title: label, "aria-label": label, "data-testid": testid, disabled: this.busy }, glyph);
      b.addEventListener("click", fn);
      return b;
    };
    const item = el("li", { class: `chat-item${current ? " active" : ""}`, "data-testid": "chat-item", "data-id": c.id },
      open,
      el("span", { class: "chat-tools" },
        tool("Rename", "chat-rename", "✎", () => this.startRename(item, c.id, title)),
        tool("Export as JSON (the format of gptj chat's /save and /load)", "chat-export", "⤓", () => this.exportChat(c.id)),
        tool("Delete", "chat-delete", "×", () => this.remove(c.id))));
    if (current) item.setAttribute("aria-current", "true");
    return item;
  }

  startRename(item, id, title) {
    const input = el("input", { type: "text", class: "chat-rename-input", "data-testid": "chat-rename-input", value: title,
      "aria-label": "Chat name", maxLength: 120 });
    let done = false;
    const finish = (commit) => {
      if (done) return;
      done = true;
      if (commit) this.rename(id, input.value);
      else this.renderList();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        finish(true);
      } else if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    item.querySelector(".chat-open").replaceWith(input);
    input.focus();
    input.select();
  }

  // ---- messages --------------------------------------------------------------------------------

  renderMessages({ keepScroll = false } = {}) {
    const top = this.list.scrollTop;
    const nodes = [];
    const shown = path(this.chat);
    for (const m of shown) {
      if (m.dropped > 0) {
        nodes.push(el("div", { class: "chat-note", "data-testid": "chat-note" },
          `${m.dropped} earlier message${m.dropped === 1 ? " was" : "s were"} left out to fit the context window`));
      }
      nodes.push(this.bubble(m));
    }
    nodes.at(-1)?.classList.add("last");
    this.list.replaceChildren(this.empty, ...nodes);
    if (keepScroll) this.list.scrollTop = top;
    else this.scrollDown(true);
    this.updateButtons();
  }

  bubble(m) {
    const body = el("div", { class: "msg-body" });
    this.fillBody(body, m);
    const node = el("div", { class: `msg ${m.role}`, "data-testid": `msg-${m.role}`, "data-role": m.role, "data-id": m.id },
      el("div", { class: "msg-who" }, m.role === "assistant" ? this.botName : WHO[m.role] || m.role), body);
    if (FINISH_NOTE[m.finish]) node.append(el("div", { class: "msg-meta", "data-testid": "msg-meta" }, FINISH_NOTE[m.finish]));
    node.append(this.tools(m));
    return node;
  }

  fillBody(body, m) {
    const md = m.role === "assistant" && this.markdown.checked;
    body.classList.toggle("md", md);
    if (md) renderMarkdown(body, m.content);
    else body.textContent = m.content;
  }

  tools(m) {
    const [index, count] = siblings(this.chat, m);
    const last = path(this.chat).at(-1) === m;
    const busy = this.busy;
    const button = (label, testid, fn, title = label) => {
      const b = el("button", { type: "button", class: "tool", "data-testid": testid, title, "aria-label": title, disabled: busy }, label);
      b.addEventListener("click", fn);
      return b;
    };
    const bar = el("div", { class: "msg-tools" });
    if (count > 1) {
      bar.append(el("span", { class: "branch", "data-testid": "msg-branches" },
        button("‹", "msg-prev", () => this.switchTo(m, -1), "Previous version"),
        el("span", { class: "branch-pos", "data-testid": "msg-branch" }, `${index}/${count}`),
        button("›", "msg-next", () => this.switchTo(m, 1), "Next version")));
    }
    bar.append(button("Copy", "msg-copy", (e) => copyText(m.content, e.currentTarget), "Copy the text"));
    bar.append(button("Edit", "msg-edit", () => this.startEdit(m),
      m.role === "user" ? "Edit this message and ask again (the old version stays: ‹ ›)" : "Edit this message (the old version stays: ‹ ›)"));
    if (m.role === "assistant") {
      bar.append(button("Retry", "msg-retry", () => this.reply(m.parent), "Ask for this reply again (the old one stays: ‹ ›)"));
      if (last && m.content) bar.append(button("Continue", "msg-continue", () => this.continueLast(), "Ask the model for more of this reply"));
    }
    return bar;
  }

  switchTo(m, step) {
    if (this.busy) return;
    switchSibling(this.chat, m, step);
    this.save();
    this.renderMessages({ keepScroll: true });
  }

  startEdit(m) {
    if (this.busy) return;
    const bubble = this.list.querySelector(`.msg[data-id="${CSS.escape(m.id)}"]`);
    if (!bubble) return;
    this.editing = m.id;
    const area = el("textarea", { class: "msg-edit", "data-testid": "msg-edit-input", value: m.content, rows: 2, "aria-label": "Edit the message" });
    const save = el("button", { type: "submit", class: "btn small primary", "data-testid": "msg-edit-save" }, m.role === "user" ? "Send" : "Save");
    const cancel = el("button", { type: "button", class: "btn small", "data-testid": "msg-edit-cancel" }, "Cancel");
    const form = el("form", { class: "msg-edit-form" }, area, el("div", { class: "msg-edit-buttons" }, cancel, save));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.finishEdit(m, area.value);
    });
    cancel.addEventListener("click", () => this.renderMessages({ keepScroll: true }));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        e.stopPropagation();
        this.finishEdit(m, area.value);
      } else if (e.key === "Escape") {
        e.preventDefault();
        e.stopPropagation();
        this.renderMessages({ keepScroll: true });
      }
    });
    area.addEventListener("input", () => this.autosize(area, 400));
    bubble.classList.add("editing");
    bubble.querySelector(".msg-body").replaceWith(form);
    bubble.querySelector(".msg-tools")?.remove();
    bubble.querySelector(".msg-meta")?.remove();
    this.autosize(area, 400);
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  /** An edited user message is a new version that gets a new reply; an edited reply is a new
   * version of the reply. The old versions stay (‹ ›). */
  finishEdit(m, text) {
    if (this.busy || !this.chat.nodes[m.id]) return;
    this.editing = null;
    if (m.role === "user") {
      if (!text.trim()) return;
      if (text === m.content) {
        this.reply(m.id);
        return;
      }
      const node = addNode(this.chat, m.parent, "user", text);
      autoTitle(this.chat);
      this.save();
      this.reply(node.id);
      return;
    }
    if (text !== m.content) {
      addNode(this.chat, m.parent, m.role, text, { finish: "edited" });
      this.save();
    }
    this.renderMessages({ keepScroll: true });
  }

  scrollDown(force = false) {
    const l = this.list;
    if (force || l.scrollHeight - l.scrollTop - l.clientHeight < 60) l.scrollTop = l.scrollHeight;
  }

  stop() {
    this.controller?.abort();
  }

  send() {
    if (this.busy) return;
    const text = this.input.value.trim();
    if (!text) return;
    this.input.value = "";
    this.autosize();
    const last = path(this.chat).at(-1);
    const node = addNode(this.chat, last ? last.id : "root", "user", text);
    autoTitle(this.chat);
    this.save();
    this.reply(node.id);
  }

  /** Asks again for the last reply (a new version beside it), or for a reply to a last
   * message that has none. */
  retry() {
    if (this.busy) return;
    const last = path(this.chat).at(-1);
    if (!last) return;
    this.reply(last.role === "assistant" ? last.parent : last.id);
  }

  continueLast() {
    if (this.busy) return;
    const last = path(this.chat).at(-1);
    if (last && last.role === "assistant" && last.content) this.reply(last.parent, { cont: last });
  }

  /** Streams a reply to the conversation up to `parentId` into a new version under it, or, with
   * `cont`, more of that reply: the server continues the reply itself (vLLM's
   * continue_final_message: the reply is left open, no end-of-turn after it), so the text that
   * comes is added to it as it is, spaces included. */
  async reply(parentId, { cont = null } = {}) {
    if (this.busy) return;
    this.banner.hide();
    const chat = this.chat;
    const node = cont || addNode(chat, parentId, "assistant", "", { finish: null });
    const messages = cont ? this.messagesUpTo(cont) : this.messagesUpTo(chat.nodes[parentId]);
    const body = { messages, ...this.settings.request({ withStops: false }) };
    // add_generation_prompt too: vLLM (behind --upstream) wants it false with continue_final_message
    if (cont) Object.assign(body, { continue_final_message: true, add_generation_prompt: false });
    const base = node.content;
    const previousFinish = node.finish;
    node.finish = null;
    const controller = new AbortController();
    this.controller = controller;
    this.renderMessages();
    const bubble = this.list.querySelector(`.msg[data-id="${CSS.escape(node.id)}"]`);
    const target = bubble.querySelector(".msg-body");
    bubble.classList.add("streaming");
    this.status.textContent = cont ? "Continuing…" : "Thinking…";
    this.renderList();
    let text = "";
    let finish = null;
    let frame = 0;
    let savedAt = performance.now();
    const paint = () => {
      frame = 0;
      this.fillBody(target, node);
      this.scrollDown();
    };
    try {
      for await (const chunk of streamEvents("v1/chat/completions", body, controller.signal)) {
        if (controller.signal.aborted) break;
        const dropped = chunk.gptj && chunk.gptj.dropped_messages;
        if (dropped > 0 && !node.dropped) {
          node.dropped = dropped;
          const note = el("div", { class: "chat-note", "data-testid": "chat-note" },
            `${dropped} earlier message${dropped === 1 ? " was" : "s were"} left out to fit the context window`);
          this.list.insertBefore(note, bubble);
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          text += piece;
          node.content = base + text;
          this.status.textContent = cont ? "Continuing…" : "Writing…";
          if (!frame) frame = requestAnimationFrame(paint);
          if (performance.now() - savedAt > 1000) {
            savedAt = performance.now();
            this.save(); // a reload while it streams keeps what came
          }
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (controller.signal.aborted) finish = "stopped";
    } catch (err) {
      if (isAbort(err)) finish = "stopped";
      else {
        finish = "error";
        this.banner.show(err.message, err);
      }
    } finally {
      this.controller = null;
      if (frame) cancelAnimationFrame(frame);
    }
    if (cont) {
      node.finish = text ? (finish === "stopped" || finish === "length" ? finish : null) : previousFinish;
    } else if (text) {
      node.finish = finish === "stopped" || finish === "length" ? finish : null;
    } else if (finish === "stop" || finish === "length") {
      node.finish = "empty";
    } else {
      removeNode(chat, node.id); // stopped before any text, or failed: as if never asked
    }
    touch(chat);
    this.save();
    this.renderMessages({ keepScroll: true });
    this.scrollDown();
    this.status.textContent = finish === "stopped" ? "Stopped." : "";
    this.input.focus();
  }
}
