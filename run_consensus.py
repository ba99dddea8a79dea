"""google/ffn-compatible entry point: ``python run_consensus.py --consensus_request=... --bounding_box=...``."""
from ffn.cli import script_main

script_main("consensus")
