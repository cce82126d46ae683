// The labeling workbench: tasks (created from a JSONL file of prompts), a queue of prompts per
// labeler, ranking by keys 1..N (= ties with the previous, Backspace undoes, Enter saves) or
// by clicking and dragging, agreement between labelers, and the filtered pairwise export.

import { ApiError, del, json, request } from "./api.js";
import { clear, h, percent, when } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

let ui = null;
let labeler = () => "";
let bench = null; // the open task: {task, item, order, tied, tiePending, exclude}
let polling = 0;

export function mountLabeling(root, { models, labelerName }) {
  labeler = labelerName;
  ui = {
    tasks: h("tbody"),
    message: h("p.message", { role: "status" }),
    bench: h("section#workbench.panel", { hidden: true }),
    agreement: h("section#agreement.panel", { hidden: true }),
    exportForm: null,
  };
  clear(
    root,
    h(
      "div.label-layout",
      h(
        "div.label-side",
        h("section.panel", h("h2", "Labeling tasks"), h("table.tasks", h("thead", h("tr", ["Task", "Prompts", "Rankings"].map((t) => h("th", t)))), ui.tasks), ui.message),
        newTaskForm(models),
        exportForm(),
      ),
      h("div.label-main", ui.bench, ui.agreement),
    ),
  );
  document.addEventListener("keydown", onKey);
  refresh();
}

export function labelingShown() {
  refresh();
}

async function refresh() {
  let tasks;
  try {
    tasks = (await json("/v1/labeling/tasks")).data;
  } catch (error) {
    ui.message.textContent = error.status === 404 ? "Labeling needs the feedback store, which this server does not keep." : error.message;
    return;
  }
  clear(ui.tasks, tasks.length ? null : h("tr", h("td.muted", { colSpan: 3 }, "No tasks yet: create one from a JSONL file of prompts.")));
  for (const task of tasks) {
    const prompts = [`${task.ready} ready`, task.pending ? `${task.pending} sampling` : null, task.failed ? `${task.failed} failed` : null].filter(Boolean).join(", ");
    const failures = task.failures.map((f) => `prompt ${f.prompt}: ${f.error}`).join("\n");
    ui.tasks.append(
      h(
        "tr",
        { dataset: { task: task.id } },
        h(
          "td",
          h("strong", task.name),
          h("div.muted", `${task.agent} · N=${task.n} · ${task.labelers_per_prompt} labeler(s) per prompt`),
          h(
            "div.actions",
            h("button.primary", { type: "button", on: { click: () => open(task) } }, "Label"),
            h("button", { type: "button", on: { click: () => showAgreement(task) } }, "Agreement"),
            task.pending || task.failed ? h("button", { type: "button", title: "Sample the prompts still waiting or failed", on: { click: () => resume(task) } }, task.pending ? "Resume" : "Retry failed") : null,
            h("button.delete", { type: "button", title: "Delete the task (the feedback it gave stays in the export)", on: { click: (event) => remove(task, event.currentTarget) } }, "Delete"),
          ),
        ),
        h("td", { title: failures }, prompts),
        h("td", `${task.rankings} / ${task.rankings_needed}`),
      ),
    );
  }
  fillExportTasks(tasks);
  clearTimeout(polling);
  if (tasks.some((t) => t.pending) && !ui.tasks.closest("[hidden]")) polling = setTimeout(refresh, 2000);
}

// Two clicks: the first asks, the second deletes (no browser dialog).
async function remove(task, button) {
  if (button.dataset.confirm !== "yes") {
    button.dataset.confirm = "yes";
    button.textContent = "Delete? Click again";
    return;
  }
  try {
    await del(`/v1/labeling/tasks/${task.id}`);
    ui.message.textContent = `Deleted ${task.name}.`;
  } catch (error) {
    ui.message.textContent = error.message;
  }
  refresh();
}

async function resume(task) {
  try {
    await json(`/v1/labeling/tasks/${task.id}/sample`, {});
  } catch (error) {
    ui.message.textContent = error.message;
  }
  refresh();
}

// --- creating a task ------------------------------------------------------------------------

function newTaskForm(models) {
  const file = h("input", { type: "file", accept: ".jsonl,.json,.txt,application/x-ndjson", required: true, "aria-label": "Prompts file (JSONL)" });
  const agent = h("select", { "aria-label": "Agent" }, models.map((m) => h("option", { value: m.id }, m.id)));
  const n = h("input", { type: "number", min: 2, max: 16, value: 4, "aria-label": "Completions per prompt" });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: 0.1, value: 0.8, "aria-label": "Temperature" });
  const k = h("input", { type: "number", min: 1, max: 50, value: 1, "aria-label": "Labelers per prompt" });
  const name = h("input", { placeholder: "optional", "aria-label": "Task name" });
  const status = h("p.message", { role: "status" });
  const form = h(
    "form.new-task",
    h("label", "Prompts (JSONL: one {\"prompt\": …} a line) ", file),
    h("label", "Agent ", agent),
    h("div.row", h("label", "N ", n), h("label", "Temperature ", temperature), h("label", "Labelers per prompt ", k)),
    h("label", "Name ", name),
    h("button.primary", { type: "submit" }, "Create task"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "Creating…";
    try {
      const text = await file.files[0].text();
      const task = await json("/v1/labeling/tasks", {
        jsonl: text,
        agent: agent.value,
        n: Number(n.value),
        temperature: Number(temperature.value),
        labelers_per_prompt: Number(k.value),
        name: name.value || undefined,
      });
      status.textContent = `Created “${task.name}” with ${task.prompts} prompts; sampling their completions.`;
      form.reset();
      refresh();
    } catch (error) {
      status.textContent = `Not created: ${error.message}`;
      status.classList.add("error");
    }
  });
  return h("details.panel", h("summary", h("h2", "New task")), form);
}

// --- the workbench ------------------------------------------------------------------------

async function open(task) {
  if (!labeler()) {
    ui.message.textContent = "Type your name in “Labeler” at the top first: each ranking records who made it.";
    document.getElementById("labeler").focus();
    return;
  }
  ui.agreement.hidden = true;
  bench = { task, item: null, order: [], tied: new Set(), tiePending: false, exclude: [] };
  await next();
}

async function next(message = "") {
  const params = new URLSearchParams({ labeler: labeler(), exclude: bench.exclude.join(",") });
  let found;
  try {
    found = await json(`/v1/labeling/tasks/${bench.task.id}/next?${params}`);
  } catch (error) {
    ui.message.textContent = error.message;
    return;
  }
  Object.assign(bench, { task: found.task, item: found.item, progress: found.progress, order: [], tied: new Set(), tiePending: false });
  ui.bench.hidden = false;
  drawBench(message);
}

function drawBench(message) {
  const { task, item, progress } = bench;
  const head = h(
    "header.bench-head",
    h("h2", task.name),
    h("progress", { max: Math.max(progress.total, 1), value: progress.done, "aria-label": "Your progress" }),
    h("span.progress", `You: ${progress.done} / ${progress.total}`),
    h("span.muted", ` · task: ${progress.task_rankings} / ${progress.task_rankings_needed} rankings`),
    h("button.link", { type: "button", on: { click: close } }, "Close"),
  );
  const note = h("p.message", { role: "status" }, message);
  if (!item) {
    const waiting = progress.pending ? ` ${progress.pending} prompts are still being sampled.` : "";
    clear(ui.bench, head, note, h("p.done", `Nothing left for you in this task.${waiting}`), h("button", { type: "button", on: { click: () => next() } }, "Check again"));
    return;
  }
  const cards = item.completions.map((c, i) =>
    h(
      "article.completion",
      { dataset: { id: c.id }, tabIndex: -1, on: { click: () => place(i) } },
      h("header", h("kbd", String(i + 1)), h("span.rank-badge")),
      h("div.body", renderMarkdown(c.text)),
    ),
  );
  bench.cards = cards;
  bench.strip = h("ol.ranking", { "aria-label": "Ranking, best first" });
  bench.reason = h("textarea.reason", { rows: 2, placeholder: "Reason (optional; R to type, Esc to leave)", "aria-label": "Reason" });
  bench.note = note;
  clear(
    ui.bench,
    head,
    h("div.prompt", h("span.muted", "Prompt"), h("div.text", item.prompt)),
    h("div.completions", cards),
    h("div.rank-row", h("span.muted", "Best → worst:"), bench.strip),
    h("p.keys.muted", `Keys: 1–${Math.min(cards.length, 9)} next place · = then a number: tie with the previous · Backspace: undo · Enter: save · S: skip · R: reason`),
    bench.reason,
    h("div.bench-actions", h("button.primary", { type: "button", on: { click: submit } }, "Save ranking"), h("button", { type: "button", on: { click: skip } }, "Skip"), h("button", { type: "button", on: { click: undo } }, "Undo")),
    note,
  );
  drawRanking();
}

function close() {
  bench = null;
  ui.bench.hidden = true;
  refresh();
}

function place(index) {
  const completion = bench?.item?.completions[index];
  if (!completion || bench.order.includes(completion.id)) return;
  if (bench.tiePending && bench.order.length) bench.tied.add(completion.id);
  bench.tiePending = false;
  bench.order.push(completion.id);
  drawRanking();
}

function undo() {
  if (bench.tiePending) bench.tiePending = false;
  else bench.tied.delete(bench.order.pop());
  drawRanking();
}

function drawRanking() {
  const { item, order, tied } = bench;
  const number = (id) => item.completions.findIndex((c) => c.id === id) + 1;
  const rankOf = new Map();
  order.forEach((id, place) => rankOf.set(id, tied.has(id) ? rankOf.get(order[place - 1]) : place + 1));
  clear(bench.strip);
  order.forEach((id, place) => {
    if (place) {
      const toggle = h("button.sep", { type: "button", title: "Tie or order these two" }, tied.has(id) ? "=" : ">");
      toggle.addEventListener("click", () => {
        tied.has(id) ? tied.delete(id) : tied.add(id);
        drawRanking();
      });
      bench.strip.append(toggle);
    }
    const chip = h("li.ranked", { draggable: true, dataset: { id } }, `#${number(id)}`);
    chip.addEventListener("dragstart", (event) => event.dataTransfer.setData("text/plain", String(id)));
    chip.addEventListener("dragover", (event) => event.preventDefault());
    chip.addEventListener("drop", (event) => {
      event.preventDefault();
      move(Number(event.dataTransfer.getData("text/plain")), id);
    });
    bench.strip.append(chip);
  });
  if (bench.tiePending) bench.strip.append(h("span.sep", "="));
  if (!order.length) bench.strip.append(h("li.muted", "press the number of the best completion"));
  bench.cards.forEach((card) => {
    const id = Number(card.dataset.id);
    const rank = rankOf.get(id);
    card.classList.toggle("placed", rank !== undefined);
    const shared = order.filter((other) => rankOf.get(other) === rank).length > 1;
    card.querySelector(".rank-badge").textContent = rank === undefined ? "" : `${shared ? "tied " : ""}${ordinal(rank)}`;
  });
}

function move(dragged, target) {
  const order = bench.order.filter((id) => id !== dragged);
  if (!bench.order.includes(dragged)) return;
  order.splice(order.indexOf(target) + (bench.order.indexOf(dragged) < bench.order.indexOf(target) ? 1 : 0), 0, dragged);
  bench.order = order;
  if (bench.tied.has(order[0])) bench.tied.delete(order[0]);
  drawRanking();
}

function ordinal(n) {
  const suffix = n % 10 === 1 && n % 100 !== 11 ? "st" : n % 10 === 2 && n % 100 !== 12 ? "nd" : n % 10 === 3 && n % 100 !== 13 ? "rd" : "th";
  return `${n}${suffix}`;
}

async function submit() {
  const { item } = bench;
  const left = item.completions.filter((c) => !bench.order.includes(c.id));
  if (left.length === 1) place(item.completions.indexOf(left[0])); // the last place is implied
  if (bench.order.length !== item.completions.length) {
    bench.note.textContent = `Rank every completion first (${bench.order.length} of ${item.completions.length} placed).`;
    return;
  }
  const ties = [];
  bench.order.forEach((id, place) => {
    if (!bench.tied.has(id)) return;
    const last = ties[ties.length - 1];
    if (last && last[last.length - 1] === bench.order[place - 1]) last.push(id);
    else ties.push([bench.order[place - 1], id]);
  });
  try {
    await json(`/v1/labeling/items/${item.id}/rankings`, {
      ranking: bench.order,
      ties: ties.length ? ties : undefined,
      reason: bench.reason.value.trim() || undefined,
      labeler: labeler(),
    });
    await next("Saved.");
  } catch (error) {
    if (error instanceof ApiError && error.status === 409) await next(error.message);
    else bench.note.textContent = `Not saved: ${error.message}`;
  }
}

function skip() {
  bench.exclude.push(bench.item.id);
  next("Skipped.");
}

function onKey(event) {
  if (!bench?.item || ui.bench.closest("[hidden]") || ui.bench.hidden) return;
  const target = event.target;
  if (target === bench.reason) {
    if (event.key === "Escape") bench.reason.blur();
    else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) submit();
    return;
  }
  if (target.closest?.("input, textarea, select, dialog") || event.altKey || event.ctrlKey || event.metaKey) return;
  const key = event.key;
  if (/^[1-9]$/.test(key)) place(Number(key) - 1);
  else if (key === "=") bench.tiePending = bench.order.length > 0;
  else if (key === "Backspace") undo();
  else if (key === "Enter") submit();
  else if (key === "s" || key === "S") skip();
  else if (key === "r" || key === "R") bench.reason.focus();
  else return;
  event.preventDefault();
  if (key === "=") drawRanking();
}

// --- agreement and export -----------------------------------------------------------------

async function showAgreement(task) {
  let found;
  try {
    found = await json(`/v1/labeling/tasks/${task.id}/agreement`);
  } catch (error) {
    ui.message.textContent = error.message;
    return;
  }
  const tau = (v) => (v === null ? "–" : v.toFixed(2));
  clear(
    ui.agreement,
    h("h2", `Agreement · ${task.name}`),
    found.prompts_compared
      ? h(
          "dl.figures",
          h("dt", "Prompts ranked by two or more"),
          h("dd#prompts-compared", String(found.prompts_compared)),
          h("dt", "Pairwise agreement"),
          h("dd#pairwise-agreement", percent(found.pairwise_agreement)),
          h("dt", "Kendall's tau-b (mean)"),
          h("dd#kendall-tau", tau(found.kendall_tau)),
        )
      : h("p.muted", "No prompt has been ranked by two labelers yet."),
    found.labeler_pairs.length
      ? h(
          "table",
          h("thead", h("tr", ["Labelers", "Prompts", "Agreement", "Tau"].map((t) => h("th", t)))),
          h("tbody", found.labeler_pairs.map((p) => h("tr", h("td", p.labelers.join(" & ")), h("td", String(p.prompts)), h("td", percent(p.pairwise_agreement)), h("td", tau(p.kendall_tau))))),
        )
      : null,
    h("button.link", { type: "button", on: { click: () => (ui.agreement.hidden = true) } }, "Close"),
  );
  ui.agreement.hidden = false;
}

function exportForm() {
  const labelerSelect = h("select", { name: "labeler", "aria-label": "Labeler" });
  const agentSelect = h("select", { name: "agent", "aria-label": "Agent" });
  const taskSelect = h("select", { name: "task", "aria-label": "Task" });
  const since = h("input", { type: "date", name: "since", "aria-label": "From" });
  const until = h("input", { type: "date", name: "until", "aria-label": "To" });
  const status = h("p.message", { role: "status" });
  const form = h(
    "form.export",
    h("div.row", h("label", "Labeler ", labelerSelect), h("label", "Agent ", agentSelect)),
    h("label", "Task ", taskSelect),
    h("div.row", h("label", "From ", since), h("label", "To ", until)),
    h("button.primary", { type: "submit" }, "Download JSONL"),
    status,
  );
  ui.exportForm = { form, labelerSelect, agentSelect, taskSelect };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const params = new URLSearchParams();
    if (labelerSelect.value) params.set("labeler", labelerSelect.value);
    if (agentSelect.value) params.set("agent", agentSelect.value);
    if (taskSelect.value) params.set("task", taskSelect.value);
    if (since.value) params.set("since", String(new Date(`${since.value}T00:00`).getTime() / 1000));
    if (until.value) params.set("until", String(new Date(`${until.value}T00:00`).getTime() / 1000 + 86400));
    try {
      const response = await request(`/v1/labeling/export?${params}`);
      const text = await response.text();
      const lines = text ? text.trimEnd().split("\n").length : 0;
      const link = h("a", { href: URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" })), download: "preferences.jsonl" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      status.textContent = `Downloaded ${lines} preference pairs.`;
    } catch (error) {
      status.textContent = `Export failed: ${error.message}`;
    }
  });
  const panel = h("details.panel", h("summary", h("h2", "Export preferences")), h("p.muted", "Pairs {prompt, chosen, rejected} for TRL's reward and DPO trainers."), form);
  panel.addEventListener("toggle", () => panel.open && fillExportOptions());
  return panel;
}

async function fillExportOptions() {
  try {
    const options = await json("/v1/labeling/export/options");
    const { labelerSelect, agentSelect } = ui.exportForm;
    for (const [select, values] of [[labelerSelect, options.labelers], [agentSelect, options.agents]]) {
      const chosen = select.value;
      clear(select, h("option", { value: "" }, "all"), values.map((v) => h("option", { value: v }, v)));
      select.value = values.includes(chosen) ? chosen : "";
    }
  } catch {
    // the tasks list says why labeling is unavailable
  }
}

function fillExportTasks(tasks) {
  const select = ui.exportForm.taskSelect;
  const chosen = select.value;
  clear(select, h("option", { value: "" }, "all (chat feedback too)"), tasks.map((t) => h("option", { value: t.id }, `${t.name} (${when(t.created)})`)));
  select.value = tasks.some((t) => t.id === chosen) ? chosen : "";
}
