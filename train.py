"""google/ffn-compatible training entry point: ``python train.py --train_coords ... --model_name ...``."""

from ffn.cli import script_main

if __name__ == "__main__":
  script_main("train")
