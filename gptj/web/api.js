// Talking to the server: JSON requests, server-sent-event streams and error messages.
// URLs are relative so the page also works behind a path prefix.

import { store } from "./util.js";

export class ApiError extends Error {
  constructor(message, status = 0, param = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.param = param;
  }
}

let apiKey = store.load().apiKey || "";

export function setApiKey(key) {
  apiKey = key || "";
  store.save({ apiKey });
}

export const hasApiKey = () => !!apiKey;

/** Every request tells the page whether the server answered: a "gptj:connection" event on
 * window with {ok, message}. Any answer, an error status included, means it is reachable. */
function connection(ok, message = "") {
  window.dispatchEvent(new CustomEvent("gptj:connection", { detail: { ok, message } }));
}

function headers(extra = {}) {
  const h = { "Content-Type": "application/json", ...extra };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  let param = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param ?? null;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(message, res.status, param);
}

export const UNREACHABLE = "Cannot reach the server: is `gptj serve` still running?";

async function send(url, options) {
  let res;
  try {
    res = await fetch(url, options);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    const error = new ApiError(UNREACHABLE, 0);
    connection(false, error.message);
    throw error;
  }
  connection(true);
  if (!res.ok) throw await errorOf(res);
  return res;
}

export async function getJSON(url, { signal } = {}) {
  const res = await send(url, { headers: headers(), signal });
  return res.json();
}

export async function postJSON(url, body, { signal } = {}) {
  const res = await send(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  return res.json();
}

/** POSTs `body` and yields each `data:` JSON object of the server-sent-event stream until
 * `[DONE]`. Aborting `signal` ends the request; the server then cancels the generation. */
export async function* streamEvents(url, body, signal) {
  const res = await send(url, {
    method: "POST",
    headers: headers({ Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError" || signal?.aborted) throw err;
        connection(false, UNREACHABLE);
        throw new ApiError(`The connection to the server broke off. ${UNREACHABLE}`, 0);
      }
      const { value, done } = chunk;
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        let obj;
        try {
          obj = JSON.parse(data);
        } catch {
          throw new ApiError(`The server sent something that is not JSON: ${data.slice(0, 120)}`);
        }
        if (obj && obj.error) throw new ApiError(obj.error.message || String(obj.error), 500, obj.error.param);
        yield obj;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

export const isAbort = (err) => err && err.name === "AbortError";
