"""``python slurm_secgan.py <ffn secgan train flags> <cluster flags>``: SECGAN training as a Slurm
job (same as ``ffn secgan slurm_train``)."""

import sys

from ffn.cli import main

if __name__ == "__main__":
  sys.exit(main(["secgan", "slurm_train"] + sys.argv[1:]))
