#!/usr/bin/env python
"""google/ffn-compatible compute_partitions.py: see ``ffn compute_partitions --help``."""

from ffn.cli import script_main

if __name__ == "__main__":
  script_main("compute_partitions")
