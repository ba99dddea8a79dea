"""Result files of FFN inference, readable and writable by both this toolkit and google/ffn.

Layout (``corner`` is the subvolume's lowest voxel; file names give it as x_y_z)::

  <output_dir>/<x>/<y>/seg-<x>_<y>_<z>.npz     segmentation result
  <output_dir>/<x>/<y>/seg-<x>_<y>_<z>.prob    quantised object probability (npz, key ``qprob``)
  <output_dir>/<x>/<y>/seg-<x>_<y>_<z>.cpoint  inference checkpoint (deleted when done)

The ``.npz`` holds, like google/ffn's ``storage.save_subvolume``: ``segmentation`` (z,y,x, the
smallest unsigned dtype holding the largest id), ``origins`` (pickled dict id -> :class:`OriginInfo`,
``start_zyx`` relative to the subvolume corner), ``overlaps`` (pickled dict id -> 2xN array of
overlapped ids and voxel counts), ``request`` (serialised InferenceRequest bytes) and ``counters``
(JSON string). :class:`OriginInfo` keeps google's module path (``ffn.inference.storage``) and field
names, so pickled origins load in either code base.
"""

from __future__ import annotations

import collections
import glob
import io
import os
import re
from typing import Sequence

import numpy as np

from ffn.errors import FFNError
from ffn.io.atomic import write_bytes_atomic

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


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  return buf.getvalue()


def save_npz_atomic(path: str, **arrays) -> None:
  """``np.savez_compressed`` to ``path`` via a temporary file and rename (no ``.npz`` appended)."""
  write_bytes_atomic(path, _npz_bytes(**arrays))


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


def load_segmentation(output_dir: str, corner_zyx: Sequence[int], allow_cpoint: bool = False,
                      threshold: float | None = None, min_size: int = 0) -> tuple[np.ndarray, dict]:
  """Loads a subvolume result like google/ffn's ``storage.load_segmentation``.

  ``threshold``: drop voxels whose saved object probability is below it (needs the ``.prob`` file);
  ``min_size``: drop segments smaller than this many voxels. Returns (uint64 labels z,y,x, origins).
  Unlike google's default, connected components are not recomputed.
  """
  path = existing_segmentation_path(output_dir, corner_zyx, allow_cpoint)
  if path is None:
    raise FFNError(f"{output_dir}: no segmentation for corner {list(corner_zyx)[::-1]} (x,y,z)")
  seg, origins = load_segmentation_file(path)
  if threshold is not None:
    prob_path = object_prob_path(output_dir, corner_zyx)
    if not os.path.exists(prob_path):
      prob_path = legacy_subvolume_path(output_dir, corner_zyx, "prob")
    if not os.path.exists(prob_path):
      raise FFNError(f"{output_dir}: probability map for corner {list(corner_zyx)[::-1]} not found")
    with _open_npz(prob_path) as data:
      if "qprob" not in data:
        raise FFNError(f"{prob_path}: no 'qprob' array (not an FFN probability map)")
      prob = dequantize_probability(data["qprob"])
    seg[~(prob >= threshold)] = 0
  if min_size:
    ids, counts = np.unique(seg, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    seg[np.isin(seg, small)] = 0
    origins = {k: v for k, v in origins.items() if k not in set(small.tolist())}
  return seg, origins
