#!/usr/bin/env bash
# Install everything into .venv and run the whole suite: ruff, mypy, pytest (slow end-to-end
# tests included). This is the README's test command and all that .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: the pinned CPU build; a plain `torch` requirement would pull a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[train,deepspeed,report,test]"

# Headless Chromium for the report's browser test (Debian package; CI installs it here).
if ! command -v chromium >/dev/null; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

ruff check .
ruff format --check .
mypy
lint-imports
python -m pytest -n 2 --dist loadgroup -p no:cacheprovider "$@"
