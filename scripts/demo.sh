#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the embedded model, start the model server,
# index the sample folder, ask a question, show the cited answer, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev,cpu
agentkit=.venv/bin/agentkit
index=.agentkit/demo-index
port="${AGENTKIT_MODEL_PORT:-8000}"
question="${1:-What was the code name of the first release?}"

$agentkit model prepare
log="$(mktemp -t agentkit-serve.XXXXXX)"
$agentkit model serve --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
$agentkit index examples/sample-docs --index "$index"
echo "waiting for the model server (about a minute on a CPU)..." >&2
until grep -q "model server ready" "$log"; do
  if ! kill -0 "$server" 2>/dev/null; then cat "$log" >&2; exit 1; fi
  sleep 1
done
grep -m1 "model server ready" "$log" | sed 's/;.*//'  # which model (and precision) answers
echo "Q: $question"
AGENTKIT_LLM_URL="http://127.0.0.1:$port" $agentkit ask "$question" --index "$index"
