"""Seed policies: where the flood fill tries to start objects (google/ffn's ``seed.py``).

A policy is created with the canvas (for the image, shape, margin, masks and segmentation) plus
the JSON keyword arguments of ``InferenceRequest.seed_policy_args``, and yields z,y,x seed points.
Points closer to the subvolume border than the canvas margin are skipped. Its state (all points
and the index of the next one) is saved in inference checkpoints. A policy holds only a
``weakref.proxy`` of its canvas (as google's), so a finished canvas is freed without the cyclic
garbage collector.

Arguments are checked when the request is checked (:func:`make_policy`, before any model or image
is loaded): each policy declares its keys and their types in ``ARGS``. Like google's runner, every
policy accepts ``corner`` and ``subvol_size`` (z,y,x, 3 integers each; google passes both to
every policy); other unknown keys are dropped with one warning, as google drops them.

The policies of google/ffn HEAD, all here (none needs Google-internal code; google's ``edt.edt``
distance transform is scipy's ``distance_transform_edt`` here, isotropic voxels):
``PolicyPeaks``, ``PolicyPeaks2d``, ``PolicyFillEmptySpace``, ``PolicyMax``, ``PolicyMaxPeaks``,
``PolicyImagePeaks3D2D``, ``PolicyImagePeaks2DDisk``, ``PolicyGrid3d``, ``PolicyGrid2d``,
``PolicyInvertOrigins``, ``PolicyDenseSeeds``, ``ReverseCoords``, ``SequentialPolicies``.
Peaks are skimage's ``peak_local_max``, as google calls it. Differences on purpose:
``PolicyMax`` breaks ties in raster order (google's reversed, unstable argsort leaves their order
unspecified); ``PolicyInvertOrigins`` sorts by id (google's ``.sort()`` on ``dict.items()`` fails
on Python 3).

Register a new policy with :func:`register`; it becomes available by class name in
``InferenceRequest.seed_policy``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from scipy import ndimage

from ffn.errors import FFNError

if TYPE_CHECKING:
  from ffn.inference.canvas import Canvas

_log = logging.getLogger(__name__)
POLICIES: dict[str, type["BaseSeedPolicy"]] = {}
Checker = Callable[[Any, str], Any]


def register(cls: type["BaseSeedPolicy"]) -> type["BaseSeedPolicy"]:
  """Class decorator adding a seed policy to the registry under its class name."""
  POLICIES[cls.__name__] = cls
  return cls


# -- argument checkers: (value, "seed_policy_args.<key> of <policy>") -> converted value ----------

def _fail(where: str, want: str, value) -> None:
  raise FFNError(f"inference request: {where} must be {want}, got {json.dumps(value)}")


def _int(minimum: int | None = None) -> Checker:
  def check(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
      _fail(where, "an integer" + ("" if minimum is None else f" >= {minimum}"), value)
    return int(value)
  return check


def _number(value, where) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
    _fail(where, "a number", value)
  return float(value)


def _bool(value, where) -> bool:
  if not isinstance(value, bool):
    _fail(where, "true or false", value)
  return value


def _str(value, where) -> str:
  if not isinstance(value, str) or not value:
    _fail(where, "a non-empty string", value)
  return value


def _ints(length: int | None, minimum: int = 0) -> Checker:
  def check(value, where):
    if (not isinstance(value, (list, tuple)) or (length is not None and len(value) != length)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
      count = f"{length} integers" if length is not None else "a list of integers"
      _fail(where, f"{count} >= {minimum}" + (" (z,y,x)" if length == 3 else ""), value)
    return tuple(int(v) for v in value)
  return check


def _sort_order(value, where) -> str:
  if not isinstance(value, str) or not value.strip().lower().startswith(("as", "de")):
    _fail(where, "'ascending' or 'descending'", value)
  return value


COMMON_ARGS: dict[str, Checker] = {"corner": _ints(3), "subvol_size": _ints(3, 1)}


@functools.lru_cache(maxsize=None)
def _warn_unknown(policy: str, keys: tuple[str, ...]) -> None:
  """One warning per process and policy (the request is checked more than once)."""
  _log.warning("seed_policy_args: %s ignores %s (google/ffn drops unknown arguments too)",
               policy, ", ".join(keys))


class BaseSeedPolicy:
  """Iterates over candidate seed points (z, y, x) computed lazily by :meth:`init_coords`."""

  ARGS: dict[str, Checker] = {}  # keyword arguments of this policy and their checkers

  def __init__(self, canvas: "Canvas", corner=None, subvol_size=None):
    """``corner``/``subvol_size``: the subvolume (z,y,x), as google's runner passes them."""
    self.canvas = canvas if isinstance(canvas, weakref.ProxyTypes) else weakref.proxy(canvas)
    self.corner = tuple(canvas.corner_zyx) if corner is None else tuple(corner)
    self.subvol_size = subvol_size
    self.coords: np.ndarray | None = None  # [n, 3] int, z,y,x
    self.idx = 0

  @classmethod
  def check_args(cls, args: dict) -> dict:
    """``args`` checked and converted; unknown keys dropped with a warning. FFNError if invalid."""
    known = {**COMMON_ARGS, **cls.ARGS}
    unknown = tuple(sorted(set(args) - set(known)))
    if unknown:
      _warn_unknown(cls.__name__, unknown)
    return {key: known[key](value, f"seed_policy_args.{key} of {cls.__name__}")
            for key, value in args.items() if key in known}

  def init_coords(self) -> np.ndarray:
    """All candidate points, [n, 3] z,y,x."""
    raise NotImplementedError

  def check_stop(self) -> None:
    """Raises InferenceInterrupted when the canvas was asked to stop (SIGTERM during set-up)."""
    if getattr(self.canvas, "stop_requested", False):
      from ffn.inference.canvas import InferenceInterrupted
      raise InferenceInterrupted()

  def interruptible(self, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread; raises InferenceInterrupted within ~0.05 s of
    a stop request instead of waiting for it (scipy's and skimage's array steps release the GIL,
    so the signal handler and this wait keep running). The abandoned thread finishes on its own
    and its result is dropped."""
    self.check_stop()
    result: dict = {}
    done = threading.Event()

    def work() -> None:
      try:
        result["value"] = fn(*args, **kwargs)
      except BaseException as e:  # re-raised in the caller's thread
        result["error"] = e
      finally:
        done.set()

    threading.Thread(target=work, daemon=True, name=f"{type(self).__name__}-setup").start()
    while not done.wait(0.05):
      self.check_stop()
    if "error" in result:
      raise result["error"]
    return result["value"]

  def exclusion_mask(self) -> np.ndarray:
    """Voxels where no seed can start: segmented, masked or seed-masked (google's
    ``get_exclusion_mask``)."""
    mask = self.canvas.segmentation > 0
    for extra in (self.canvas.restrictor_mask, self.canvas.seed_mask):
      if extra is not None:
        mask |= extra
    return mask

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


def _sorted(points: np.ndarray) -> np.ndarray:
  """Rows (z,y,x) in ascending lexicographic order, as [n, 3] int64."""
  points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
  return points[np.lexsort(points.T[::-1])]


def find_peaks(values: np.ndarray, **kwargs) -> np.ndarray:
  """skimage's ``peak_local_max`` of ``values`` plus uniform noise in [0, 1e-4) from a fixed
  generator (seed 42) that breaks ties (google's ``_find_peaks``); rows of coordinates."""
  from skimage.feature import peak_local_max
  noise = np.random.RandomState(42).random_sample(values.shape)
  return peak_local_max(values + noise * 1e-4, **kwargs)


def _edges(image: np.ndarray) -> np.ndarray:
  """Sobel gradient magnitude above its Gaussian-smoothed (sigma 49/6, reflect) value."""
  edges = ndimage.generic_gradient_magnitude(np.asarray(image, dtype=np.float32), ndimage.sobel)
  smoothed = np.zeros(edges.shape, dtype=np.float32)
  ndimage.gaussian_filter(edges, 49.0 / 6.0, output=smoothed, mode="reflect")
  return edges > smoothed


@register
class PolicyPeaks(BaseSeedPolicy):
  """Points far from edges: Sobel edge magnitude, adaptive threshold, distance-transform peaks.

  google/ffn HEAD's steps and constants: edges are voxels whose Sobel gradient magnitude of the
  (normalised) image is above its Gaussian-smoothed value; masked and seed-masked voxels count
  as edges (none left: no seeds); the Euclidean distance to the nearest edge is -1 on excluded
  voxels (:meth:`exclusion_mask`); its peaks (:func:`find_peaks`, min_distance 3, value > 0),
  sorted ascending by (z, y, x). A stop request is seen within ~0.05 s (:meth:`interruptible`).
  """

  def init_coords(self) -> np.ndarray:
    is_edge = self.interruptible(_edges, self.canvas.image)
    excluded = self.exclusion_mask()
    for mask in (self.canvas.restrictor_mask, self.canvas.seed_mask):
      if mask is not None:
        is_edge |= mask
    if is_edge.all():
      return np.zeros((0, 3), np.int64)
    dist = self.interruptible(lambda: ndimage.distance_transform_edt(~is_edge).astype(np.float32))
    del is_edge
    dist[excluded] = -1
    peaks = self.interruptible(find_peaks, dist, min_distance=3, threshold_abs=0, threshold_rel=0)
    _log.info("PolicyPeaks: %d candidate seeds", len(peaks))
    return _sorted(peaks)


@register
class PolicyPeaks2d(BaseSeedPolicy):
  """:class:`PolicyPeaks` per z slice (2D Sobel, distance transform and peaks with
  ``min_distance`` and ``threshold_abs``; masked voxels are edges), sorted ``sort_cmp``."""

  ARGS = {"min_distance": _int(0), "threshold_abs": _number, "sort_cmp": _sort_order}

  def __init__(self, canvas: "Canvas", min_distance: int = 7, threshold_abs: float = 2.5,
               sort_cmp: str = "ascending", **kwargs):
    super().__init__(canvas, **kwargs)
    self.min_distance, self.threshold_abs = min_distance, threshold_abs
    self.reverse = sort_cmp.strip().lower().startswith("de")

  def init_coords(self) -> np.ndarray:
    points = []
    for z in range(self.canvas.shape[0]):
      is_edge = _edges(self.canvas.image[z])
      if self.canvas.restrictor_mask is not None:
        is_edge |= self.canvas.restrictor_mask[z]
      dist = ndimage.distance_transform_edt(~is_edge).astype(np.float32)
      peaks = find_peaks(dist, min_distance=self.min_distance, threshold_abs=self.threshold_abs,
                         threshold_rel=0)
      points.append(np.concatenate([np.full((len(peaks), 1), z), peaks], axis=1))
      self.check_stop()
    out = _sorted(np.concatenate(points) if points else np.zeros((0, 3)))
    return out[::-1] if self.reverse else out


@register
class PolicyFillEmptySpace(BaseSeedPolicy):
  """Peaks (min_distance 2, value > 0.5) of the distance to the nearest segmented voxel: fills
  the gaps of an existing segmentation (e.g. after ``init_segmentation``)."""

  def init_coords(self) -> np.ndarray:
    dist = ndimage.distance_transform_edt(self.canvas.segmentation == 0).astype(np.float32)
    return _sorted(find_peaks(dist, min_distance=2, threshold_abs=0.5, threshold_rel=0))


@register
class PolicyMax(BaseSeedPolicy):
  """Every voxel, brightest first (ties in raster order)."""

  def init_coords(self) -> np.ndarray:
    image = np.asarray(self.canvas.image)
    order = np.argsort(-image.ravel(), kind="stable")
    return np.stack(np.unravel_index(order, image.shape), axis=1)


@register
class PolicyMaxPeaks(BaseSeedPolicy):
  """Peaks (min_distance 3, value > 0) of the image, 0 on excluded voxels."""

  def init_coords(self) -> np.ndarray:
    image = np.asarray(self.canvas.image, dtype=np.float32).copy()
    image[self.exclusion_mask()] = 0
    return _sorted(find_peaks(image, min_distance=3, threshold_abs=0, threshold_rel=0))


@register
class PolicyImagePeaks3D2D(BaseSeedPolicy):
  """3D image peaks (``min_distance_3d``), then 2D peaks of every z slice (``min_distance_2d``);
  a negative distance leaves that part out. skimage's defaults otherwise (no noise)."""

  ARGS = {"min_distance_2d": _int(), "min_distance_3d": _int()}

  def __init__(self, canvas: "Canvas", min_distance_2d: int = 2, min_distance_3d: int = 4, **kwargs):
    super().__init__(canvas, **kwargs)
    self.min_distance_2d, self.min_distance_3d = min_distance_2d, min_distance_3d

  def init_coords(self) -> np.ndarray:
    from skimage.feature import peak_local_max
    image = np.asarray(self.canvas.image)
    points = [np.zeros((0, 3), np.int64)]
    if self.min_distance_3d >= 0:
      points.append(peak_local_max(image, min_distance=self.min_distance_3d))
    if self.min_distance_2d >= 0:
      for z in range(image.shape[0]):
        peaks = peak_local_max(image[z], min_distance=self.min_distance_2d)
        points.append(np.concatenate([np.full((len(peaks), 1), z), peaks], axis=1))
    return np.concatenate(points)


@register
class PolicyImagePeaks2DDisk(BaseSeedPolicy):
  """2D image peaks of every z slice with a disk footprint (``disk_radius``), ``min_distance_2d``
  (Euclidean) and ``threshold_rel``."""

  ARGS = {"min_distance_2d": _int(1), "threshold_rel": _number, "disk_radius": _int(0)}

  def __init__(self, canvas: "Canvas", min_distance_2d: int = 3, threshold_rel: float = 0.5,
               disk_radius: int = 1, **kwargs):
    super().__init__(canvas, **kwargs)
    self.min_distance_2d, self.threshold_rel, self.disk_radius = (
        min_distance_2d, threshold_rel, disk_radius)

  def init_coords(self) -> np.ndarray:
    from skimage.feature import peak_local_max
    from skimage.morphology import disk
    image = np.asarray(self.canvas.image)
    points = [np.zeros((0, 3), np.int64)]
    for z in range(image.shape[0]):
      peaks = peak_local_max(image[z], min_distance=self.min_distance_2d, p_norm=2,
                             threshold_rel=self.threshold_rel, exclude_border=True,
                             footprint=disk(self.disk_radius))
      points.append(np.concatenate([np.full((len(peaks), 1), z), peaks], axis=1))
    return np.concatenate(points)


@register
class PolicyGrid3d(BaseSeedPolicy):
  """Regular grids with spacing ``step`` voxels, one per offset in ``offsets`` (google's defaults)."""

  ARGS = {"step": _int(1), "offsets": _ints(None)}

  def __init__(self, canvas: "Canvas", step: int = 16, offsets=(0, 8, 4, 12, 2, 10, 14), **kwargs):
    super().__init__(canvas, **kwargs)
    self.step, self.offsets = int(step), [int(o) for o in offsets]

  def init_coords(self) -> np.ndarray:
    shape = self.canvas.shape
    points = [np.zeros((0, 3), np.int64)]
    for offset in self.offsets:
      grid = np.mgrid[offset:shape[0]:self.step, offset:shape[1]:self.step, offset:shape[2]:self.step]
      points.append(grid.reshape(3, -1).T)
    return np.concatenate(points)


@register
class PolicyGrid2d(PolicyGrid3d):
  """Like :class:`PolicyGrid3d` in y and x, on every z slice (google's defaults)."""

  def __init__(self, canvas: "Canvas", step: int = 16, offsets=(0, 8, 4, 12, 2, 6, 10, 14), **kwargs):
    super().__init__(canvas, step, offsets, **kwargs)

  def init_coords(self) -> np.ndarray:
    shape = self.canvas.shape
    points = [np.zeros((0, 3), np.int64)]
    for offset in self.offsets:
      grid = np.mgrid[0:shape[0], offset:shape[1]:self.step, offset:shape[2]:self.step]
      points.append(grid.reshape(3, -1).T)
    return np.concatenate(points)


@register
class PolicyInvertOrigins(BaseSeedPolicy):
  """Seeds at the origins of a previous run's objects, highest object id first.

  ``segmentation_dir``: directory of the previous results; ``corner``: its subvolume corner
  (z, y, x; default: this canvas' corner, as google's runner passes it).
  """

  ARGS = {"segmentation_dir": _str}

  def __init__(self, canvas: "Canvas", segmentation_dir: str | None = None, **kwargs):
    super().__init__(canvas, **kwargs)
    if not segmentation_dir:
      raise FFNError("inference request: seed_policy_args of PolicyInvertOrigins needs "
                     "'segmentation_dir'")
    self.segmentation_dir = segmentation_dir

  @classmethod
  def check_args(cls, args: dict) -> dict:
    out = super().check_args(args)
    if "segmentation_dir" not in out:
      raise FFNError("inference request: seed_policy_args of PolicyInvertOrigins needs "
                     "'segmentation_dir'")
    return out

  def init_coords(self) -> np.ndarray:
    from ffn.inference.storage import load_origins
    origins = load_origins(self.segmentation_dir, self.corner)
    ordered = sorted(origins.items(), key=lambda item: item[0], reverse=True)
    return np.array([np.asarray(info.start_zyx) for _, info in ordered], dtype=np.int64).reshape(-1, 3)


@register
class PolicyDenseSeeds(BaseSeedPolicy):
  """Every voxel of the (normalised) image above ``threshold`` (below it with ``invert``), after
  ``num_erosions`` binary erosions (6-connected cross, outside counts as inside: skimage's
  ``binary_erosion``), in raster order."""

  ARGS = {"threshold": _number, "num_erosions": _int(0), "invert": _bool}

  def __init__(self, canvas: "Canvas", threshold: float = 0.5, num_erosions: int = 0,
               invert: bool = False, **kwargs):
    super().__init__(canvas, **kwargs)
    self.threshold, self.num_erosions, self.invert = threshold, num_erosions, invert

  def init_coords(self) -> np.ndarray:
    inside = np.asarray(self.canvas.image) > self.threshold
    if self.invert:
      inside = ~inside
    cross = ndimage.generate_binary_structure(inside.ndim, 1)  # skimage's default footprint
    for _ in range(self.num_erosions):
      inside = ndimage.binary_erosion(inside, structure=cross, border_value=1)
    return np.argwhere(inside)


def _policy_class(name, where: str) -> type[BaseSeedPolicy]:
  if not isinstance(name, str) or name not in POLICIES:
    raise FFNError(f"inference request: {where}: unknown policy {json.dumps(name)} (known: "
                   f"{', '.join(sorted(POLICIES))})")
  return POLICIES[name]


@register
class ReverseCoords(BaseSeedPolicy):
  """The seeds of policy ``policy_to_reverse`` (with the other arguments), in reverse order."""

  @classmethod
  def check_args(cls, args: dict) -> dict:
    inner = dict(args)
    name = inner.pop("policy_to_reverse", None)
    inner_cls = _policy_class(name, "seed_policy_args.policy_to_reverse of ReverseCoords")
    return {"policy_to_reverse": name, **inner_cls.check_args(inner)}

  def __init__(self, canvas: "Canvas", policy_to_reverse: str, **kwargs):
    common = {k: kwargs[k] for k in COMMON_ARGS if k in kwargs}
    super().__init__(canvas, **common)
    self.policy = POLICIES[policy_to_reverse](canvas, **kwargs)

  def init_coords(self) -> np.ndarray:
    return np.array(list(self.policy), dtype=np.int64).reshape(-1, 3)[::-1]


@register
class SequentialPolicies(BaseSeedPolicy):
  """The seeds of several policies one after the other: ``policies`` is a list of
  ``[name, {arguments}]`` pairs."""

  @classmethod
  def check_args(cls, args: dict) -> dict:
    policies = args.get("policies")
    where = "seed_policy_args.policies of SequentialPolicies"
    if not isinstance(policies, list) or not policies or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], dict) for p in policies):
      _fail(where, "a non-empty list of [name, {arguments}] pairs", policies)
    checked = [(name, _policy_class(name, where).check_args(kwargs)) for name, kwargs in policies]
    unknown = tuple(sorted(set(args) - {"policies"} - set(COMMON_ARGS)))
    if unknown:
      _warn_unknown(cls.__name__, unknown)
    return {"policies": checked, **{k: COMMON_ARGS[k](args[k], f"seed_policy_args.{k}")
                                    for k in COMMON_ARGS if k in args}}

  def __init__(self, canvas: "Canvas", policies, **kwargs):
    super().__init__(canvas, **kwargs)
    self.policies = [POLICIES[name](canvas, **{**kwargs, **args}) for name, args in policies]

  def init_coords(self) -> np.ndarray:
    return np.array(list(itertools.chain(*self.policies)), dtype=np.int64).reshape(-1, 3)


def make_policy(name: str, args_json: str = "") -> Callable[["Canvas"], BaseSeedPolicy]:
  """Returns ``canvas -> policy`` for a registered name and JSON keyword arguments.

  Raises FFNError for an unknown name, malformed JSON or invalid arguments, before any work is
  done.
  """
  name = name or "PolicyPeaks"
  if name not in POLICIES:
    raise FFNError(f"inference request: seed_policy: unknown policy {name!r} (known: "
                   f"{', '.join(sorted(POLICIES))})")
  try:
    kwargs = json.loads(args_json) if args_json else {}
  except json.JSONDecodeError as e:
    raise FFNError(f"inference request: seed_policy_args: not valid JSON ({e}): {args_json!r}") from None
  if not isinstance(kwargs, dict):
    raise FFNError(f"inference request: seed_policy_args: expected a JSON object, got {args_json!r}")
  cls = POLICIES[name]
  return functools.partial(cls, **cls.check_args(kwargs))
