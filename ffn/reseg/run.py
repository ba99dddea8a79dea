"""Per-point FFN resegmentation (google/ffn's ``resegmentation.process_point``), batched.

For point ``i`` of a ``ResegmentationRequest`` (``ffn.inference.inference_pb2``, google's field
names and numbers) with ids ``a``, ``b`` and decision point ``p`` (x,y,z):

1. the canvas is the box ``p - radius .. p + radius`` (size ``2 * radius + 1``) of the request's
   image, with the base segmentation (``inference.init_segmentation``) as its initial state;
   a box that leaves the image is recorded as ``out_of_volume`` (google logs and drops it);
2. if ``a`` or ``b`` has no voxel in the canvas the point is recorded as ``segment_absent``;
3. the voxels of ``a`` and ``b`` are cleared; every other segment stays as context (the FoV
   never moves onto it);
4. for each of ``a`` then ``b``: the Euclidean distance transform of the segment (``voxel_size``
   sampling), zeroed within the FoV margin of the canvas faces and, with
   ``init_exclusion_radius``, around ``p``; up to ``max_retry_iters`` attempts, each seeding at
   the transform's maximum and zeroing ``exclusion_radius`` around it (a maximum outside the
   segment consumes the attempt); an object is flood filled from the seed (``segment_at``) and
   kept as a probability map; the attempt *recovers* the segment when the voxels of the segment
   at or above ``segment_threshold`` are at least ``segment_recovery_fraction`` of its canvas
   voxels (with that fraction 0: at least ``min_segment_size`` voxels); otherwise it retries;
   with ``terminate_early``, a failed recovery of ``a`` stops before ``b``, and so does a run
   from ``a`` that does not cover ``segment_recovery_fraction`` of ``b``;
5. the results are saved atomically (google's keys: ``probs``/``raw_probs`` [k, z, y, x] uint8
   quantised, ``deletes`` and ``histories`` (per object: voxels dropped below 0.5 that were >= 0.8
   at each FoV step, and the FoV positions z,y,x of the last attempt), ``start_points`` (per
   object: x,y,z of every attempt, canvas coordinates), ``request``, ``counters``,
   ``corner_zyx``, ``is_shift``), plus ours: ``status``, ``reason``, ``id_a``, ``id_b``,
   ``point_xyz``, ``canvas_size_a``/``canvas_size_b``, ``voxel_size_zyx``.

File names are google's: ``<output_directory>[/<md5(str(id_a) + str(id_b))[:subdir_digits]>]/
<id_a>-<id_b>_at_<x>_<y>_<z>.npz`` (the md5 subdirectory only when ``subdir_digits`` > 1, as in
google; the ids are hashed as ASCII). A point whose file exists is done and skipped (every status
is a file, so a rerun never repeats a point). Differences from google, on purpose: the saved
``request`` holds only this point (google stores every point of the request in every file);
``deletes``/``histories``/``start_points`` are object arrays (ragged; load with
``allow_pickle=True``); the out-of-volume test allows a box ending exactly at the image edge.

Batching: up to ``concurrent`` points are processed at once, one canvas per thread, and their
network calls share one :class:`~ffn.inference.executor.BatchExecutor` (batches of ``batch_size``).
A stop request (SIGTERM) stops every canvas at its next step; unfinished points leave no file and
are redone on resume (a point's result does not depend on batching or order, so a killed and
resumed run gives the same files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent import futures
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit, logit

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.inference import inference_pb2, storage
from ffn.inference.canvas import Canvas, InferenceInterrupted
from ffn.inference.counters import Counters, timer_counter
from ffn.inference.runner import Runner

_log = logging.getLogger(__name__)

DELETED_FROM = np.float32(logit(0.8))  # google: voxels >= logit(0.8) before a step ...
DELETED_TO = np.float32(0.0)  # ... and < logit(0.5) after it count as deleted


def target_path(request: inference_pb2.ResegmentationRequest, index: int) -> str:
  """The result file of point ``index`` (google's naming; see the module docstring)."""
  point = request.points[index]
  out = request.output_directory
  if request.subdir_digits > 1:
    digest = hashlib.md5((str(point.id_a) + str(point.id_b)).encode("ascii")).hexdigest()
    out = os.path.join(out, digest[:request.subdir_digits])
  p = point.point
  return os.path.join(out, f"{point.id_a}-{point.id_b}_at_{p.x}_{p.y}_{p.z}.npz")


def radius_zyx(vector) -> np.ndarray:
  return np.array([vector.z, vector.y, vector.x], np.int64)


def canvas_box(request: inference_pb2.ResegmentationRequest, index: int) -> BoundingBox:
  """The x,y,z box of the canvas of point ``index``."""
  p = request.points[index].point
  r = request.radius
  return BoundingBox((p.x - r.x, p.y - r.y, p.z - r.z), (2 * r.x + 1, 2 * r.y + 1, 2 * r.z + 1))


def _objects(values: Sequence[np.ndarray]) -> np.ndarray:
  out = np.empty(len(values), dtype=object)
  for i, v in enumerate(values):
    out[i] = v
  return out


def _starting_location(dists: np.ndarray, exclusion_zyx: np.ndarray) -> tuple[int, int, int]:
  """google's ``get_starting_location``: the maximum of ``dists``, then zeroes the exclusion box
  around it (in place)."""
  z, y, x = np.unravel_index(int(np.argmax(dists)), dists.shape)
  ez, ey, ex = (int(v) for v in exclusion_zyx)
  dists[max(z - ez, 0):z + ez + 1, max(y - ey, 0):y + ey + 1, max(x - ex, 0):x + ex + 1] = 0
  return int(z), int(y), int(x)


class _History:
  """Records a canvas's FoV positions and deleted-voxel counts per step (google's
  ``keep_history``), by wrapping its ``update_at``."""

  def __init__(self, canvas: Canvas):
    self.canvas = canvas
    self.positions: list[tuple[int, int, int]] = []
    self.deleted: list[int] = []
    self._update_at = canvas.update_at
    canvas.update_at = self.update_at  # type: ignore[method-assign]

  def reset(self) -> None:
    self.positions, self.deleted = [], []

  def update_at(self, pos) -> np.ndarray:
    canvas = self.canvas
    start = np.array(pos) - canvas.fov_size // 2
    sel = tuple(slice(int(s), int(s + n)) for s, n in zip(start, canvas.fov_size))
    old = canvas.seed[sel].copy() if canvas.disco_seed_threshold >= 0 else None
    logits = self._update_at(pos)
    if old is not None:  # the freeze only changes voxels < 0 before the step: not counted here
      with np.errstate(invalid="ignore"):
        self.deleted.append(int(np.sum((old >= DELETED_FROM) & (logits < DELETED_TO))))
    self.positions.append(tuple(int(v) for v in pos))
    return logits


class PointProcessor:
  """Processes points of one request with one model (a :class:`Runner` of ``request.inference``)."""

  def __init__(self, request: inference_pb2.ResegmentationRequest, runner: Runner,
               voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0)):
    if not request.inference.HasField("init_segmentation"):
      raise FFNError("resegmentation request: inference.init_segmentation (the base segmentation, "
                     "in the image's coordinates) is not set")
    if min(request.radius.x, request.radius.y, request.radius.z) < 0:
      raise FFNError("resegmentation request: radius must be >= 0")
    self.request = request
    self.runner = runner
    self.voxel_size_zyx = tuple(float(v) for v in voxel_size_zyx)
    self.stop_requested = False
    self._active: set[Canvas] = set()
    self._lock = threading.Lock()

  def request_stop(self) -> None:
    self.stop_requested = True
    with self._lock:
      for canvas in self._active:
        canvas.stop_requested = True

  def _save(self, index: int, status: str, reason: str = "", **arrays) -> str:
    path = target_path(self.request, index)
    point = self.request.points[index]
    one = inference_pb2.ResegmentationRequest()
    one.CopyFrom(self.request)
    del one.points[:]
    one.points.add().CopyFrom(point)
    p = point.point
    defaults = dict(probs=np.zeros((0,), np.uint8), raw_probs=np.zeros((0,), np.uint8),
                    deletes=_objects([]), histories=_objects([]), start_points=_objects([]),
                    counters="{}", corner_zyx=np.zeros(3, np.int64), is_shift=False,
                    canvas_size_a=0, canvas_size_b=0)
    defaults.update(arrays)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.save_npz_atomic(path, status=status, reason=reason, id_a=np.uint64(point.id_a),
                            id_b=np.uint64(point.id_b), point_xyz=np.array([p.x, p.y, p.z]),
                            voxel_size_zyx=np.array(self.voxel_size_zyx),
                            request=one.SerializeToString(), **defaults)
    return path

  def process(self, index: int, predict: Callable | None = None) -> str:
    """Processes point ``index`` unless its file exists; returns the file's path."""
    path = target_path(self.request, index)
    if os.path.exists(path):
      return path
    request, runner = self.request, self.runner
    point = request.points[index]
    box = canvas_box(request, index)
    limit = np.array(list(reversed(runner.volume_shape)))
    if np.any(box.start < 0) or np.any(box.end > limit):
      return self._save(index, "out_of_volume",
                        f"canvas {box.start.tolist()}+{box.size.tolist()} (x,y,z) leaves the image "
                        f"of size {limit.tolist()}")
    counters = Counters()
    with timer_counter(counters, "resegmentation"):
      canvas = runner.make_canvas(box, predict=predict, counters=counters)
      canvas.checkpoint_path = None  # a point is redone from scratch, never checkpointed
      canvas.progress_bar = False
      with self._lock:
        self._active.add(canvas)
        canvas.stop_requested |= self.stop_requested
      try:
        arrays = self._resegment(canvas, point, counters)
      finally:
        with self._lock:
          self._active.discard(canvas)
    if isinstance(arrays, str):
      return self._save(index, "segment_absent", arrays)
    return self._save(index, "ok", **arrays)

  def _resegment(self, canvas: Canvas, point, counters: Counters) -> dict | str:
    request = self.request
    ids = canvas.local_to_global_ids
    assert ids is not None

    def local(global_id: int) -> int:
      k = int(np.searchsorted(ids, np.uint64(global_id)))
      return k if k < ids.size and int(ids[k]) == int(global_id) and global_id != 0 else -1

    seg_a = canvas.segmentation == local(point.id_a)
    seg_b = canvas.segmentation == local(point.id_b)
    size_a, size_b = int(seg_a.sum()), int(seg_b.sum())
    if size_a == 0 or size_b == 0:
      missing = [str(i) for i, s in ((point.id_a, size_a), (point.id_b, size_b)) if s == 0]
      return f"segment {' and '.join(missing)} has no voxel in the canvas"
    for seg in (seg_a, seg_b):
      canvas.segmentation[seg] = 0
      canvas.seg_prob[seg] = 0
    history = _History(canvas)
    is_shift = bool(canvas.shift_mask is not None and np.any(canvas.shift_mask.distorted))
    options = request.inference.inference_options
    radius = radius_zyx(request.radius)
    margin = np.asarray(canvas.margin)
    exclusion = radius_zyx(request.exclusion_radius)
    probs, deletes, histories = [], [], []
    start_points: list[list[tuple[int, int, int]]] = [[], []]
    todo = [(seg_a, size_a), (seg_b, size_b)]
    for i, (seg, start_size) in enumerate(todo):
      with timer_counter(counters, "edt"):
        dists = ndimage.distance_transform_edt(seg, sampling=self.voxel_size_zyx)
        for axis in range(3):
          m = int(margin[axis])
          if m > 0:
            index = [slice(None)] * 3
            index[axis] = slice(0, m)
            dists[tuple(index)] = 0
            index[axis] = slice(dists.shape[axis] - m, None)
            dists[tuple(index)] = 0
      if request.HasField("init_exclusion_radius"):
        ier = radius_zyx(request.init_exclusion_radius)
        lo = np.maximum(radius - ier, 0)
        dists[tuple(slice(int(a), int(c) + int(e) + 1) for a, c, e in zip(lo, radius, ier))] = 0
      seg_prob = None
      recovered = False
      for _ in range(request.max_retry_iters):
        z0, y0, x0 = _starting_location(dists, exclusion)
        if not seg[z0, y0, x0]:
          continue
        history.reset()
        canvas.segment_at((z0, y0, x0))
        seg_prob = expit(canvas.seed)
        start_points[i].append((x0, y0, z0))
        recovered = True
        segmented = int(np.sum((seg_prob >= options.segment_threshold) & seg))
        if request.segment_recovery_fraction > 0:
          if segmented / start_size >= request.segment_recovery_fraction:
            break
        elif segmented >= options.min_segment_size:
          break
        recovered = False
      if seg_prob is not None:
        probs.append(storage.quantize_probability(seg_prob))
        deletes.append(np.array(history.deleted, np.int64))
        histories.append(np.array(history.positions, np.int64).reshape(-1, 3))
      if request.terminate_early:
        if not recovered:
          break
        if request.segment_recovery_fraction > 0 and i == 0:
          covered = np.sum((seg_prob >= options.segment_threshold) & seg_b)
          if covered / size_b < request.segment_recovery_fraction:
            break
    shape = tuple(int(v) for v in canvas.shape)
    prob_array = np.stack(probs) if probs else np.zeros((0,) + shape, np.uint8)
    return dict(probs=prob_array, raw_probs=prob_array, deletes=_objects(deletes),
                histories=_objects(histories),
                start_points=_objects([np.array(s, np.int64).reshape(-1, 3) for s in start_points]),
                counters=counters.dumps(), corner_zyx=np.array(canvas.corner_zyx, np.int64),
                is_shift=is_shift, canvas_size_a=size_a, canvas_size_b=size_b)


def process_points(processor: PointProcessor, indices: Sequence[int], batch_size: int = 1,
                   concurrent: int = 1, max_wait_s: float = 0.02) -> list[str]:
  """Processes ``indices`` with up to ``concurrent`` canvases at once, their network calls batched
  (up to ``batch_size``); points whose file exists are skipped. A failure or stop request stops
  every canvas at its next step and re-raises (:class:`InferenceInterrupted` for a stop)."""
  from ffn.inference.executor import BatchExecutor
  todo = [i for i in indices if not os.path.exists(target_path(processor.request, i))]
  if not todo:
    return [target_path(processor.request, i) for i in indices]
  runner = processor.runner
  runner.load_model()
  concurrent = max(1, min(int(concurrent), len(todo)))
  if concurrent == 1 and batch_size == 1:
    for i in todo:
      if processor.stop_requested:
        raise InferenceInterrupted()
      processor.process(i)
    return [target_path(processor.request, i) for i in indices]
  errors: list[BaseException] = []
  counters = Counters()
  with BatchExecutor(runner.predict, batch_size, max_wait_s, counters) as executor:

    def one(i: int) -> None:
      if processor.stop_requested:
        return
      try:
        with executor.client() as client:
          processor.process(i, predict=client)
      except BaseException:
        processor.request_stop()
        raise

    with futures.ThreadPoolExecutor(concurrent, thread_name_prefix="ffn-reseg") as pool:
      for job in futures.as_completed([pool.submit(one, i) for i in todo]):
        try:
          job.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every canvas stopped
          errors.append(e)
  if errors:
    raise next((e for e in errors if not isinstance(e, InferenceInterrupted)), errors[0])
  if processor.stop_requested:
    raise InferenceInterrupted()
  calls = max(counters["executor-batches"], 1)
  _log.info("%d points: %d network calls for %d inputs (mean batch %.2f)", len(todo), calls,
            counters["executor-inputs"], counters["executor-inputs"] / calls)
  return [target_path(processor.request, i) for i in indices]


def make_processor(request: inference_pb2.ResegmentationRequest, compute_dtype: str = "float32",
                   voxel_size_zyx: Sequence[float] = (1.0, 1.0, 1.0), predict=None,
                   fov_size_xyz=None, deltas_xyz=None) -> PointProcessor:
  """A processor with a :class:`Runner` of ``request.inference`` (checkpoints off; the model is
  loaded at the first point, or ``predict`` with ``fov_size_xyz``/``deltas_xyz`` replaces it)."""
  inference = inference_pb2.InferenceRequest()
  inference.CopyFrom(request.inference)
  if not inference.segmentation_output_dir:
    inference.segmentation_output_dir = request.output_directory
  inference.checkpoint_interval = 0
  runner = Runner(inference, compute_dtype=compute_dtype, predict=predict,
                  fov_size_xyz=fov_size_xyz, deltas_xyz=deltas_xyz)
  return PointProcessor(request, runner, voxel_size_zyx)
