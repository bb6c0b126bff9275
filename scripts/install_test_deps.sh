#!/usr/bin/env bash
# System packages the browser tests need (Debian chromium). Idempotent; skipped when present.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (Debian) for the browser tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

# Omniboard and playwright-core (drives the Debian chromium; downloads no browser) from npm,
# into $PQA_CACHE_DIR or ~/.cache/pqa, so tests/test_board.py does not pay the ~1 min install.
# A failure here only warns: the test then reports the same one-line npm error.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PQA_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
  "$PY" -c 'from pqa_experiments.board.omniboard import ensure_omniboard, ensure_playwright_core
ensure_omniboard(); ensure_playwright_core()' \
    || echo "warning: could not install Omniboard/playwright-core from npm; tests/test_board.py will fail" >&2
else
  echo "warning: node/npm not found; tests/test_board.py will be skipped (install Node.js 20 + npm)" >&2
fi
