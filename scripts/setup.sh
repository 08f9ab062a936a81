#!/usr/bin/env bash
# Makes .venv at the repo root with tl and everything its tests need, at exactly the versions
# in locks/ (the ones the image installs too), so a set-up on any later day is the tested one.
# Safe to run again: when .venv already matches locks/ and pyproject.toml, it changes nothing.
# PYTHON=python3.11 bash scripts/setup.sh picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

locked=$(sed -n 's/^# Python \([0-9][0-9.]*\),.*/\1/p' locks/runtime.txt)
running=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$running" != "$locked" ]; then
  echo "warning: locks/ were made on Python $locked but $PY is Python $running: some locked versions" \
       "may not install, or may behave otherwise than tested. Use Python $locked" \
       "(PYTHON=python$locked bash scripts/setup.sh), or re-lock on this one: $PY scripts/lock.py --upgrade" >&2
fi

if [ -x .venv/bin/python ] && .venv/bin/python scripts/lock.py --up-to-date 2>/dev/null; then
  echo "set-up: .venv already matches locks/ (nothing to do)"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
lock=(-c locks/runtime.txt -c locks/test.txt)
# pip and setuptools first, at their locked versions: setuptools then builds the project itself
# (no build isolation, which would fetch whatever setuptools is newest that day).
.venv/bin/python -m pip install -q "${lock[@]}" pip setuptools
.venv/bin/python -m pip install -q "${lock[@]}" --no-build-isolation -e '.[test,tune,server,text,vision,serve]'
.venv/bin/python scripts/lock.py --check
.venv/bin/python scripts/lock.py --stamp
