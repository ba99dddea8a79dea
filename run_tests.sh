#!/usr/bin/env bash
# Runs the test suite on a fresh Debian/Ubuntu machine: ./run_tests.sh [pytest arguments]
#
# 1. creates .venv/ if missing (installing python3-venv first when it is missing and we are root),
# 2. installs this package with its test extras into it (pip output goes to .venv/pip-install.log),
# 3. as root, when no Slurm controller answers, installs and starts a single-node Slurm
#    (scripts/start-local-slurm.sh) so that the tests marked `slurm` run against a real cluster;
#    otherwise those tests are skipped (or fail when CI is set: CI must run them),
# 4. runs pytest, passing the arguments through.
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

exec .venv/bin/python -m pytest -q "$@"
