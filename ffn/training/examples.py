"""Training examples for an FFN, as numpy (google/ffn ``train.py``/``inputs.py``/``mask.py`` semantics).

An *example* is an image patch and a label patch of ``fov + 2 * deltas`` voxels around a training
coordinate. Inside it the FOV starts at the centre and moves by +/- deltas ("fixed" policy) to each
position where the model's own prediction so far reaches ``threshold``; every FOV position is one
training sample. All arrays are z,y,x; offsets and sizes named ``_xyz`` are x,y,z (:mod:`ffn.axes`).
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from ffn.axes import xyz_to_zyx


def logit(p: float) -> float:
  return float(np.log(p / (1.0 - p)))


def example_size_xyz(fov_xyz: Sequence[int], deltas_xyz: Sequence[int]) -> np.ndarray:
  """Size (x,y,z) of the patch loaded per example: one FOV move each way (google, fov_moves=1)."""
  return np.asarray(fov_xyz, np.int64) + 2 * np.asarray(deltas_xyz, np.int64)


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
