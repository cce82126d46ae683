// Documents: the index's stats and documents, uploads, a server folder (admins), the indexing
// jobs this tab started, deletes. Every error is shown where it happened.

import { del, json, request } from "./api.js";
import { clear, h, when } from "./dom.js";

let ui = null;

export function mountDocuments(root) {
  ui = {
    stats: h("p#index-stats.muted"),
    table: h("tbody"),
    jobs: h("ul#jobs"),
    message: h("p.message", { role: "alert" }),
    folder: h("div"),
  };
  const files = h("input", { type: "file", multiple: true, "aria-label": "Files to upload" });
  const upload = h("form.upload", h("label", "Upload files ", files), h("button.primary", { type: "submit" }, "Upload and index"));
  upload.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!files.files.length) return say("Choose one or more files first.");
    const body = new FormData();
    for (const file of files.files) body.append("files", file, file.name);
    const names = Array.from(files.files, (f) => f.name).join(", ");
    try {
      const job = await (await request("/v1/documents", { method: "POST", body })).json();
      upload.reset();
      watch(job, `upload: ${names}`);
      say("");
    } catch (error) {
      say(`Upload failed: ${error.message}`);
    }
  });
  clear(
    root,
    h(
      "div.docs-layout",
      h("section.panel", h("h2", "Index"), ui.stats, upload, ui.folder, ui.message, h("h3", "Jobs"), ui.jobs),
      h(
        "section.panel",
        h("h2", "Documents"),
        h("table.documents", h("thead", h("tr", ["Document", "Format", "Chunks", "Indexed", ""].map((t) => h("th", t)))), ui.table),
      ),
    ),
  );
  refresh();
}

export function documentsShown() {
  refresh();
}

function say(text) {
  ui.message.textContent = text;
}

async function refresh() {
  try {
    const stats = await json("/v1/index/stats");
    ui.stats.textContent = `${stats.documents} documents, ${stats.chunks} chunks · embeddings: ${stats.embedding?.model ?? "?"}`;
    ui.stats.dataset.documents = stats.documents;
    if (!stats.uploads) say("Uploads are not enabled on this server (AGENTKIT_API_UPLOAD_DIR).");
    drawFolderForm(stats);
  } catch (error) {
    ui.stats.textContent = error.message;
    return;
  }
  try {
    const documents = (await json("/v1/index/documents")).data;
    clear(ui.table, documents.length ? null : h("tr", h("td.muted", { colSpan: 5 }, "The index is empty.")));
    for (const doc of documents) {
      const remove = doc.deletable ? h("button.delete", { type: "button", "aria-label": `Delete ${doc.source}`, on: { click: () => removeDocument(doc) } }, "Delete") : null;
      ui.table.append(
        h(
          "tr",
          { dataset: { source: doc.source } },
          h("td", h("div", doc.title || doc.source), h("code.muted", doc.source), doc.uploaded ? h("span.badge", "upload") : null),
          h("td", doc.format),
          h("td", String(doc.chunks)),
          h("td", when(doc.indexed_at)),
          h("td", remove),
        ),
      );
    }
  } catch (error) {
    say(error.message);
  }
}

function drawFolderForm(stats) {
  if (!stats.folders) return clear(ui.folder);
  const folder = h("input", { name: "folder", required: true, placeholder: stats.document_roots?.[0] ?? "", "aria-label": "Server folder" });
  const form = h("form.folder", h("label", "Index a server folder ", folder), h("button", { type: "submit" }, "Index folder"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      watch(await json("/v1/documents/folder", { folder: folder.value }), `folder: ${folder.value}`);
      say("");
    } catch (error) {
      say(`Folder not indexed: ${error.message}`);
    }
  });
  clear(ui.folder, form, h("p.muted", `Allowed: ${(stats.document_roots || []).join(", ")}`));
}

async function removeDocument(doc) {
  if (!confirm(`Delete “${doc.source}” from the index?`)) return;
  try {
    await del(`/v1/documents/${doc.source.split("/").map(encodeURIComponent).join("/")}`);
    say(`Deleted ${doc.source}.`);
  } catch (error) {
    say(`Not deleted: ${error.message}`);
  }
  refresh();
}

function watch(job, label) {
  const started = Date.now();
  const state = h("span.state");
  const item = h("li.job", { dataset: { job: job.id } }, h("span", label), " ", state);
  ui.jobs.prepend(item);
  const poll = async () => {
    let current;
    try {
      current = await json(`/v1/documents/jobs/${job.id}`);
    } catch (error) {
      state.textContent = `cannot follow: ${error.message}`;
      return;
    }
    item.dataset.state = current.state;
    if (current.state === "running") {
      const p = current.progress;
      const files = p ? ` ${p.files_done} / ${p.files_total} files, ${p.chunks} chunks,` : "";
      state.textContent = `indexing…${files} ${Math.round((Date.now() - started) / 1000)} s`;
      setTimeout(poll, 500);
    } else if (current.state === "done") {
      const s = current.summary;
      state.textContent = `done: ${s.added} added, ${s.updated} updated, ${s.skipped} skipped, ${s.chunks_embedded} chunks embedded`;
      if (s.warnings?.length) item.append(h("ul.warnings", s.warnings.map((w) => h("li", w))));
      refresh();
    } else {
      state.textContent = `failed: ${current.error}`;
    }
  };
  poll();
}
