"""Result files of FFN inference, readable and writable by both this toolkit and google/ffn.

Layout (``corner`` is the subvolume's lowest voxel; file names give it as x_y_z)::

  <output_dir>/<x>/<y>/seg-<x>_<y>_<z>.npz     segmentation result
  <output_dir>/<x>/<y>/seg-<x>_<y>_<z>.prob    quantised object probability (npz, key ``qprob``)
  <output_dir>/<x>/<y>/seg-<x>_<y>_<z>.cpoint  inference checkpoint (deleted when done; google's
                                               keys and forms, both ways: Canvas.save_checkpoint)

The ``.npz`` holds, like google/ffn's ``storage.save_subvolume``: ``segmentation`` (z,y,x, the
smallest unsigned dtype holding the largest id), ``origins`` (pickled dict id -> :class:`OriginInfo`,
``start_zyx`` relative to the subvolume corner), ``overlaps`` (pickled dict id -> 2xN array of
overlapped ids and voxel counts), ``request`` (serialised InferenceRequest bytes) and ``counters``
(JSON string). :class:`OriginInfo` keeps google's module path (``ffn.inference.storage``) and field
names, so pickled origins load in either code base.

A result of a run started from an existing segmentation (``InferenceRequest.init_segmentation``)
also holds ``local_to_global_ids``: a uint64 lookup table, ``local_to_global_ids[local_id]`` = the id
that object has in the initial segmentation volume (entry 0 is 0). The saved ``segmentation`` uses
the local ids; ids >= ``len(local_to_global_ids)`` are objects created by this run. google/ffn keeps
this map in memory only; this key is our addition (google's loaders ignore unknown keys).

:func:`load_segmentation` reads a result back like google/ffn's: optionally thresholded on the
saved probability, masked, split into connected components and cleared of small pieces.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Sequence

import numpy as np

from ffn import labels as label_ops
from ffn.errors import FFNError
from ffn.io.atomic import atomic_path

OriginInfo = collections.namedtuple("OriginInfo", ["start_zyx", "iters", "walltime_sec"])


def subvolume_path(output_dir: str, corner_zyx: Sequence[int], suffix: str) -> str:
  """``<output_dir>/<x>/<y>/seg-<x>_<y>_<z>.<suffix>`` for a z,y,x corner."""
  z, y, x = (int(v) for v in corner_zyx)
  return os.path.join(output_dir, str(x), str(y), f"seg-{x}_{y}_{z}.{suffix}")


def legacy_subvolume_path(output_dir: str, corner_zyx: Sequence[int], suffix: str) -> str:
  """google/ffn's older flat layout ``<output_dir>/seg-<x>_<y>_<z>.<suffix>``."""
  z, y, x = (int(v) for v in corner_zyx)
  return os.path.join(output_dir, f"seg-{x}_{y}_{z}.{suffix}")


def segmentation_path(output_dir: str, corner_zyx: Sequence[int]) -> str:
  return subvolume_path(output_dir, corner_zyx, "npz")


def object_prob_path(output_dir: str, corner_zyx: Sequence[int]) -> str:
  return subvolume_path(output_dir, corner_zyx, "prob")


def checkpoint_path(output_dir: str, corner_zyx: Sequence[int]) -> str:
  return subvolume_path(output_dir, corner_zyx, "cpoint")


def corner_from_path(path: str) -> tuple[int, int, int]:
  """The z,y,x corner encoded in a ``seg-<x>_<y>_<z>.npz`` file name."""
  match = re.search(r"seg-(\d+)_(\d+)_(\d+)\.npz$", os.path.basename(path))
  if match is None:
    raise FFNError(f"{path}: not an FFN result file name (expected seg-<x>_<y>_<z>.npz)")
  x, y, z = (int(v) for v in match.groups())
  return (z, y, x)


def existing_corners(output_dir: str) -> list[tuple[int, int, int]]:
  """z,y,x corners of all finished results in ``output_dir`` (both layouts)."""
  paths = glob.glob(os.path.join(output_dir, "seg-*_*_*.npz"))
  paths += glob.glob(os.path.join(output_dir, "*", "*", "seg-*_*_*.npz"))
  return sorted({corner_from_path(p) for p in paths})


def existing_segmentation_path(output_dir: str, corner_zyx: Sequence[int],
                               allow_cpoint: bool = False) -> str | None:
  """Path of a finished result (either layout), else a checkpoint if allowed, else None."""
  candidates = [segmentation_path(output_dir, corner_zyx),
                legacy_subvolume_path(output_dir, corner_zyx, "npz")]
  if allow_cpoint:
    candidates.append(checkpoint_path(output_dir, corner_zyx))
  for path in candidates:
    if os.path.exists(path):
      return path
  return None


def quantize_probability(prob: np.ndarray) -> np.ndarray:
  """Probabilities in [0, 1] -> uint8 bins 1..255 (google/ffn's scheme); NaN -> 0."""
  out = np.digitize(prob, np.linspace(0.0, 1.0, 255))
  out[np.isnan(prob)] = 0
  return out.astype(np.uint8)


def dequantize_probability(qprob: np.ndarray) -> np.ndarray:
  """Inverse of :func:`quantize_probability` (bin centres, float32); 0 -> NaN."""
  out = ((qprob.astype(np.float32) - 0.5) / 255.0).astype(np.float32)
  out[qprob == 0] = np.nan
  return out


def reduce_id_bits(labels: np.ndarray) -> np.ndarray:
  """Casts non-negative labels to the smallest unsigned dtype that holds the largest id."""
  max_id = int(labels.max()) if labels.size else 0
  for dtype in (np.uint8, np.uint16, np.uint32):
    if max_id <= np.iinfo(dtype).max:
      return labels.astype(dtype)
  return labels.astype(np.uint64)


def save_npz_atomic(path: str, **arrays) -> None:
  """``np.savez_compressed`` to ``path`` via a temporary file and rename (no ``.npz`` appended).

  The archive is streamed into the temporary file (numpy compresses each array in 16 MiB pieces),
  never assembled in memory.
  """
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez_compressed(f, **arrays)


def save_subvolume(labels: np.ndarray, origins: dict, output_path: str, **extra) -> None:
  """Saves a finished segmentation (labels z,y,x, ids >= 0) the way google/ffn does."""
  save_npz_atomic(output_path, segmentation=reduce_id_bits(labels), origins=origins, **extra)


def save_probability(qprob: np.ndarray, path: str) -> None:
  """Saves a quantised probability map (uint8, z,y,x) as an npz with key ``qprob``."""
  save_npz_atomic(path, qprob=qprob)


def _open_npz(path: str):
  try:
    return np.load(path, allow_pickle=True)
  except (OSError, ValueError) as e:
    raise FFNError(f"{path}: not a readable FFN npz file ({e})") from None


def load_origins(output_dir: str, corner_zyx: Sequence[int]) -> dict:
  """The ``origins`` dict (id -> OriginInfo) of a finished result."""
  path = existing_segmentation_path(output_dir, corner_zyx)
  if path is None:
    raise FFNError(f"{output_dir}: no finished segmentation for corner {list(corner_zyx)[::-1]} (x,y,z)")
  with _open_npz(path) as data:
    return data["origins"].item()


def load_segmentation_file(path: str) -> tuple[np.ndarray, dict]:
  """Labels (uint64, z,y,x) and origins from a result or checkpoint npz (ours or google's)."""
  with _open_npz(path) as data:
    if "segmentation" not in data:
      raise FFNError(f"{path}: no 'segmentation' array in this npz file")
    seg = data["segmentation"]
    origins = data["origins"].item() if "origins" in data else {}
  seg = np.where(seg < 0, 0, seg) if seg.dtype.kind == "i" else seg
  return seg.astype(np.uint64), origins


def split_disconnected_components(labels: np.ndarray, connectivity: int = 1) -> np.ndarray:
  """Gives every connected piece of every object its own id, like google's function of that name.

  ``labels``: z,y,x ids, 0 = background (stays 0). Voxels belong to one piece when they have the
  same id and are linked through neighbours: ``connectivity`` 1, 2 or 3 = 6, 18 or 26 neighbours
  (google uses 1). Pieces get ids 1..N in the raster (z,y,x C-order) order of their first voxel,
  which is how ``skimage.measure.label`` (google's implementation) numbers them. Returns an array
  of ``labels.dtype`` (uint64 if N does not fit in it). Cost: one pass over the volume
  (:func:`ffn.labels.connected_components`).
  """
  neighbours = {1: 6, 2: 18, 3: 26} if labels.ndim == 3 else {1: 4, 2: 8}
  if connectivity not in neighbours:
    raise ValueError(f"connectivity must be one of {sorted(neighbours)}, got {connectivity}")
  pieces, count = label_ops.connected_components(labels, neighbours[connectivity])
  dtype = labels.dtype if np.can_cast(np.min_scalar_type(count), labels.dtype) else np.uint64
  return pieces.astype(dtype, copy=False)


def clear_dust(labels: np.ndarray, min_size: int) -> np.ndarray:
  """Sets objects with fewer than ``min_size`` voxels to 0, in place; returns ``labels``."""
  return label_ops.clear_small(labels, min_size)


def clean_up(labels: np.ndarray, split_cc: bool = True, min_size: int = 0) -> dict[int, int]:
  """Splits objects into connected pieces and clears small ones, in place (google's ``clean_up``).

  Returns {new id: original id}, the original id being the one at the first voxel (raster order)
  of each new id; 0 maps to 0 when background remains.
  """
  original = labels.copy()
  if split_cc:
    labels[...] = split_disconnected_components(labels)
  if min_size > 0:
    clear_dust(labels, min_size)
  new_ids, first = label_ops.first_voxels(labels)
  return {int(n): int(o) for n, o in zip(new_ids, original.reshape(-1)[first])}


def _threshold(labels: np.ndarray, output_dir: str, corner_zyx: Sequence[int], threshold: float) -> None:
  prob_path = object_prob_path(output_dir, corner_zyx)
  if not os.path.exists(prob_path):
    prob_path = legacy_subvolume_path(output_dir, corner_zyx, "prob")
  if not os.path.exists(prob_path):
    raise FFNError(f"{output_dir}: probability map for corner {list(corner_zyx)[::-1]} (x,y,z) not found")
  with _open_npz(prob_path) as data:
    if "qprob" not in data:
      raise FFNError(f"{prob_path}: no 'qprob' array (not an FFN probability map)")
    prob = dequantize_probability(data["qprob"])
  if prob.shape != labels.shape:
    raise FFNError(f"{prob_path}: probability map shape {prob.shape} differs from the segmentation's "
                   f"{labels.shape} (z,y,x)")
  labels[prob < threshold] = 0  # like google: voxels without a saved probability (NaN) are kept


def load_segmentation(output_dir: str, corner_zyx: Sequence[int], allow_cpoint: bool = False,
                      threshold: float | None = None, split_cc: bool = True, min_size: int = 0,
                      mask_config=None) -> tuple[np.ndarray, dict]:
  """Loads a subvolume result the way google/ffn's ``storage.load_segmentation`` does.

  Steps, in google's order: ``threshold`` -- set voxels whose saved object probability (the
  ``.prob`` file) is below it to 0 (voxels with no saved probability are kept); ``mask_config`` --
  a ``MaskConfigs`` proto whose (volume) masks are set to 0; ``split_cc`` (default True, as in
  google) -- every 6-connected piece of an object becomes its own object, numbered 1..N in raster
  order (:func:`split_disconnected_components`); ``min_size`` -- objects (after splitting) with fewer
  voxels are set to 0. When splitting or size filtering is done, origins are re-keyed to the new
  ids: every piece of a split object keeps the original object's origin, and cleared objects lose
  theirs. Returns (uint64 labels z,y,x, origins). Failed-seed markers (-1) in a checkpoint read as 0.
  """
  path = existing_segmentation_path(output_dir, corner_zyx, allow_cpoint)
  if path is None:
    raise FFNError(f"{output_dir}: no segmentation for corner {list(corner_zyx)[::-1]} (x,y,z)")
  seg, origins = load_segmentation_file(path)
  if threshold is not None:
    _threshold(seg, output_dir, corner_zyx, threshold)
  if mask_config is not None:
    from ffn.inference.masks import build_mask
    mask = build_mask(mask_config.masks, None, "mask_config.masks", corner_zyx, shape_zyx=seg.shape)
    if mask is not None:
      seg[mask] = 0
  if split_cc or min_size > 0:
    new_to_old = clean_up(seg, split_cc, min_size)
    origins = {new: origins[old] for new, old in new_to_old.items() if old in origins}
  return seg, origins


def load_segmentation_from_source(source, corner_zyx: Sequence[int]) -> tuple[np.ndarray, dict]:
  """:func:`load_segmentation` for a ``SegmentationSource`` proto (fields left unset keep their
  defaults, as in google/ffn)."""
  kwargs: dict = {}
  if source.HasField("threshold"):
    kwargs["threshold"] = source.threshold
  if source.HasField("split_cc"):
    kwargs["split_cc"] = source.split_cc
  if source.HasField("min_size"):
    kwargs["min_size"] = source.min_size
  if source.HasField("mask"):
    kwargs["mask_config"] = source.mask
  return load_segmentation(source.directory, corner_zyx, **kwargs)
