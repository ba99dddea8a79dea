#!/usr/bin/env bash
# Runs the test suite on a fresh Debian/Ubuntu machine: ./run_tests.sh [pytest arguments]
#
# 1. creates .venv/ if missing (installing python3-venv first when it is missing and we are root),
# 2. installs this package with its test extras into it (pip output goes to .venv/pip-install.log),
# 3. as root, when no Slurm controller answers, installs and starts a single-node Slurm
#    (scripts/start-local-slurm.sh) so that the tests marked `slurm` run against a real cluster;
#    otherwise those tests are skipped (or fail when CI is set: CI must run them),
# 4. as root on Debian/Ubuntu, installs Chromium when missing (for tests/test_viewer.py, which opens
#    exports in a real Neuroglancer; apt output goes to .venv/apt-chromium.log),
# 5. runs pytest (listing the 30 slowest tests at the end), passing the arguments through.
set -euo pipefail
cd "$(dirname "$0")"

scripts/setup-venv.sh test

slurm_answers() { command -v sinfo >/dev/null && timeout 15 sinfo --noheader >/dev/null 2>&1; }
if slurm_answers; then
  echo "run_tests: using the running Slurm cluster"
elif [ "$(id -u)" = 0 ]; then
  echo "run_tests: starting a local single-node Slurm (scripts/start-local-slurm.sh)"
  start=$SECONDS
  bash scripts/start-local-slurm.sh >/dev/null
  echo "run_tests: local Slurm up in $((SECONDS - start)) s"
else
  echo "run_tests: no Slurm cluster answers and not root: tests marked 'slurm' will be skipped"
fi

if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "run_tests: installing chromium (for the Neuroglancer viewer test; log: .venv/apt-chromium.log)"
    if ! { timeout 600 apt-get -o DPkg::Lock::Timeout=300 update -qq &&
           DEBIAN_FRONTEND=noninteractive timeout 900 \
             apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium; } >.venv/apt-chromium.log 2>&1; then
      tail -n 20 .venv/apt-chromium.log >&2
      echo "run_tests: installing chromium failed (log: .venv/apt-chromium.log);" \
        "tests/test_viewer.py will skip (fail under CI)" >&2
    fi
  else
    echo "run_tests: no chromium and not root: tests/test_viewer.py will be skipped (fails under CI)"
  fi
fi

exec .venv/bin/python -m pytest -q --durations=30 "$@"
