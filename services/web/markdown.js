// A small Markdown renderer that builds DOM nodes (never HTML strings), for untrusted text.
// Blocks: paragraphs, headings, fenced code, lists, quotes. Inline: code, bold, italic, links
// (http, https and mailto only; anything else, javascript: included, stays text), citations
// [n] (made by `cite(n)`). Raw HTML is shown as the text it is. Unfinished input (a stream)
// renders as far as it goes: an open code fence runs to the end.

import { h } from "./dom.js";

const INLINE =
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|!?\[([^\]\n]*)\]\(([^()\s]*)\)|\*\*(?=\S)([^\n]*?\S)\*\*|__(?=\S)([^\n]*?\S)__|\*(?=[^\s*])([^*\n]*?[^\s*])\*|\b_(?=\S)([^_\n]*?\S)_\b|\[(\d{1,3})\]/g;
const SAFE_LINK = /^(https?:\/\/|mailto:)/i;

export function renderMarkdown(text, cite = (n) => `[${n}]`) {
  const fragment = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i++;
    } else if ((match = line.match(/^\s{0,3}(```+|~~~+)\s*([\w+-]*)/))) {
      const fence = match[1];
      const body = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(fence); i++) body.push(lines[i]);
      i++;
      const code = h("code", body.join("\n"));
      if (match[2]) code.dataset.lang = match[2];
      fragment.append(h("pre", code));
    } else if ((match = line.match(/^\s{0,3}(#{1,6})\s+(.*)$/))) {
      fragment.append(inline(h(`h${Math.min(match[1].length + 2, 6)}`), match[2], cite));
      i++;
    } else if (/^\s{0,3}>/.test(line)) {
      const body = [];
      for (; i < lines.length && /^\s{0,3}>/.test(lines[i]); i++) body.push(lines[i].replace(/^\s{0,3}>\s?/, ""));
      fragment.append(h("blockquote", renderMarkdown(body.join("\n"), cite)));
    } else if (/^\s{0,3}([-*+]|\d{1,9}[.)])\s+/.test(line)) {
      const ordered = /^\s{0,3}\d/.test(line);
      const list = h(ordered ? "ol" : "ul");
      const start = line.match(/^\s{0,3}(\d{1,9})/);
      if (ordered && start && start[1] !== "1") list.start = Number(start[1]);
      const item = /^\s{0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
      for (; i < lines.length && lines[i].trim(); i++) {
        const m = lines[i].match(item);
        if (m) list.append(inline(h("li"), m[2], cite));
        else list.lastChild.append(" ", ...inline(h("span"), lines[i].trim(), cite).childNodes);
      }
      fragment.append(list);
    } else {
      const body = [];
      for (; i < lines.length && lines[i].trim() && !/^\s{0,3}(```|~~~|#{1,6}\s|>)/.test(lines[i]); i++) {
        body.push(lines[i]);
      }
      fragment.append(inline(h("p"), body.join("\n"), cite));
    }
  }
  return fragment;
}

function inline(el, text, cite) {
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    plain(el, text.slice(at, m.index));
    at = m.index + m[0].length;
    if (m[1]) el.append(h("code", m[2].replace(/^ (.*) $/, "$1")));
    else if (m[0].startsWith("!")) el.append(`[image: ${m[3] || "no description"}]`);
    else if (m[3] !== undefined) link(el, m[3], m[4], cite);
    else if (m[5] || m[6]) el.append(inline(h("strong"), m[5] || m[6], cite));
    else if (m[7] || m[8]) el.append(inline(h("em"), m[7] || m[8], cite));
    else el.append(cite(Number(m[9])));
  }
  plain(el, text.slice(at));
  return el;
}

function link(el, label, url, cite) {
  if (!SAFE_LINK.test(url)) {
    el.append(`[${label}](${url})`); // shown, not followed
    return;
  }
  const a = h("a", { href: url, rel: "noopener noreferrer nofollow", target: "_blank" });
  el.append(inline(a, label || url, cite));
}

function plain(el, text) {
  const parts = text.split("\n");
  parts.forEach((part, n) => {
    if (n) el.append(h("br"));
    if (part) el.append(part);
  });
}
