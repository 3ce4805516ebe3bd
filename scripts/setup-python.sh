#!/usr/bin/env bash
# Create (or refresh) the Python virtualenv at <repo>/.venv with the client libraries the interop
# suite uses: pika, aio-pika, kombu, pytest, pytest-xdist, pytest-timeout, pinned in
# interop-tests/python/requirements.txt. Idempotent: does nothing when the venv already matches
# the requirements file. Uses $PYTHON (default python3) to create the venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
REQ="$ROOT/interop-tests/python/requirements.txt"
STAMP="$VENV/.warren-requirements.sha256"
PY=${PYTHON:-python3}

want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$want" ]] &&
  "$VENV/bin/python" -c 'import pika, aio_pika, kombu, pytest, xdist, pytest_timeout' 2>/dev/null; then
  echo "setup-python: $VENV is up to date"
  exit 0
fi

if ! command -v "$PY" >/dev/null; then
  echo "setup-python: $PY not found; install Python 3.9+ or set PYTHON" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
  echo "setup-python: $PY is $("$PY" --version 2>&1); Python 3.9+ is needed" >&2
  exit 1
fi

if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  echo "setup-python: creating $VENV with $("$PY" --version 2>&1)"
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV"; then
    # Debian's python3 needs python3-venv for `-m venv`.
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get install -y -qq python3-venv >/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv; }
      rm -rf "$VENV"
      "$PY" -m venv "$VENV"
    else
      echo "setup-python: '$PY -m venv' failed (on Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi

echo "setup-python: installing $(grep -cv '^\s*\(#\|$\)' "$REQ") pinned packages from $REQ"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
"$VENV/bin/python" -c 'import pika, aio_pika, kombu, pytest, xdist, pytest_timeout'
echo "$want" >"$STAMP"
echo "setup-python: $VENV ready"
