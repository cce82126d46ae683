// The page: tabs, the API key prompt, who is asking, and the three views.

import { json, key, setKeyPrompt } from "./api.js";
import { mountChat } from "./chat.js";
import { $ } from "./dom.js";
import { documentsShown, mountDocuments } from "./documents.js";
import { labelingShown, mountLabeling } from "./labeling.js";

const LABELER = "agentkit.labeler";
const views = { chat: $("#view-chat"), label: $("#view-label"), docs: $("#view-docs") };
const mounted = new Set();
let models = [];

function showError(message) {
  const notice = $("#notice");
  notice.textContent = message;
  notice.hidden = !message;
  clearTimeout(showError.timer);
  if (message) showError.timer = setTimeout(() => (notice.hidden = true), 8000);
}

/** The key dialog: resolves once a key is entered (the caller then tries it). */
function promptForKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message;
  $("#key-input").value = "";
  dialog.oncancel = (event) => event.preventDefault(); // Escape: the page needs a key
  if (!dialog.open) dialog.showModal();
  return new Promise((resolve) => {
    $("#key-form").onsubmit = () => {
      key.set($("#key-input").value.trim());
      resolve();
    };
  });
}

function labelerName() {
  return $("#labeler").value.trim();
}

function show(name) {
  if (!views[name]) name = "chat";
  for (const [view, el] of Object.entries(views)) el.hidden = view !== name;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
  }
  const options = { models, labelerName, showError };
  if (!mounted.has(name)) {
    mounted.add(name);
    if (name === "label") mountLabeling(views.label, options);
    if (name === "docs") mountDocuments(views.docs, options);
  } else if (name === "label") labelingShown();
  else if (name === "docs") documentsShown();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

async function start() {
  setKeyPrompt(promptForKey);
  window.addEventListener("unhandledrejection", (event) => showError(String(event.reason?.message || event.reason)));
  let me;
  try {
    me = await json("/v1/whoami");
  } catch (error) {
    showError(`The API cannot be reached: ${error.message}`);
    return;
  }
  $("#key-dialog").close();
  $("#identity").textContent = me.keys ? `key: ${me.name} (${me.role})` : "open server (no API keys)";
  $("#sign-out").hidden = !me.keys;
  $("#sign-out").addEventListener("click", () => {
    key.forget();
    location.reload();
  });
  const field = $("#labeler");
  field.value = localStorage.getItem(LABELER) || (me.keys ? me.name : "");
  field.addEventListener("change", () => localStorage.setItem(LABELER, labelerName()));
  const served = (await json("/v1/models")).data.map((m) => m.id);
  const agents = served.filter((id) => id.startsWith("agentkit-"));
  models = served.map((id) => ({ id, served: agents.includes(id) ? null : id }));
  mountChat(views.chat, { models, labelerName, showError });
  mounted.add("chat");
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1));
  document.body.dataset.ready = "true";
}

start();
