#!/usr/bin/env python
"""google/ffn-compatible build_coordinates.py: see ``ffn build_coordinates --help``."""

from ffn.cli import script_main

if __name__ == "__main__":
  script_main("build_coordinates")
