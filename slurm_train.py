"""Distributed FFN training as a Slurm job (see ``ffn slurm_train --help``)."""

from ffn.cli import script_main

if __name__ == "__main__":
  script_main("slurm_train")
