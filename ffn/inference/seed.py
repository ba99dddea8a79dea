"""Seed policies: where the flood fill tries to start objects.

A policy is created with the canvas (for the image, shape, margin and restrictor mask) plus the
JSON keyword arguments of ``InferenceRequest.seed_policy_args``, and yields z,y,x seed points. Points
closer to the subvolume border than the canvas margin are skipped. Its state (all points and the
index of the next one) is saved in inference checkpoints.

Register a new policy with :func:`register`; it becomes available by class name in
``InferenceRequest.seed_policy``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage

from ffn.errors import FFNError

if TYPE_CHECKING:
  from ffn.inference.canvas import Canvas

_log = logging.getLogger(__name__)
POLICIES: dict[str, type["BaseSeedPolicy"]] = {}


def register(cls: type["BaseSeedPolicy"]) -> type["BaseSeedPolicy"]:
  """Class decorator adding a seed policy to the registry under its class name."""
  POLICIES[cls.__name__] = cls
  return cls


class BaseSeedPolicy:
  """Iterates over candidate seed points (z, y, x) computed lazily by :meth:`init_coords`."""

  def __init__(self, canvas: "Canvas", **kwargs):
    if kwargs:
      raise FFNError(f"seed_policy_args: unknown argument(s) {sorted(kwargs)} for {type(self).__name__}")
    self.canvas = canvas
    self.coords: np.ndarray | None = None  # [n, 3] int, z,y,x
    self.idx = 0

  def init_coords(self) -> np.ndarray:
    raise NotImplementedError

  def __iter__(self) -> "BaseSeedPolicy":
    return self

  def __next__(self) -> tuple[int, int, int]:
    if self.coords is None:
      self.coords = np.asarray(self.init_coords(), dtype=np.int64).reshape(-1, 3)
    margin = np.asarray(self.canvas.margin)
    shape = np.asarray(self.canvas.shape)
    while self.idx < self.coords.shape[0]:
      point = self.coords[self.idx]
      self.idx += 1
      if np.all(point - margin >= 0) and np.all(point + margin < shape):
        return tuple(int(v) for v in point)  # type: ignore[return-value]
    raise StopIteration

  def get_state(self, rewind: bool = False) -> tuple[np.ndarray | None, int]:
    """(points, next index); ``rewind`` points back at the last yielded seed (still in progress)."""
    return self.coords, (self.idx - 1 if rewind else self.idx)

  def set_state(self, state) -> None:
    coords, idx = state
    self.coords = None if coords is None else np.asarray(coords)
    self.idx = int(idx)


def peak_local_max(image: np.ndarray, min_distance: int) -> np.ndarray:
  """Local maxima (z,y,x rows) of ``image`` with value > 0, like ``skimage.feature.peak_local_max``.

  A voxel is a peak if it equals the maximum of the (2*min_distance+1)^3 cube around it; peaks
  within ``min_distance`` of the border are dropped (skimage's ``exclude_border=True``). The image
  is expected to be tie-free (google/ffn adds tiny noise), so no further spacing pass is needed.
  """
  size = 2 * min_distance + 1
  image_max = ndimage.maximum_filter(image, size=size, mode="nearest")
  mask = (image == image_max) & (image > 0)
  if min_distance > 0:
    for axis in range(image.ndim):
      index = [slice(None)] * image.ndim
      index[axis] = slice(0, min_distance)
      mask[tuple(index)] = False
      index[axis] = slice(image.shape[axis] - min_distance, None)
      mask[tuple(index)] = False
  return np.argwhere(mask)


@register
class PolicyPeaks(BaseSeedPolicy):
  """Points far from edges: Sobel edge magnitude, adaptive threshold, distance-transform peaks.

  Same steps and constants as google/ffn: gradient magnitude of the (normalised) image with a 3D
  Sobel filter; edges are voxels above their Gaussian-smoothed (sigma 49/6, reflect) magnitude;
  masked voxels count as edges; peaks (min_distance 3) of the Euclidean distance to the nearest edge,
  plus uniform noise in [0, 1e-4) from a fixed generator (seed 42) to break ties; points sorted
  ascending by (z, y, x).
  """

  def init_coords(self) -> np.ndarray:
    image = np.asarray(self.canvas.image, dtype=np.float32)
    edges = ndimage.generic_gradient_magnitude(image, ndimage.sobel)
    smoothed = np.zeros(edges.shape, dtype=np.float32)
    ndimage.gaussian_filter(edges, 49.0 / 6.0, output=smoothed, mode="reflect")
    is_edge = edges > smoothed
    del edges, smoothed
    if self.canvas.restrictor_mask is not None:
      is_edge[self.canvas.restrictor_mask] = True
    dist = ndimage.distance_transform_edt(~is_edge).astype(np.float32)
    noise = np.random.RandomState(42).random_sample(dist.shape)
    peaks = peak_local_max(dist + noise * 1e-4, min_distance=3)
    order = np.lexsort((peaks[:, 2], peaks[:, 1], peaks[:, 0]))
    _log.info("PolicyPeaks: %d candidate seeds", len(peaks))
    return peaks[order]


@register
class PolicyMax(BaseSeedPolicy):
  """Every voxel, brightest first (ties in raster order)."""

  def init_coords(self) -> np.ndarray:
    image = np.asarray(self.canvas.image)
    order = np.argsort(-image.ravel(), kind="stable")
    return np.stack(np.unravel_index(order, image.shape), axis=1)


@register
class PolicyGrid3d(BaseSeedPolicy):
  """Regular grids with spacing ``step`` voxels, one per offset in ``offsets`` (google's defaults)."""

  def __init__(self, canvas: "Canvas", step: int = 16, offsets=(0, 8, 4, 12, 2, 10, 14), **kwargs):
    super().__init__(canvas, **kwargs)
    if int(step) <= 0:
      raise FFNError(f"seed_policy_args: PolicyGrid3d step must be positive, got {step}")
    self.step = int(step)
    self.offsets = [int(o) for o in offsets]

  def init_coords(self) -> np.ndarray:
    shape = self.canvas.shape
    points = []
    for offset in self.offsets:
      grid = np.mgrid[offset:shape[0]:self.step, offset:shape[1]:self.step, offset:shape[2]:self.step]
      points.append(grid.reshape(3, -1).T)
    return np.concatenate(points) if points else np.zeros((0, 3), np.int64)


@register
class PolicyInvertOrigins(BaseSeedPolicy):
  """Seeds at the origins of a previous run's objects, highest object id first.

  ``segmentation_dir``: directory of the previous results; ``corner``: its subvolume corner
  (z, y, x; default: this canvas' corner). google/ffn calls ``.sort()`` on ``dict.items()``, which
  fails on Python 3; here the items are sorted by id, descending, which is what it intended.
  """

  def __init__(self, canvas: "Canvas", segmentation_dir: str | None = None, corner=None, **kwargs):
    super().__init__(canvas, **kwargs)
    if not segmentation_dir:
      raise FFNError("seed_policy_args: PolicyInvertOrigins needs 'segmentation_dir'")
    self.segmentation_dir = segmentation_dir
    self.corner = tuple(canvas.corner_zyx) if corner is None else tuple(int(v) for v in corner)

  def init_coords(self) -> np.ndarray:
    from ffn.inference.storage import load_origins
    origins = load_origins(self.segmentation_dir, self.corner)
    ordered = sorted(origins.items(), key=lambda item: item[0], reverse=True)
    return np.array([np.asarray(info.start_zyx) for _, info in ordered], dtype=np.int64).reshape(-1, 3)


def make_policy(name: str, args_json: str = "") -> Callable[["Canvas"], BaseSeedPolicy]:
  """Returns ``canvas -> policy`` for a registered name and JSON keyword arguments.

  Raises FFNError for an unknown name or malformed JSON, before any work is done.
  """
  name = name or "PolicyPeaks"
  if name not in POLICIES:
    raise FFNError(f"seed_policy: unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")
  try:
    kwargs = json.loads(args_json) if args_json else {}
  except json.JSONDecodeError as e:
    raise FFNError(f"seed_policy_args: not valid JSON ({e}): {args_json!r}") from None
  if not isinstance(kwargs, dict):
    raise FFNError(f"seed_policy_args: expected a JSON object, got {args_json!r}")
  cls = POLICIES[name]
  return lambda canvas: cls(canvas, **kwargs)
