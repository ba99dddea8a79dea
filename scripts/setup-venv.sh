#!/usr/bin/env bash
# Creates .venv/ (first run only) and installs this package into it: scripts/setup-venv.sh [EXTRAS]
# e.g. `scripts/setup-venv.sh test` installs '.[cpu,test]'. Used by run_demo.sh and run_tests.sh.
# TensorFlow comes from the extra FFN_TF_EXTRA (default cpu; FFN_TF_EXTRA=gpu for NVIDIA GPUs, in a
# venv that never had tensorflow-cpu: the two builds install the same files).
# As root on Debian/Ubuntu, installs python3-venv first when the venv module is missing.
# pip's output goes to .venv/pip-install.log (shown on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS="${FFN_TF_EXTRA:-cpu}${1:+,$1}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing python3-venv"
      apt-get -o DPkg::Lock::Timeout=600 update -qq
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3-venv >/dev/null
    else
      echo "setup: $PYTHON has no working venv module; install python3-venv (as root: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing the package${EXTRAS:+ with [$EXTRAS]} into .venv"
if ! .venv/bin/python -m pip install --disable-pip-version-check -q -e ".${EXTRAS:+[$EXTRAS]}" \
    >.venv/pip-install.log 2>&1; then
  tail -n 40 .venv/pip-install.log >&2
  echo "setup: pip install failed (full log: .venv/pip-install.log)" >&2
  exit 1
fi
