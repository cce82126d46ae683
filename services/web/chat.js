// The chat: agent picker, streamed answers with Stop, citations and the sources panel, PAL
// programs and ReAct steps, thumbs and comments, regenerate and "which is better", and the
// conversations kept on the server.

import { ApiError, del, json, streamChat } from "./api.js";
import { clear, h, when } from "./dom.js";
import { highlightPython } from "./highlight.js";
import { renderMarkdown } from "./markdown.js";

const state = {
  conversationId: null,
  turns: [],
  controller: null,
  selected: null, // the answer whose sources are shown
};
let ui = null;
let labeler = () => "";
let notify = () => {};

export function mountChat(root, { models, labelerName, showError }) {
  labeler = labelerName;
  notify = showError;
  const agent = h("select#agent", { "aria-label": "Agent" });
  for (const model of models) {
    agent.append(h("option", { value: model.id }, model.id === model.served ? `${model.id} (model as it is)` : model.id));
  }
  const prompt = h("textarea#prompt", {
    rows: 2,
    placeholder: "Ask a question (Enter sends, Shift+Enter: new line)",
    "aria-label": "Question",
  });
  const send = h("button#send.primary", { type: "submit" }, "Send");
  const stop = h("button#stop", { type: "button", hidden: true }, "Stop");
  const form = h("form.composer", agent, prompt, send, stop);
  ui = {
    agent,
    prompt,
    send,
    stop,
    log: h("div#messages", { "aria-live": "polite" }),
    list: h("ul#conversations"),
    sources: h("div#sources-body"),
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    ask(prompt.value);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ask(prompt.value);
    }
  });
  stop.addEventListener("click", () => state.controller?.abort());
  const newChat = h("button#new-chat", { type: "button", on: { click: () => reset() } }, "New chat");
  clear(
    root,
    h("aside.conversations", newChat, h("h2", "Conversations"), ui.list),
    h("div.chat-main", ui.log, form),
    h("aside.sources", { "aria-label": "Sources" }, h("h2", "Sources"), ui.sources),
  );
  reset();
  refreshConversations();
}

function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function reset() {
  state.controller?.abort();
  state.conversationId = null;
  state.turns = [];
  clear(ui.log, h("p.empty.muted", "Ask about your documents, or pick an agent first."));
  showSources(null);
  markCurrent();
  ui.prompt.focus();
}

// --- asking -------------------------------------------------------------------------------

function ask(text) {
  const question = text.trim();
  if (!question || state.controller) return;
  ui.prompt.value = "";
  if (!state.conversationId) {
    state.conversationId = newId();
    ui.log.replaceChildren();
  }
  const turn = addTurn(question);
  const answer = addAnswer(turn, ui.agent.value);
  run(answer, {
    model: answer.agent,
    messages: [{ role: "user", content: question }],
    conversation_id: state.conversationId,
  }).then(() => refreshConversations());
}

/** Another answer to the same prompt; the earlier ones stay, and the page asks which is better. */
function regenerate(turn) {
  if (state.controller) return;
  const before = state.turns.slice(0, state.turns.indexOf(turn)).flatMap((t) => {
    const first = t.answers.find((a) => a.text);
    return first ? [{ role: "user", content: t.prompt }, { role: "assistant", content: first.text }] : [];
  });
  const answer = addAnswer(turn, ui.agent.value);
  // Not in the conversation's history on the server: the first answer stays the one it keeps.
  run(answer, { model: answer.agent, messages: [...before, { role: "user", content: turn.prompt }] });
}

async function run(answer, body) {
  const controller = new AbortController();
  state.controller = controller;
  streaming(true);
  let firstBytes = false;
  try {
    await streamChat(body, {
      signal: controller.signal,
      onBytes: () => {
        if (!firstBytes) performance.mark("agentkit:first-byte");
        firstBytes = true;
      },
      onDelta: (text) => {
        answer.text += text;
        schedule(answer);
      },
      onData: (data) => {
        merge(answer, data);
        schedule(answer);
      },
    });
    answer.status = "done";
  } catch (error) {
    if (error.name === "AbortError") answer.status = "stopped";
    else {
      answer.status = "error";
      answer.error = error.message;
      if (error instanceof ApiError && error.status === 401) notify(error.message);
    }
  } finally {
    state.controller = null;
    streaming(false);
    paint(answer);
    finish(answer);
  }
}

function streaming(on) {
  ui.send.disabled = on;
  ui.stop.hidden = !on;
  if (!on) ui.prompt.focus();
}

function merge(answer, data) {
  if (data.citations) {
    answer.citations = data.citations;
    answer.invalid = data.invalid_citations || [];
    answer.answered = data.answered;
    if (!state.selected || state.selected === answer) showSources(answer);
  }
  if (data.pal) answer.pal = data.pal;
  if (data.step) answer.steps.push(data.step);
  if (data.react) answer.react = data.react;
}

// --- turns and answers --------------------------------------------------------------------

function addTurn(prompt) {
  const turn = { prompt, answers: [], preference: null };
  turn.answersEl = h("div.answers");
  turn.actions = h("div.turn-actions");
  turn.el = h("section.turn", h("div.question", h("span.who", "You"), h("div.text", prompt)), turn.answersEl, turn.actions);
  state.turns.push(turn);
  ui.log.append(turn.el);
  return turn;
}

function addAnswer(turn, agent, text = "", status = "streaming") {
  const answer = { turn, agent, text, status, steps: [], citations: null, invalid: [], answered: null };
  answer.number = turn.answers.length + 1;
  answer.main = h("div.answer-main");
  answer.controls = h("div.answer-controls");
  answer.el = h("article.answer", { dataset: { status } }, answer.main, answer.controls);
  answer.el.addEventListener("click", () => answer.citations && showSources(answer));
  turn.answers.push(answer);
  turn.answersEl.append(answer.el);
  turn.answersEl.classList.toggle("several", turn.answers.length > 1);
  paint(answer);
  answer.el.scrollIntoView({ block: "end" });
  return answer;
}

function schedule(answer) {
  if (answer.frame) return;
  answer.frame = requestAnimationFrame(() => {
    answer.frame = 0;
    const log = ui.log;
    const following = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    paint(answer);
    if (following) log.scrollTop = log.scrollHeight; // keep up with the answer, unless scrolled away
    if (answer.text && !answer.painted) {
      answer.painted = true;
      performance.mark("agentkit:first-paint");
    }
  });
}

function paint(answer) {
  const label = { streaming: "answering…", stopped: "stopped", error: "failed", done: "" }[answer.status];
  answer.el.dataset.status = answer.status;
  const parts = [
    h("header", h("span.agent", answer.agent || "answer"), answer.turn.answers.length > 1 ? h("span.number", `#${answer.number}`) : null, label ? h("span.status", label) : null),
  ];
  if (answer.pal) parts.push(palView(answer.pal));
  if (answer.steps.length) parts.push(stepsView(answer.steps, answer.status === "streaming" && !answer.text));
  const citing = answer.citations !== null || answer.agent === "agentkit-rag";
  const body = h("div.body", renderMarkdown(answer.text, citing ? (n) => chip(answer, n) : undefined));
  if (answer.status === "streaming" && !answer.text) body.append(h("span.typing", "…"));
  parts.push(body);
  if (answer.react?.fallback) parts.push(h("p.note.fallback", "The ReAct agent reached its step limit; RAG answered instead."));
  if (answer.answered === false) parts.push(h("p.note.no-answer", "The sources do not contain the answer."));
  if (answer.invalid.length) {
    parts.push(h("p.note.invalid", `Removed citations to sources that do not exist: ${answer.invalid.map((n) => `[${n}]`).join(" ")}`));
  }
  if (answer.error) parts.push(h("p.note.error", answer.error));
  clear(answer.main, parts);
}

function chip(answer, n) {
  const known = answer.citations === null ? null : answer.citations.some((c) => c.number === n);
  const button = h("button.cite", { type: "button", dataset: { n } }, String(n));
  if (known === false) {
    button.classList.add("invalid");
    button.title = `[${n}] names no source of this answer`;
  } else button.title = `Show source [${n}]`;
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    showSources(answer, n);
  });
  return button;
}

function palView(pal) {
  const result = pal.error
    ? h("p.pal-error", h("strong", pal.error_type || "error"), ": ", pal.error)
    : h("p.pal-result", h("strong", "Result: "), h("code", JSON.stringify(pal.answer)));
  return h(
    "details.pal",
    { open: true },
    h("summary", "Program", pal.repaired ? h("span.badge", "repaired") : null, pal.samples > 1 ? h("span.badge", `${pal.samples} samples`) : null),
    h("pre", highlightPython(pal.program || "")),
    result,
    pal.stdout ? h("div.stdout", h("span.muted", "stdout"), h("pre", pal.stdout)) : null,
  );
}

function stepsView(steps, running) {
  const list = h("ol.steps");
  for (const step of steps) {
    const action = `${step.action}[${step.argument}]`;
    list.append(
      h(
        "li.step",
        step.thought ? h("p", h("span.label", "Thought"), step.thought) : null,
        h("p", h("span.label", "Action"), h("code", action), step.parse_failed ? h("span.badge.warn", "could not parse") : null),
        step.observation ? h("p.observation", h("span.label", "Observation"), step.observation) : null,
        step.tool_error ? h("span.badge.warn", "tool error") : null,
      ),
    );
  }
  if (running) list.append(h("li.step.muted", "thinking…"));
  return list;
}

// --- the sources panel --------------------------------------------------------------------

function showSources(answer, n = null) {
  state.selected = answer;
  for (const el of document.querySelectorAll(".answer.selected")) el.classList.remove("selected");
  if (!answer) {
    clear(ui.sources, h("p.muted", "Citations of the selected answer show here."));
    return;
  }
  answer.el.classList.add("selected");
  if (!answer.citations?.length) {
    const why = answer.citations === null ? "No sources were kept for this answer." : "This answer cites no source.";
    clear(ui.sources, h("p.muted", why));
    return;
  }
  const cards = answer.citations.map((c) => {
    const heading = c.heading?.startsWith(`${c.title} > `) ? c.heading.slice(c.title.length + 3) : c.heading;
    const place = [c.title, heading && heading !== c.title ? heading.replaceAll(" > ", " › ") : ""].filter(Boolean).join(" › ");
    // path:line, with the path as the index knows it (relative), not the server's
    const location = c.path && c.location.startsWith(c.path) ? c.source + c.location.slice(c.path.length) : c.location;
    const card = h(
      "article.source",
      { dataset: { n: c.number } },
      h("h3", h("span.cite", String(c.number)), place || c.source),
      h("p.location", h("code", location)),
      h("div.source-text", c.text),
    );
    if (c.number === n) card.classList.add("focused");
    return card;
  });
  clear(ui.sources, cards);
  ui.sources.querySelector(".focused")?.scrollIntoView({ block: "nearest" });
}

// --- feedback -----------------------------------------------------------------------------

function finish(answer) {
  if (answer.text && answer.status !== "error") clear(answer.controls, feedbackControls(answer));
  turnActions(answer.turn);
}

function turnActions(turn) {
  const again = () => state.controller === null && regenerate(turn);
  clear(turn.actions, h("button.regenerate", { type: "button", on: { click: again } }, "Regenerate"), preference(turn));
}

function feedbackControls(answer) {
  const status = h("span.saved.muted", { role: "status" });
  const comment = h("textarea.comment", { rows: 2, placeholder: "What was good or wrong? (optional)", "aria-label": "Comment" });
  const save = h("button", { type: "submit" }, "Save comment");
  const form = h("form.comment-form", { hidden: true }, comment, save);
  const up = h("button.thumb.up", { type: "button", title: "Good answer", "aria-label": "Good answer", "aria-pressed": "false" }, thumb());
  const down = h("button.thumb.down", { type: "button", title: "Bad answer", "aria-label": "Bad answer", "aria-pressed": "false" }, thumb());
  const rate = async (rating) => {
    try {
      if (answer.feedbackId) {
        await json(`/v1/labeling/feedback/${answer.feedbackId}`, { rating }, "PATCH");
      } else {
        const saved = await json("/v1/labeling/feedback", {
          prompt: answer.turn.prompt,
          completion: answer.text,
          rating,
          labeler: labeler() || undefined,
          agent: answer.agent || undefined,
        });
        answer.feedbackId = saved.id;
      }
      up.setAttribute("aria-pressed", String(rating === 1));
      down.setAttribute("aria-pressed", String(rating === -1));
      status.textContent = "Thanks, saved.";
      form.hidden = false;
      comment.focus();
    } catch (error) {
      status.textContent = `Not saved: ${error.message}`;
    }
  };
  up.addEventListener("click", () => rate(1));
  down.addEventListener("click", () => rate(-1));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await json(`/v1/labeling/feedback/${answer.feedbackId}`, { comment: comment.value }, "PATCH");
      status.textContent = "Comment saved.";
      form.hidden = true;
    } catch (error) {
      status.textContent = `Comment not saved: ${error.message}`;
    }
  });
  return [up, down, status, form];
}

function thumb() {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", "M7 10v11H3V10h4zm2 11h8.5a2 2 0 0 0 2-1.6l1.4-7A2 2 0 0 0 19 10h-5l.8-4.2A1.8 1.8 0 0 0 11.5 5L9 10v11z");
  svg.append(path);
  return svg;
}

function preference(turn) {
  const answers = turn.answers.filter((a) => a.text && a.status !== "error" && a.status !== "streaming");
  if (answers.length < 2) return null;
  if (turn.preference) return h("p.preference.saved", turn.preference);
  const texts = new Set(answers.map((a) => a.text.trim()));
  if (texts.size < answers.length) return h("p.preference.muted", "Some answers are the same; regenerate for another one to compare.");
  const status = h("span.muted", { role: "status" });
  const store = async (best) => {
    const ranked = best ? [best, ...answers.filter((a) => a !== best)] : answers;
    const rest = ranked.slice(best ? 1 : 0).map((a) => a.text);
    const agents = new Set(answers.map((a) => a.agent));
    try {
      await json("/v1/labeling/feedback", {
        prompt: turn.prompt,
        ranking: ranked.map((a) => a.text),
        ties: rest.length > 1 ? [rest] : undefined,
        labeler: labeler() || undefined,
        agent: agents.size === 1 ? [...agents][0] : undefined,
      });
      turn.preference = best ? `Saved: #${best.number} is better.` : "Saved: a tie.";
      turnActions(turn);
    } catch (error) {
      status.textContent = `Not saved: ${error.message}`;
    }
  };
  return h(
    "div.preference",
    h("span", "Which answer is better?"),
    answers.map((a) => h("button", { type: "button", on: { click: () => store(a) } }, `#${a.number}`)),
    h("button", { type: "button", on: { click: () => store(null) } }, "Tie"),
    status,
  );
}

// --- conversations ------------------------------------------------------------------------

async function refreshConversations() {
  let found;
  try {
    found = (await json("/v1/conversations")).data;
  } catch (error) {
    clear(ui.list, h("li.muted", error.status === 404 ? "Conversations are not kept on this server." : error.message));
    return;
  }
  clear(
    ui.list,
    found.length ? null : h("li.muted", "None yet."),
    found.map((c) =>
      h(
        "li",
        { dataset: { id: c.id } },
        h("button.open", { type: "button", title: when(c.updated), on: { click: () => reopen(c.id) } }, c.title || "(untitled)"),
        h("button.delete", { type: "button", title: "Delete this conversation", "aria-label": `Delete ${c.title}`, on: { click: () => remove(c) } }, "×"),
      ),
    ),
  );
  markCurrent();
}

function markCurrent() {
  for (const li of ui.list.querySelectorAll("li[data-id]")) {
    li.classList.toggle("current", li.dataset.id === state.conversationId);
  }
}

async function reopen(id) {
  if (state.controller) return;
  let messages;
  try {
    messages = (await json(`/v1/conversations/${encodeURIComponent(id)}`)).messages;
  } catch (error) {
    notify(error.message);
    return refreshConversations();
  }
  reset();
  state.conversationId = id;
  ui.log.replaceChildren();
  let turn = null;
  for (const message of messages) {
    if (message.role === "user") turn = addTurn(message.content);
    else if (message.role === "assistant" && turn) {
      // the agent and what it showed (citations, program, steps) come back as they streamed
      const answer = addAnswer(turn, message.agent || "", message.content, "done");
      const { steps = [], ...shown } = message.agentkit || {};
      for (const step of steps) merge(answer, { step });
      merge(answer, shown);
      paint(answer);
      finish(answer);
    }
  }
  markCurrent();
}

async function remove(conversation) {
  if (!confirm(`Delete the conversation “${conversation.title}”?`)) return;
  try {
    await del(`/v1/conversations/${encodeURIComponent(conversation.id)}`);
  } catch (error) {
    notify(error.message);
  }
  if (conversation.id === state.conversationId) reset();
  refreshConversations();
}
