#!/usr/bin/env bash
# Creates .venv at the repo root with tl and everything its tests need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision are pinned in pyproject.toml (this machine's pip serves those builds from disk).
.venv/bin/python -m pip install -q -e '.[test,tune]'
