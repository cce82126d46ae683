// Python highlighting for PAL programs: spans with classes, text as text.

import { h } from "./dom.js";

const KEYWORDS = new Set(
  ("False None True and as assert async await break class continue def del elif else except " +
    "finally for from global if import in is lambda nonlocal not or pass raise return try while " +
    "with yield").split(" "),
);
const BUILTINS = new Set(
  ("abs all any bool dict divmod enumerate float int len list map max min print range round " +
    "set sorted str sum tuple zip").split(" "),
);
const TOKEN =
  /(#[^\n]*)|([rbuf]{0,2}("""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))|(\b\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?\b)|([A-Za-z_]\w*)/g;

export function highlightPython(code) {
  const out = h("code.python");
  let at = 0;
  let previous = "";
  for (const m of code.matchAll(TOKEN)) {
    if (m.index > at) out.append(code.slice(at, m.index));
    at = m.index + m[0].length;
    let kind = null;
    if (m[1]) kind = "comment";
    else if (m[2]) kind = "string";
    else if (m[4]) kind = "number";
    else if (KEYWORDS.has(m[5])) kind = "keyword";
    else if (previous === "def" || previous === "class") kind = "name";
    else if (BUILTINS.has(m[5])) kind = "builtin";
    out.append(kind ? h(`span.tok-${kind}`, m[0]) : m[0]);
    if (m[5]) previous = m[5];
  }
  out.append(code.slice(at));
  return out;
}
