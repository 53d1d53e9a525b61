// The chat: a list of messages, a composer, streaming replies from /v1/chat/completions.

import { isAbort, streamEvents } from "./api.js";
import { $, el } from "./util.js";

export class Chat {
  constructor({ settings, banner, onChange = () => {} }) {
    this.settings = settings;
    this.banner = banner;
    this.onChange = onChange;
    this.messages = []; // {role: "user" | "assistant", content}
    this.controller = null;
    this.botName = "Assistant";
    this.list = $("#chat-messages");
    this.empty = $("#chat-empty");
    this.input = $("#chat-input");
    this.system = $("#chat-system");
    this.status = $("#chat-status");
    this.buttons = { send: $("#chat-send"), stop: $("#chat-stop"), retry: $("#chat-retry"), reset: $("#chat-reset") };

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
    this.buttons.reset.addEventListener("click", () => this.reset());
    this.system.addEventListener("input", () => this.onChange());
    this.updateButtons();
    if (window.matchMedia("(max-width: 640px)").matches) $("#chat-system-box").open = false; // room for the messages
  }

  get busy() {
    return this.controller !== null;
  }

  autosize() {
    this.input.style.height = "auto";
    this.input.style.height = `${Math.min(this.input.scrollHeight + 2, 200)}px`;
  }

  updateButtons() {
    const busy = this.busy;
    this.buttons.send.disabled = busy;
    this.buttons.stop.disabled = !busy;
    this.buttons.retry.disabled = busy || !this.messages.some((m) => m.role === "user");
    this.buttons.reset.disabled = busy;
    this.empty.hidden = this.list.querySelector(".msg") !== null;
  }

  setSystem(text) {
    this.system.value = text || "";
    $("#chat-system-box").open = true;
    this.onChange();
  }

  reset() {
    if (this.busy) return;
    this.messages = [];
    this.list.replaceChildren(this.empty);
    this.status.textContent = "";
    this.updateButtons();
    this.input.focus();
  }

  bubble(role, content) {
    const body = el("div", { class: "msg-body" }, content);
    const node = el("div", { class: `msg ${role}`, "data-testid": `msg-${role}`, "data-role": role },
      el("div", { class: "msg-who" }, role === "user" ? "You" : this.botName), body);
    this.list.append(node);
    this.scrollDown(true);
    return body;
  }

  note(text, before = null) {
    const node = el("div", { class: "chat-note", "data-testid": "chat-note" }, text);
    this.list.insertBefore(node, before);
    return node;
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
    this.messages.push({ role: "user", content: text });
    this.bubble("user", text);
    this.reply();
  }

  retry() {
    if (this.busy) return;
    while (this.messages.length && this.messages[this.messages.length - 1].role === "assistant") this.messages.pop();
    if (!this.messages.length) return;
    // Drop what followed the last question (the reply, its notes) and ask again.
    const users = this.list.querySelectorAll(".msg.user");
    let node = users[users.length - 1]?.nextSibling;
    while (node) {
      const next = node.nextSibling;
      node.remove();
      node = next;
    }
    this.reply();
  }

  async reply() {
    this.banner.hide();
    const system = this.system.value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...this.messages];
    const body = { messages, ...this.settings.request({ withStops: false }) };
    const controller = new AbortController();
    this.controller = controller;
    const target = this.bubble("assistant", "");
    const node = target.parentElement;
    node.classList.add("streaming");
    this.updateButtons();
    this.status.textContent = "Thinking…";
    let text = "";
    let finish = null;
    try {
      for await (const chunk of streamEvents("v1/chat/completions", body, controller.signal)) {
        const dropped = chunk.gptj && chunk.gptj.dropped_messages;
        if (dropped > 0) {
          this.note(`${dropped} earlier message${dropped === 1 ? " was" : "s were"} left out to fit the context window`, node);
        }
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const piece = (choice.delta && choice.delta.content) || "";
        if (piece) {
          text += piece;
          target.textContent = text;
          this.status.textContent = "Writing…";
          this.scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (err) {
      if (isAbort(err)) finish = "stopped";
      else {
        finish = "error";
        this.banner.show(err.message, err);
      }
    } finally {
      this.controller = null;
      node.classList.remove("streaming");
    }
    if (text) {
      this.messages.push({ role: "assistant", content: text });
      if (finish === "stopped") node.append(el("div", { class: "msg-meta" }, "stopped"));
      else if (finish === "length") node.append(el("div", { class: "msg-meta" }, "cut off at max new tokens"));
    } else if (finish === "stop" || finish === "length") {
      node.append(el("div", { class: "msg-meta" }, "the model replied with nothing: try Retry"));
    } else {
      node.remove();
    }
    this.status.textContent = finish === "error" ? "" : finish === "stopped" ? "Stopped." : "";
    this.updateButtons();
    this.input.focus();
  }
}
