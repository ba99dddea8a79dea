"""``ffn consensus`` / ``run_consensus.py``: consensus of two results of one subvolume.

  ffn consensus --consensus_request=consensus.pbtxt \\
      --bounding_box 'start { x:0 y:0 z:0 } size { x:250 y:250 z:250 }'

The bounding box's start is the subvolume corner of both results (their ``seg-<x>_<y>_<z>.npz``);
its size must be their shape. The consensus is saved in google's layout in the request's
``segmentation_output_dir``, and with ``--output_h5 file.h5:dataset`` also as an HDF5 volume.
With ``--subvolume_size``/``--overlap`` (the values given to ``ffn run_inference``) every
subvolume of the box gets its own consensus.

Exit status: 0 when the result exists (also when it already existed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging

from ffn.axes import BoundingBox, parse_xyz, split_box, xyz_to_zyx
from ffn.errors import FFNError
from ffn.io.atomic import check_writable_dir
from ffn.io.volumes import VolumeSpec, h5_has_dataset, parse_spec, write_spec
from ffn.progress import track

_log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--consensus_request", required=True,
                      help="ConsensusRequest text proto: a .pbtxt path or the text itself")
  parser.add_argument("--bounding_box", required=True,
                      help="the subvolume as 'start { x: y: z: } size { x: y: z: }' (start = the "
                           "corner in both results' seg-<x>_<y>_<z>.npz names)")
  parser.add_argument("--output_h5", default=None,
                      help="also write the consensus to this HDF5 spec 'file.h5:dataset' (z,y,x)")
  parser.add_argument("--subvolume_size", default=None,
                      help="the box was segmented in subvolumes of this size 'x,y,z' (as given to "
                           "run_inference): one consensus per subvolume")
  parser.add_argument("--overlap", default="0,0,0",
                      help="overlap 'x,y,z' of those subvolumes (as given to run_inference)")


def run(args: argparse.Namespace) -> int:
  from ffn.consensus.consensus import load_consensus_request
  from ffn.inference.request import parse_bounding_box
  request = load_consensus_request(args.consensus_request)
  box = parse_bounding_box(args.bounding_box)
  h5 = None
  if args.output_h5:
    if args.subvolume_size:
      raise FFNError("--output_h5 writes one subvolume; it cannot be combined with --subvolume_size")
    h5 = parse_spec(args.output_h5)
    if h5.dataset is None:
      raise FFNError(f"--output_h5: expected 'file.h5:dataset', got {args.output_h5!r}")
    check_writable_dir(h5.path)
  boxes = [box]
  if args.subvolume_size:
    boxes = split_box(box, parse_xyz(args.subvolume_size, "--subvolume_size"),
                      parse_xyz(args.overlap, "--overlap"))
  for sub in track(boxes, "consensus", unit="subvolume") if len(boxes) > 1 else boxes:
    _one(request, sub, h5, args.output_h5)
  return 0


def _one(request, box: BoundingBox, h5: VolumeSpec | None, h5_text: str | None) -> None:
  """The consensus of one subvolume (skipped when its result exists), plus the HDF5 copy."""
  from ffn.consensus.consensus import compute_consensus, save_consensus
  from ffn.inference import storage
  corner, shape = xyz_to_zyx(box.start.tolist()), xyz_to_zyx(box.size.tolist())
  done = storage.existing_segmentation_path(request.segmentation_output_dir, corner)
  h5_done = h5 is None or h5_has_dataset(h5.path, h5.dataset)
  if done and h5_done:
    _log.info("already done: %s", done)
    return
  if done is None and h5 is not None and h5_done:
    raise FFNError(f"--output_h5: {h5_text} already exists but {request.segmentation_output_dir} "
                   "has no consensus for this box; remove it or choose another dataset")
  if done is None:
    labels, origins = compute_consensus(request, corner, shape)
    done = save_consensus(labels, origins, request, corner)
    _log.info("result: %s", done)
  else:
    labels, _ = storage.load_segmentation_file(done)
  if h5 is not None:
    write_spec(h5, storage.reduce_id_bits(labels))
    _log.info("result: %s", h5_text)
