"""google/ffn-compatible entry point: ``python run_consensus.py --consensus_request=... --bounding_box=...``.

With the SLURM fork's flags (``--segmentation_dirs "a b" --outspec out.h5:seg [--min_ffn_size N]
[--min_split_size N]``) it is ``ffn stitch``: the split consensus of those chunked runs, chunk by
chunk, stitched into one volume with global ids.
"""
import sys

from ffn.cli import script_main

FORK_FLAG = "--segmentation_dirs"

script_main("stitch" if any(a == FORK_FLAG or a.startswith(FORK_FLAG + "=") for a in sys.argv[1:])
            else "consensus")
