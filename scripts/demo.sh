#!/usr/bin/env bash
# Set up, index the sample folder kept in the repo, and search it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
index=.agentkit/demo-index
.venv/bin/agentkit index examples/sample-docs --index "$index"
.venv/bin/agentkit search "What was the code name of the first release?" --index "$index" -k 3
