"""Consensus of two FFN results for one subvolume: ConsensusRequest parsing, loading, computing.

The request (``consensus.proto``, google/ffn's field names and numbers) names two result
directories as ``SegmentationSource`` s; both are read at the same corner with
:func:`ffn.inference.storage.load_segmentation_from_source` (threshold, mask, split_cc, min_size),
combined (:mod:`ffn.consensus.split`) and saved like an inference result in
``segmentation_output_dir`` (``<x>/<y>/seg-<x>_<y>_<z>.npz``), which google's tools read back.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np

from ffn.consensus import consensus_pb2
from ffn.consensus.split import kept_origins, split_by_intersection
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.io.textproto import parse_text_proto, read_text_proto

_log = logging.getLogger(__name__)

ConsensusRequest = consensus_pb2.ConsensusRequest

# ConsensusType -> (seg1, seg2, request) -> consensus labels (z,y,x).
_METHODS: dict[int, Callable[[np.ndarray, np.ndarray, ConsensusRequest], np.ndarray]] = {
    ConsensusRequest.CONSENSUS_SPLIT:
        lambda seg1, seg2, request: split_by_intersection(seg1, seg2, request.split_min_size),
}


def parse_consensus_request(text: str, where: str = "consensus request") -> ConsensusRequest:
  """Parses and checks ConsensusRequest text format; any problem -> one-line FFNError."""
  request = parse_text_proto(text, ConsensusRequest(), where)
  check_request(request, where)
  return request


def load_consensus_request(path_or_text: str) -> ConsensusRequest:
  """A ConsensusRequest from a pbtxt file path, or from the text itself (as google's flag allows)."""
  request = read_text_proto(path_or_text, ConsensusRequest(), "--consensus_request",
                            "consensus request")
  check_request(request, path_or_text if os.path.isfile(path_or_text) else "--consensus_request")
  return request


def check_request(request: ConsensusRequest, where: str = "consensus request") -> None:
  """FFNError unless both sources and the output directory are set, distinct, and sizes >= 0."""
  for field in ("segmentation1", "segmentation2"):
    if not getattr(request, field).directory:
      raise FFNError(f"{where}: {field} {{ directory: ... }} is not set")
  if not request.segmentation_output_dir:
    raise FFNError(f"{where}: segmentation_output_dir is not set")
  out = os.path.realpath(request.segmentation_output_dir)
  for field in ("segmentation1", "segmentation2"):
    if os.path.realpath(getattr(request, field).directory) == out:
      raise FFNError(f"{where}: segmentation_output_dir must differ from {field}.directory "
                     f"({request.segmentation_output_dir})")
  if request.split_min_size < 0:
    raise FFNError(f"{where}: split_min_size must be >= 0, got {request.split_min_size}")
  if request.type not in _METHODS:
    raise FFNError(f"{where}: unsupported consensus type {request.type}")


def consensus_of(seg1: np.ndarray, seg2: np.ndarray, request: ConsensusRequest) -> np.ndarray:
  """The consensus (uint64, z,y,x) of two label arrays of one shape, by ``request.type``."""
  return _METHODS[request.type](seg1, seg2, request)


def _load(request: ConsensusRequest, field: str, corner_zyx: Sequence[int]) -> tuple[np.ndarray, dict]:
  try:
    return storage.load_segmentation_from_source(getattr(request, field), corner_zyx)
  except FFNError as e:
    raise FFNError(f"{field}: {e}") from None


def compute_consensus(request: ConsensusRequest, corner_zyx: Sequence[int],
                      shape_zyx: Sequence[int] | None = None) -> tuple[np.ndarray, dict]:
  """Loads both segmentations of the subvolume at ``corner_zyx`` and combines them.

  ``shape_zyx``: the expected subvolume shape (from ``--bounding_box``); both results must have it.
  Returns (labels uint64 z,y,x, origins of the segmentation1 objects that kept their id).
  """
  seg1, origins1 = _load(request, "segmentation1", corner_zyx)
  seg2, _ = _load(request, "segmentation2", corner_zyx)
  if seg1.shape != seg2.shape:
    raise FFNError(f"segmentation1 ({request.segmentation1.directory}) and segmentation2 "
                   f"({request.segmentation2.directory}) differ in shape: {list(seg1.shape[::-1])} "
                   f"vs {list(seg2.shape[::-1])} (x,y,z)")
  for field, seg in (("segmentation1", seg1), ("segmentation2", seg2)):
    if shape_zyx is not None and seg.shape != tuple(shape_zyx):
      raise FFNError(f"{field}: {getattr(request, field).directory}: result shape "
                     f"{list(seg.shape[::-1])} differs from the bounding box size "
                     f"{list(shape_zyx)[::-1]} (x,y,z)")
  labels = consensus_of(seg1, seg2, request)
  seg1_max = int(seg1.max()) if seg1.size else 0
  origins = kept_origins(origins1, seg1_max, labels)
  _log.info("consensus at %s (x,y,z): %d pieces of segmentation1 objects created by the split",
            list(corner_zyx)[::-1], max(int(labels.max(initial=0)) - seg1_max, 0))
  return labels, origins


def save_consensus(labels: np.ndarray, origins: dict, request: ConsensusRequest,
                   corner_zyx: Sequence[int]) -> str:
  """Saves a consensus as ``<segmentation_output_dir>/<x>/<y>/seg-<x>_<y>_<z>.npz`` (atomic, with the
  serialised request under ``request``, like an inference result); returns the path."""
  path = storage.segmentation_path(request.segmentation_output_dir, corner_zyx)
  storage.save_subvolume(labels, origins, path, request=request.SerializeToString())
  return path
