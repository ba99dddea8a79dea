"""The ``ffn`` console command: one subcommand per pipeline step.

Each subcommand lives in the module that implements its stage and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command
runs, and no ``add_arguments`` imports TensorFlow, so ``ffn --help`` and ``ffn <step> --help``
stay fast. Without ``--verbose``, TensorFlow's start-up log lines are kept out of the console
(:mod:`ffn.quiet_tf`). The top-level scripts
(``compute_partitions.py``, ``build_coordinates.py``, ...) are thin wrappers over :func:`main`.

Flag names follow google/ffn (``--input_volume``, ``--partition_volumes``...), so existing command
lines keep working; ``--flag=value`` and ``--flag value`` are both accepted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from ffn import quiet_tf
from ffn.errors import FFNError

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ffn.data.prepare", "stats, partitions and coordinates of a labelled volume (default: the shipped sample)"),
    "convert": ("ffn.data.convert", "convert a PNG/TIFF slice stack to an HDF5 dataset"),
    "preprocess": ("ffn.data.preprocess", "CLAHE of each section of an image stack (--clahe) -> uint8 HDF5"),
    "stats": ("ffn.data.stats", "image mean, standard deviation and histogram (for normalisation)"),
    "apply_transforms": ("ffn.data.groundtruth",
                         "map superpixel ground truth to body labels with a transforms table"),
    "compute_partitions": ("ffn.data.partitions", "label local-shape partitions (google/ffn flags)"),
    "build_coordinates": ("ffn.data.coordinates",
                          "sample balanced training coordinates to a TFRecord (google/ffn flags)"),
    "train": ("ffn.training.cli", "train an FFN (google/ffn train.py flags)"),
    "slurm_train": ("ffn.training.distributed",
                    "train an FFN as a Slurm job: synchronous or parameter-server, requeued on preemption"),
    "run_inference": ("ffn.inference.cli", "segment a volume with a trained FFN (InferenceRequest pbtxt)"),
    "batch_inference": ("ffn.inference.batch", "segment a large box as overlapping chunks on a Slurm job array"),
    "batch_status": ("ffn.inference.batch_status", "chunks done/running/failed/pending, voxels/s, ETA of a batch run"),
    "consensus": ("ffn.consensus.cli", "split consensus of two results of one subvolume (ConsensusRequest pbtxt)"),
    "stitch": ("ffn.stitch.cli", "stitch overlapping chunk results into one volume with global ids (HDF5 / Zarr / precomputed)"),
    "sweep": ("ffn.sweep.cli", "segment and score evaluation boxes with every checkpoint (job array), pick the best"),
    "evaluate": ("ffn.metrics.cli", "VI split/merge, adjusted and adapted Rand error, object counts vs ground truth"),
    "export": ("ffn.inference.export",
               "export a segmentation to HDF5 / TIFF / PNG / Neuroglancer precomputed, preview PNG"),
    "serve": ("ffn.inference.serve", "serve a folder over HTTP with CORS headers (for Neuroglancer)"),
    "dvid": ("ffn.dvid.cli", "DVID: upload a segmentation as supervoxels, post an agglomeration's merges"),
    "demo": ("ffn.demo", "end-to-end demo on the shipped FIB-25 sample"),
    "pipeline": ("ffn.pipeline.cli", "raw volume -> agglomerated segmentation from one TOML file: the stages as dependent Slurm job arrays (run | status | report)"),
    "reseg": ("ffn.reseg.cli", "FFN-guided resegmentation: pairs, run, analyze, agglomerate, queue"),
    "secgan": ("secgan.cli", "SECGAN domain transfer: train | transfer | slurm_train (segmentation-enhanced CycleGAN)"),
}


def _canonical(name: str) -> str:
  return name.replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="ffn", description="Flood-Filling Networks toolkit.")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (_, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = False
  while argv and argv[0] in ("-v", "--verbose"):
    verbose = True
    argv.pop(0)
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  if not argv or argv[0] in ("-h", "--help") or _canonical(argv[0]) not in COMMANDS:
    parser = build_parser()
    if argv and argv[0] not in ("-h", "--help"):
      parser.print_usage(sys.stderr)
      print(f"ffn: error: unknown command {argv[0]!r} (one of: {', '.join(COMMANDS)})",
            file=sys.stderr)
      return 2
    parser.print_help()
    return 0
  name = _canonical(argv[0])
  if not verbose:  # TensorFlow's start-up banners would precede every output and error line
    quiet_tf.install()
  module = importlib.import_module(COMMANDS[name][0])
  parser = argparse.ArgumentParser(prog=f"ffn {name}", description=COMMANDS[name][1])
  module.add_arguments(parser)
  args = parser.parse_args(argv[1:])
  try:
    return int(module.run(args) or 0)
  except FFNError as e:
    print(f"ffn {name}: error: {e}", file=sys.stderr)
    return 2
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    print(f"ffn {name}: error: TensorFlow is not installed in {sys.prefix} (README.md: "
          "'Installing by hand, GPU')", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"ffn {name}: interrupted", file=sys.stderr)
    return 130


def script_main(command: str) -> None:
  """Entry point for the google/ffn-style top-level scripts (``python compute_partitions.py ...``)."""
  sys.exit(main([command] + sys.argv[1:]))


if __name__ == "__main__":
  sys.exit(main())
