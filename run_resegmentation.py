"""Entry point in the SLURM fork's style: ``python run_resegmentation.py <step> ...`` with the steps
``pairs``, ``run`` (the fork's resegmentation), ``analyze`` (its ``--analyze_results``),
``agglomerate``, ``queue`` and ``post`` (the agglomeration's merges to DVID, ``ffn dvid
post-merges``) -- ``ffn reseg <step>``."""
from ffn.cli import script_main

script_main("reseg")
