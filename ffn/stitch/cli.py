"""``ffn stitch``: one segmentation with global ids from overlapping chunk results.

  ffn stitch --segmentation_dir results/ --output stitched.h5:seg
  ffn stitch --segmentation_dir results/ --output precomputed://view/segmentation --sharded
  ffn stitch --consensus_request consensus.pbtxt --output zarr://stitched.zarr

Input: a directory of ``seg-<x>_<y>_<z>.npz`` chunk results in google's layout that tile a region
with overlaps (``ffn run_inference --subvolume_size S --overlap O``, ``ffn batch_inference``, or
google's / the SLURM fork's tools), a batch run's results directory or its ``manifest.json`` (the
chunks are then checked against the run's tiling), or a ConsensusRequest whose two sources are
such directories (the split consensus of every chunk is stitched), or ``--segmentation_dirs "a b
c"`` (the SLURM fork's ``run_consensus.py`` flags, also ``--outspec``, ``--min_ffn_size``,
``--min_split_size``): run a split by runs b and c chunk by chunk, then stitched -- where the fork
wrote the chunks first-writer-wins into one uint32 volume without merging across seams.

Merge rule, in every overlap of two chunks: objects a and b are merged when they share
``count >= --min_overlap`` voxels there and ``count / min(size of a, size of b in the overlap) >=
--min_agreement``, one-to-one (pairs in decreasing count; an object already matched in that
overlap takes no other partner). Each output voxel comes from the chunk whose interior owns it
(every overlap is split in the middle); where that chunk left it unsegmented, from the covering
chunk that segmented it from deepest inside (:mod:`ffn.stitch.fill`). Ids are uint64, 1..N,
0 = background.

Output: ``--output`` (``path.h5:dataset``, ``zarr://path``, ``precomputed://path`` or a
TensorStore JSON spec; see :mod:`ffn.io.tensorstore_volumes`); the work directory (``--work_dir``,
default ``<output path>.stitch``) holds ``idmap.npz`` ((chunk, local id) -> global id),
``summary.json`` and the state that lets a re-run of the same command resume.

Exit status: 0 when stitched, 2 on bad input or a failed phase (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import logging

from ffn.axes import parse_xyz, xyz_to_zyx
from ffn.errors import FFNError

_log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from slurm.executor import add_slurm_arguments
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--segmentation_dir", default=None,
                      help="chunk results (google's layout), a batch run's results directory, or "
                           "its batch/manifest.json")
  source.add_argument("--consensus_request", default=None,
                      help="ConsensusRequest (.pbtxt path or text): stitch the split consensus of "
                           "its two sources, chunk by chunk")
  source.add_argument("--segmentation_dirs", default=None,
                      help="several runs of the same chunks, space separated (the SLURM fork's "
                           "run_consensus.py flag): the first split by each of the others, chunk "
                           "by chunk, then stitched")
  parser.add_argument("--output", "--outspec", required=True,
                      help="path.h5:dataset, zarr://path, precomputed://path or a TensorStore spec "
                           "(--outspec: the SLURM fork's name)")
  parser.add_argument("--work_dir", default=None,
                      help="state, id map and summary (default: <output path>.stitch)")
  parser.add_argument("--min_agreement", type=float, default=0.5,
                      help="merge when overlap / min(object sizes in the overlap) >= this "
                           "(default: %(default)s)")
  parser.add_argument("--min_overlap", type=int, default=100,
                      help="and when they share at least this many voxels (default: %(default)s)")
  parser.add_argument("--subvolume_size", default=None,
                      help="check that the chunks are split_box(region, this, --overlap) (x,y,z)")
  parser.add_argument("--overlap", default=None, help="overlap x,y,z for --subvolume_size")
  parser.add_argument("--bounding_box", default=None,
                      help="the region that was split, 'start { x: y: z: } size { x: y: z: }' "
                           "(with --subvolume_size; default: the region the chunks cover)")
  parser.add_argument("--split_cc", action="store_true",
                      help="split every chunk's objects into 6-connected pieces first (google's "
                           "load_segmentation option)")
  parser.add_argument("--min_size", "--min_ffn_size", type=int, default=0,
                      help="clear objects smaller than this (voxels) in every chunk (of every run) "
                           "first (--min_ffn_size: the SLURM fork's name)")
  parser.add_argument("--min_split_size", type=int, default=0,
                      help="with --segmentation_dirs: clear consensus pieces smaller than this "
                           "(voxels)")
  parser.add_argument("--block_size", default="64,64,64",
                      help="output block written by one task, x,y,z (a multiple of --chunk_size; "
                           "default: %(default)s)")
  parser.add_argument("--chunk_size", default="64,64,64",
                      help="storage chunk of the output, x,y,z (default: %(default)s)")
  parser.add_argument("--resolution", default="10,10,10",
                      help="voxel size in nm, x,y,z, for precomputed output (default: FIB-25's)")
  parser.add_argument("--sharded", action="store_true",
                      help="precomputed: one shard file per output block (fewer files)")
  parser.add_argument("--num_tasks", type=int, default=16,
                      help="most array tasks per phase (default: %(default)s)")
  parser.add_argument("--items_per_task", type=int, default=1,
                      help="at least this many chunks / pairs / blocks per task (default: 1)")
  parser.add_argument("--retry_failed", action="store_true",
                      help="resubmit the blocks of failed tasks")
  add_slurm_arguments(parser)


def _floats3(text: str, name: str) -> tuple[float, float, float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    raise FFNError(f"{name}: expected three numbers x,y,z, got {text!r}") from None
  if len(values) == 1:
    values *= 3
  if len(values) != 3:
    raise FFNError(f"{name}: expected three numbers x,y,z, got {text!r}")
  return (values[0], values[1], values[2])


def run(args: argparse.Namespace) -> int:
  from ffn.io.tensorstore_volumes import parse_labels_spec
  from ffn.stitch.stitch import JobControl, Params, make_plan, stitch
  from slurm.executor import SlurmOptions
  options = SlurmOptions.from_args(args)
  if args.num_tasks < 1:
    raise FFNError(f"--num_tasks must be at least 1, got {args.num_tasks}")
  if args.items_per_task < 1:
    raise FFNError(f"--items_per_task must be at least 1, got {args.items_per_task}")
  if args.overlap is not None and args.subvolume_size is None:
    raise FFNError("--overlap needs --subvolume_size")
  output = parse_labels_spec(args.output)
  params = Params(args.min_agreement, args.min_overlap,
                  xyz_to_zyx(parse_xyz(args.block_size, "--block_size")),  # type: ignore[arg-type]
                  xyz_to_zyx(parse_xyz(args.chunk_size, "--chunk_size")),  # type: ignore[arg-type]
                  _floats3(args.resolution, "--resolution"), args.sharded)
  request = None
  if args.consensus_request is not None:
    from ffn.consensus.consensus import load_consensus_request
    request = load_consensus_request(args.consensus_request).SerializeToString()
  dirs: list[str] = []
  if args.segmentation_dirs is not None:
    dirs = args.segmentation_dirs.split()
    if not dirs:
      raise FFNError("--segmentation_dirs: no directory given")
  elif args.segmentation_dir is None and request is None:
    raise FFNError("give --segmentation_dir (or --consensus_request, --segmentation_dirs)")
  if args.min_split_size < 0:
    raise FFNError(f"--min_split_size must be >= 0, got {args.min_split_size}")
  if args.min_split_size and len(dirs) < 2:
    raise FFNError("--min_split_size applies to a consensus of two or more --segmentation_dirs")
  size = parse_xyz(args.subvolume_size, "--subvolume_size") if args.subvolume_size else None
  overlap = parse_xyz(args.overlap, "--overlap") if args.overlap else None
  if args.min_size < 0:
    raise FFNError(f"--min_size must be >= 0, got {args.min_size}")
  box = None
  if args.bounding_box is not None:
    from ffn.inference.request import parse_bounding_box
    box = parse_bounding_box(args.bounding_box)
  plan = make_plan(dirs[0] if dirs else args.segmentation_dir, output, args.work_dir, params,
                   args.split_cc, args.min_size, request, size, overlap, box, dirs[1:],
                   args.min_split_size)
  _log.info("stitching %d chunks (%s x,y,z grid) of %s into %s; work directory %s",
            plan.tiling.num_chunks, "x".join(map(str, plan.tiling.grid_shape[::-1])),
            plan.source.directory, output, plan.work_dir)
  summary = stitch(plan, JobControl(options, args.num_tasks, args.items_per_task,
                                    args.retry_failed))
  print(json.dumps({k: summary[k] for k in ("output", "id_map", "chunks", "overlapping_pairs",
                                            "objects", "objects_merged_across_seams")}))
  print(f"summary: {plan.work_dir / 'summary.json'}")
  return 0
