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

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "run_tests: installing python3-venv"
      apt-get -o DPkg::Lock::Timeout=600 update -qq
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv >/dev/null
    else
      echo "run_tests: $PYTHON has no working venv module; install python3-venv (as root: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  echo "run_tests: creating .venv"
  "$PYTHON" -m venv .venv
fi

echo "run_tests: installing the package and test dependencies into .venv"
if ! .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[test]' >.venv/pip-install.log 2>&1; then
  tail -n 40 .venv/pip-install.log >&2
  echo "run_tests: pip install failed (full log: .venv/pip-install.log)" >&2
  exit 1
fi

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
