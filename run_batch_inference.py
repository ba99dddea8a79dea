"""SLURM-fork-compatible entry point: ``python run_batch_inference.py --inference_request=... --subvolume_size=...``."""
from ffn.cli import script_main

script_main("batch_inference")
