#!/usr/bin/env bash
# One command: set up .venv/ (first run only) and run the end-to-end demo on the shipped FIB-25
# sample: ./run_demo.sh [ffn demo arguments, e.g. --output_dir DIR --cluster local]
# Runs the pipeline's stages as dependent Slurm job arrays when a Slurm controller answers, else
# as local processes in order.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
exec .venv/bin/ffn demo "$@"
