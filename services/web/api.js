// The REST API from the page: the bearer key (kept for the tab only), JSON calls with clear
// errors, and the chat's server-sent events.

const KEY = "agentkit.key";
let askForKey = null; // set by the app: shows the key dialog, resolves when a key is given

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function setKeyPrompt(prompt) {
  askForKey = prompt;
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  forget: () => sessionStorage.removeItem(KEY),
};

function headers(extra = {}) {
  const token = key.get();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || message;
  } catch {
    // not JSON: the status says it
  }
  if (response.status === 413) message = `Too large: ${message}`;
  return new ApiError(response.status, message);
}

/** fetch() with the key; a 401 asks for a key (saying why) until one is accepted. */
export async function request(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.ok) return response;
    const error = await failure(response);
    if (response.status !== 401 || !askForKey) throw error;
    await askForKey(key.get() ? `That key was not accepted: ${error.message}` : "");
  }
}

export async function json(path, body, method = body === undefined ? "GET" : "POST") {
  const options = { method };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  const response = await request(path, options);
  return response.json();
}

export const del = (path) => json(path, undefined, "DELETE");

/**
 * The data of each server-sent event of a response, as it arrives. onBytes() is called when
 * each network chunk is read (the first one starts the paint timer).
 */
export async function* events(response, onBytes) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onBytes?.();
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

/**
 * Stream a chat completion: onDelta(text), onData(agentkit data) as they come. Resolves when the
 * stream ends; rejects with ApiError (an error before or inside the stream) or AbortError.
 */
export async function streamChat(body, { signal, onDelta, onData, onBytes }) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  for await (const data of events(response, onBytes)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message);
    const delta = chunk.choices?.[0]?.delta;
    if (chunk.agentkit) onData(chunk.agentkit);
    if (delta?.content) onDelta(delta.content);
  }
}
