"""SLURM-fork-compatible entry point of checkpoint sweeps (``ffn sweep``):
``python run_slurm_inference.py --infreqs=req.pbtxt --ckpt_dir=train/ --bboxes=box.pbtxt
--out_dir=sweep/ --groundtruth=labels.h5:stack --where=cluster --t=60``."""
from ffn.cli import script_main

script_main("sweep")
