#!/usr/bin/env bash
# One command: set up a virtual environment (first run only) and run the end-to-end demo on the
# shipped FIB-25 sample. Extra arguments go to `ffn demo` (e.g. --output_dir DIR, --cluster slurm).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf .venv && "$PY" -m venv .venv
    else
      echo "run_demo.sh: '$PY -m venv' failed; install python3-venv (Debian/Ubuntu) and retry" >&2; exit 1
    fi
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/ffn demo "$@"
