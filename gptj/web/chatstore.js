// Conversations kept in the browser (localStorage), each a tree of messages: editing a message
// or asking again adds a sibling, so every alternative stays (‹ 2/3 ›). The conversation shown
// is one path through the tree: each message remembers which of its replies is selected.
//
// Export and import use `gptj chat`'s /save format: {"system": text or null, "messages":
// [{"role", "content"}, ...]} (the path shown, pretty-printed with two spaces, as /save writes it).

const INDEX_KEY = "gptj-studio:chats";
const CHAT_PREFIX = "gptj-studio:chat:";
export const ROLES = ["system", "user", "assistant"];
export const MAX_IMPORT_BYTES = 64 << 20; // as `gptj chat`'s /load
const MAX_MESSAGES = 10_000; // as gptj.chat_template.MAX_MESSAGES

const newId = () => `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;

export function newChat(system = "") {
  const now = Date.now();
  return { id: newId(), title: "", titled: false, created: now, updated: now, system,
    nodes: { root: { id: "root", children: [], sel: 0 } } };
}

/** The messages shown: from the root, each node's selected child. */
export function path(chat) {
  const out = [];
  let node = chat.nodes.root;
  while (node.children.length) {
    node = chat.nodes[node.children[Math.min(node.sel, node.children.length - 1)]];
    if (!node) break;
    out.push(node);
  }
  return out;
}

/** Adds a message under `parentId` (the root: "root") and selects it. */
export function addNode(chat, parentId, role, content, extra = {}) {
  const parent = chat.nodes[parentId];
  const node = { id: newId(), parent: parentId, role, content, children: [], sel: 0, ...extra };
  chat.nodes[node.id] = node;
  parent.children.push(node.id);
  parent.sel = parent.children.length - 1;
  touch(chat);
  return node;
}

/** Removes a message and everything under it; its parent selects a neighbour. */
export function removeNode(chat, id) {
  const node = chat.nodes[id];
  if (!node || id === "root") return;
  const parent = chat.nodes[node.parent];
  const i = parent.children.indexOf(id);
  parent.children.splice(i, 1);
  parent.sel = Math.max(0, Math.min(parent.sel >= i ? parent.sel - 1 : parent.sel, parent.children.length - 1));
  const drop = [id];
  while (drop.length) {
    const n = chat.nodes[drop.pop()];
    if (!n) continue;
    drop.push(...n.children);
    delete chat.nodes[n.id];
  }
  touch(chat);
}

/** [index (1-based), count] of a message among its siblings. */
export function siblings(chat, node) {
  const parent = chat.nodes[node.parent];
  return [parent.children.indexOf(node.id) + 1, parent.children.length];
}

/** Shows the sibling `step` places away (wrapping). */
export function switchSibling(chat, node, step) {
  const parent = chat.nodes[node.parent];
  const n = parent.children.length;
  parent.sel = (parent.children.indexOf(node.id) + step + n) % n;
  touch(chat);
}

export function touch(chat) {
  chat.updated = Date.now();
}

export function autoTitle(chat) {
  if (chat.titled) return;
  const first = path(chat).find((m) => m.role === "user");
  const line = first ? first.content.trim().split("\n")[0] : "";
  chat.title = line.length > 48 ? `${line.slice(0, 47).trimEnd()}…` : line;
}

export const titleOf = (chat) => chat.title || "New chat";

export const hasMessages = (chat) => chat.nodes.root.children.length > 0;

// ---- the CLI's format ----------------------------------------------------------------------------

/** What `gptj chat`'s /save writes for the conversation shown. */
export function toSaved(chat) {
  const system = chat.system && chat.system.trim() ? chat.system : null;
  return { system, messages: path(chat).map((m) => ({ role: m.role, content: m.content })) };
}

export const savedText = (chat) => JSON.stringify(toSaved(chat), null, 2);

/** A chat from a file in /save's format; throws an Error saying what is wrong (as /load). */
export function fromSaved(text, title = "") {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new Error(`not JSON: ${err.message}`);
  }
  if (!data || typeof data !== "object" || Array.isArray(data) || !Array.isArray(data.messages)) {
    throw new Error('not a saved conversation: expected {"system": ..., "messages": [...]}');
  }
  if (data.system !== undefined && data.system !== null && typeof data.system !== "string") {
    throw new Error("system: must be a string or null");
  }
  if (data.messages.length > MAX_MESSAGES) throw new Error(`messages: at most ${MAX_MESSAGES} messages`);
  data.messages.forEach((m, i) => {
    if (!m || typeof m !== "object" || Array.isArray(m)) throw new Error(`messages[${i}]: must be an object with a role and a content`);
    if (!ROLES.includes(m.role)) throw new Error(`messages[${i}].role: must be one of ${ROLES.join(", ")}`);
    if (typeof m.content !== "string") throw new Error(`messages[${i}].content: must be a string`);
  });
  const chat = newChat(data.system ?? "");
  let parent = "root";
  for (const m of data.messages) parent = addNode(chat, parent, m.role, m.content).id;
  chat.title = title;
  chat.titled = !!title;
  if (!title) autoTitle(chat);
  return chat;
}

// ---- storage -------------------------------------------------------------------------------------

/** localStorage that never throws; `save` returns false when the browser refused (full, off). */
export const chatStore = {
  list() {
    try {
      const list = JSON.parse(localStorage.getItem(INDEX_KEY) || "[]");
      return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string") : [];
    } catch {
      return [];
    }
  },
  load(id) {
    try {
      const chat = JSON.parse(localStorage.getItem(CHAT_PREFIX + id) || "null");
      return chat && chat.nodes && chat.nodes.root ? chat : null;
    } catch {
      return null;
    }
  },
  save(chat) {
    try {
      localStorage.setItem(CHAT_PREFIX + chat.id, JSON.stringify(chat));
      const entry = { id: chat.id, title: titleOf(chat), updated: chat.updated };
      const list = this.list().filter((c) => c.id !== chat.id);
      list.push(entry);
      list.sort((a, b) => b.updated - a.updated);
      localStorage.setItem(INDEX_KEY, JSON.stringify(list));
      return true;
    } catch {
      return false;
    }
  },
  remove(id) {
    try {
      localStorage.removeItem(CHAT_PREFIX + id);
      localStorage.setItem(INDEX_KEY, JSON.stringify(this.list().filter((c) => c.id !== id)));
    } catch {
      /* storage unavailable */
    }
  },
};
