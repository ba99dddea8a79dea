"""google/ffn-compatible entry point: ``python run_inference.py --inference_request=... --bounding_box=...``."""
from ffn.cli import script_main

script_main("run_inference")
