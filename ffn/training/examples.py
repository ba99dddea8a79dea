"""Training examples for an FFN, as numpy (google/ffn ``train.py``/``inputs.py``/``mask.py`` semantics).

An *example* is an image patch and a label patch of ``fov + 2 * moves * deltas`` voxels around a
training coordinate (``moves``: :func:`patch_moves`). Inside it the FOV starts at the centre and is
moved by an FOV policy that reads the model's own predictions so far: "fixed" visits the +/- deltas
shifts where the prediction reaches ``threshold``; "max_pred_moves" follows the face maxima as
inference does. Every FOV position is one training sample. All arrays are z,y,x; offsets and sizes
named ``_xyz`` are x,y,z (:mod:`ffn.axes`).
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator, Sequence

import numpy as np

from ffn.axes import xyz_to_zyx, zyx_to_xyz
from ffn.inference.movement import scored_move_offsets

FOV_POLICIES = ("fixed", "max_pred_moves")


def logit(p: float) -> float:
  return float(np.log(p / (1.0 - p)))


def patch_moves(fov_policy: str, fov_moves: int) -> int:
  """FOV moves of ``deltas`` each way that the loaded patch must hold (google's ``fov_moves()``).

  ``fov_moves`` for "fixed"; one more for "max_pred_moves", whose path is not limited to the
  shifts around the centre (google adds it for a fuller mask around the path).
  """
  return fov_moves + 1 if fov_policy == "max_pred_moves" else fov_moves


def example_size_xyz(fov_xyz: Sequence[int], deltas_xyz: Sequence[int], moves: int = 1) -> np.ndarray:
  """Size (x,y,z) in voxels of the patch loaded per example: ``fov + 2 * moves * deltas``."""
  return np.asarray(fov_xyz, np.int64) + 2 * int(moves) * np.asarray(deltas_xyz, np.int64)


def object_mask(labels: np.ndarray) -> np.ndarray:
  """Boolean mask of the object at the centre voxel of a z,y,x label patch (label 0 is never one)."""
  centre = labels[tuple(s // 2 for s in labels.shape)]
  return (labels == centre) & (labels > 0)


def soften_labels(mask: np.ndarray, soft: float = 0.05) -> np.ndarray:
  """float32 targets: ``1 - soft`` inside the mask, ``soft`` outside (google: 0.95 / 0.05)."""
  return np.where(mask, 1.0 - soft, soft).astype(np.float32)


def augment(rng: np.random.Generator, arrays: Sequence[np.ndarray],
            permutable_axes: Sequence[int] = (1, 2),
            reflectable_axes: Sequence[int] = (0, 1, 2)) -> list[np.ndarray]:
  """Applies one random axis permutation and reflection to each z,y,x array identically.

  Axes are numbered 0=z, 1=y, 2=x (google's ``--permutable_axes``/``--reflectable_axes``).
  """
  perm = list(range(3))
  if len(permutable_axes) > 1:
    shuffled = rng.permutation(list(permutable_axes))
    for src, dst in zip(permutable_axes, shuffled):
      perm[src] = int(dst)
  flips = tuple(a for a in reflectable_axes if rng.random() > 0.5)
  out = []
  for a in arrays:
    a = np.transpose(a, perm)
    if flips:
      a = np.flip(a, flips)
    out.append(np.ascontiguousarray(a))
  return out


def initial_seed(shape_zyx: Sequence[int], pad: float = 0.05, centre: float = 0.95) -> np.ndarray:
  """Seed logits canvas: logit(pad) everywhere, logit(centre) at the centre voxel (float32)."""
  seed = np.full(tuple(shape_zyx), logit(pad), np.float32)
  seed[tuple(s // 2 for s in shape_zyx)] = logit(centre)
  return seed


def fov_shifts(deltas_xyz: Sequence[int]) -> list[tuple[int, int, int]]:
  """The 26 non-zero moves (x,y,z) of +/- deltas (google ``FFNModel.shifts``)."""
  d = deltas_xyz
  return [(dx, dy, dz) for dx, dy, dz in itertools.product((-d[0], 0, d[0]), (-d[1], 0, d[1]),
                                                           (-d[2], 0, d[2])) if (dx, dy, dz) != (0, 0, 0)]


def crop(array: np.ndarray, offset_xyz: Sequence[int], size_zyx: Sequence[int]) -> np.ndarray:
  """A view of ``size_zyx`` voxels centred at the array centre shifted by ``offset_xyz``."""
  off = xyz_to_zyx(offset_xyz)
  start = [s // 2 + o - n // 2 for s, o, n in zip(array.shape, off, size_zyx)]
  return array[tuple(slice(b, b + n) for b, n in zip(start, size_zyx))]


def fixed_policy(seed: np.ndarray, shifts: Sequence[tuple[int, int, int]],
                 threshold: float) -> Iterator[tuple[int, int, int]]:
  """FOV offsets (x,y,z) to visit: the centre, then each shift whose voxel in ``seed`` reaches
  ``logit(threshold)``. Lazy: ``seed`` is read when each shift is considered, so predictions
  written into it in between count (google's ``fixed_offsets``)."""
  t = logit(threshold)
  for off in itertools.chain([(0, 0, 0)], shifts):
    z, y, x = (s // 2 + o for s, o in zip(seed.shape, xyz_to_zyx(off)))
    if seed[z, y, x] >= t:
      yield off


def max_pred_policy(seed: np.ndarray, fov_xyz: Sequence[int], deltas_xyz: Sequence[int],
                    threshold: float) -> Iterator[tuple[int, int, int]]:
  """FOV offsets (x,y,z, voxels from the patch centre) chosen as inference would move the FOV
  (google's ``max_pred_offsets``).

  Starts at (0,0,0). After each offset is yielded (and the caller has written the prediction into
  ``seed``), the ``fov``-sized prediction around it gives the face-maximum moves of
  :func:`ffn.inference.movement.scored_move_offsets` at ``logit(threshold)``; they join a FIFO
  queue, best score first. A queued offset is skipped when its FOV would leave ``seed`` (the loaded
  patch) or when its cell ``offset // max(deltas, 1)`` (x,y,z, floor division) was visited already.
  """
  fov_zyx, deltas_zyx = xyz_to_zyx(fov_xyz), xyz_to_zyx(deltas_xyz)
  reach_xyz = np.array(zyx_to_xyz([s // 2 for s in seed.shape])) - np.asarray(fov_xyz) // 2
  cell_xyz = np.maximum(np.asarray(deltas_xyz), 1)
  t = logit(threshold)
  queue: collections.deque = collections.deque([(0, 0, 0)])
  visited: set = set()
  while queue:
    off = queue.popleft()
    if np.any(np.abs(off) > reach_xyz):
      continue
    cell = tuple(int(c) for c in np.floor_divide(off, cell_xyz))
    if cell in visited:
      continue
    visited.add(cell)
    yield off
    moves = sorted(scored_move_offsets(deltas_zyx, crop(seed, off, fov_zyx), t), reverse=True)
    queue.extend(tuple(o + m for o, m in zip(off, zyx_to_xyz(move_zyx))) for _, move_zyx in moves)
