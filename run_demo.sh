#!/usr/bin/env bash
# One command: set up .venv/ (first run only) and run the end-to-end demo on the shipped FIB-25
# sample: ./run_demo.sh [ffn demo arguments, e.g. --output_dir DIR --cluster local]
# Runs the inference step as a Slurm job when a Slurm controller answers, else locally.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
exec .venv/bin/ffn demo "$@"
