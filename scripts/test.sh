#!/usr/bin/env bash
# Set up and run the whole test suite (unit and integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev,cpu
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
