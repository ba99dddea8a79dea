"""The flood-fill state of one subvolume: google/ffn's ``Canvas``, on plain numpy arrays.

All arrays are z,y,x. ``seed`` holds the current object's logits (NaN where not yet predicted);
``segmentation`` holds object ids (> 0), -1 for seed points that failed (google's marker) and 0
for unsegmented voxels. The network is any ``predict(x[b,z,y,x,2]) -> logits[b,z,y,x,1]`` callable
(channel 0 = normalised image, channel 1 = seed logits).

Thresholds in the InferenceOptions are probabilities; they are converted to float32 logits once,
as google/ffn stores them back into its float proto fields.

Differences from google/ffn HEAD, on purpose:

* the probability map is always kept (google saves ``seg_prob`` even when it did not keep one);
* ``segment_all`` on a fresh canvas starts with no in-progress object (google's fresh-run path
  can hit an unbound ``partial_segment_iters``);
* a checkpoint taken while a seed is being processed rewinds the seed policy to that seed, so a
  resumed run revisits it (continuing the saved object if one was in flight) instead of skipping it;
* only the region the previous object touched is reset to NaN before a new object (same values as
  clearing the whole array, much cheaper on large subvolumes).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
from scipy.special import expit, logit

from ffn.inference import storage
from ffn.inference.counters import Counters, timer_counter
from ffn.inference.movement import FaceMaxMovementPolicy
from ffn.inference.seed import BaseSeedPolicy
from ffn.progress import Progress

_log = logging.getLogger(__name__)
Predictor = Callable[[np.ndarray], np.ndarray]


class InferenceInterrupted(Exception):
  """Raised after a stop request (e.g. SIGTERM) once the checkpoint is saved."""


def _boxed(value) -> np.ndarray:
  """A 0-d object array holding ``value`` (pickled by np.savez, read back with ``.item()``)."""
  out = np.empty((), dtype=object)
  out[()] = value
  return out


def _logit32(probability: float) -> np.float32:
  return np.float32(logit(np.float64(np.float32(probability))))


class Canvas:
  """Segments one subvolume by flood filling from seeds (see the module docstring)."""

  def __init__(self, image: np.ndarray, options, predict: Predictor, fov_size_zyx: Sequence[int],
               deltas_zyx: Sequence[int], *, corner_zyx: Sequence[int] = (0, 0, 0),
               restrictor_mask: np.ndarray | None = None, seed_mask: np.ndarray | None = None,
               checkpoint_path: str | None = None, checkpoint_interval_sec: float = 0,
               counters: Counters | None = None):
    """``image``: normalised float32 z,y,x; ``options``: InferenceOptions proto;
    ``restrictor_mask``: True where nothing may be segmented; ``seed_mask``: True where no object
    may start; ``checkpoint_interval_sec`` <= 0 disables periodic checkpoints."""
    self.image = image
    self.shape = tuple(image.shape)
    self.predict_fn = predict
    self.corner_zyx = tuple(int(v) for v in corner_zyx)
    self.restrictor_mask = restrictor_mask
    self.seed_mask = seed_mask
    self.counters = counters if counters is not None else Counters()
    self.checkpoint_path = checkpoint_path
    self.checkpoint_interval_sec = checkpoint_interval_sec
    self.checkpoint_last = time.time()
    self.stop_requested = False

    self.init_activation = _logit32(options.init_activation)
    self.pad_value = _logit32(options.pad_value)
    self.move_threshold = _logit32(options.move_threshold)
    self.segment_threshold = _logit32(options.segment_threshold)
    self.disco_seed_threshold = float(options.disco_seed_threshold)
    self.min_segment_size = int(options.min_segment_size)
    mbd = options.min_boundary_dist
    self.min_boundary_dist = np.array([mbd.z, mbd.y, mbd.x], dtype=np.int64)

    self.fov_size = np.array(fov_size_zyx, dtype=np.int64)
    self.margin = self.fov_size // 2

    self.seed = np.full(self.shape, np.nan, dtype=np.float32)
    self.segmentation = np.zeros(self.shape, dtype=np.int32)
    self.seg_prob = np.zeros(self.shape, dtype=np.uint8)
    self.origins: dict[int, storage.OriginInfo] = {}
    self.overlaps: dict[int, np.ndarray] = {}
    self._max_id = 0
    self.seed_policy: BaseSeedPolicy | None = None
    self._seed_policy_state = None
    self._in_flight = False
    self.movement_policy = FaceMaxMovementPolicy(self, deltas_zyx, self.move_threshold)
    self._min_pos = np.zeros(3, np.int64)
    self._max_pos = np.zeros(3, np.int64)
    self.reset_state((0, 0, 0))

  # -- per-object state -------------------------------------------------------------------------

  def reset_state(self, start_pos: Sequence[int]) -> None:
    self.movement_policy.reset_state(start_pos)
    self._min_pos = np.array(start_pos, dtype=np.int64)
    self._max_pos = np.array(start_pos, dtype=np.int64)

  def _touched(self) -> tuple[slice, ...]:
    """Slices covering every voxel the current object's predictions wrote."""
    half = self.fov_size // 2
    return tuple(slice(max(int(s), 0), int(e) + 1)
                 for s, e in zip(self._min_pos - half, self._max_pos + half))

  def init_seed(self, pos: Sequence[int]) -> None:
    """Clears the previous object's logits and places the initial activation at ``pos``."""
    self.seed[self._touched()] = np.nan
    self.seed[tuple(pos)] = self.init_activation

  def is_valid_pos(self, pos: Sequence[int], ignore_move_threshold: bool = False) -> bool:
    """Whether the FoV may be centred at ``pos`` (z,y,x)."""
    pos = tuple(pos)
    if not ignore_move_threshold and self.seed[pos] < self.move_threshold:
      self.counters.increment("skip_threshold")
      return False
    p = np.array(pos)
    if np.any(p - self.margin < 0) or np.any(p + self.margin >= self.shape):
      self.counters.increment("skip_invalid_pos")
      return False
    if self.segmentation[pos] > 0:
      self.counters.increment("skip_invalid_pos")
      return False
    return True

  def _restricted(self, pos: tuple) -> bool:
    return self.restrictor_mask is not None and bool(self.restrictor_mask[pos])

  def update_at(self, pos: Sequence[int]) -> np.ndarray:
    """Runs the network with the FoV centred at ``pos``; writes and returns the new logits."""
    start = np.array(pos) - self.fov_size // 2
    sel = tuple(slice(int(s), int(s + n)) for s, n in zip(start, self.fov_size))
    logit_seed = self.seed[sel].copy()
    logit_seed[np.isnan(logit_seed)] = self.pad_value
    x = np.empty((1,) + tuple(int(n) for n in self.fov_size) + (2,), np.float32)
    x[0, ..., 0] = self.image[sel]
    x[0, ..., 1] = logit_seed
    with timer_counter(self.counters, "inference"):
      logits = np.asarray(self.predict_fn(x), dtype=np.float32)[0, ..., 0].copy()
    if self.disco_seed_threshold >= 0:
      old = self.seed[sel]
      if np.mean(logits >= self.move_threshold) > self.disco_seed_threshold:
        with np.errstate(invalid="ignore"):
          freeze = (old < 0) & (logits > old)  # NaN compares False: unvisited voxels stay free
        logits[freeze] = old[freeze]
    self.seed[sel] = logits
    return logits

  def segment_at(self, start_pos: tuple, partial_segment_iters: int = 0) -> int:
    """Flood fills one object from ``start_pos``; returns the number of network evaluations.

    With ``partial_segment_iters`` > 0 the object restored from a checkpoint is continued.
    """
    if not partial_segment_iters:
      self.init_seed(start_pos)
      self.reset_state(start_pos)
      self.movement_policy.append((self.move_threshold * 2, start_pos))
    num_iters = partial_segment_iters
    with timer_counter(self.counters, "segment_at-loop"):
      for pos in self.movement_policy:
        if self.seed[start_pos] < self.move_threshold:
          self.counters.increment("seed_got_too_weak")
          break
        if self._restricted(pos):
          self.counters.increment("skip_restriced_pos")
          continue
        logits = self.update_at(pos)
        self._min_pos = np.minimum(self._min_pos, pos)
        self._max_pos = np.maximum(self._max_pos, pos)
        num_iters += 1
        with timer_counter(self.counters, "movement_policy"):
          self.movement_policy.update(logits, pos)
        self.maybe_save_checkpoint(partial_segment_iters=num_iters)
    return num_iters

  def get_next_segment_id(self) -> int:
    self._max_id += 1
    while self._max_id in self.origins:
      self._max_id += 1
    return self._max_id

  # -- whole subvolume --------------------------------------------------------------------------

  def segment_all(self, seed_policy: Callable[["Canvas"], BaseSeedPolicy],
                  partial_segment_iters: int = 0) -> None:
    """Tries to grow an object from every seed the policy yields."""
    self.seed_policy = seed_policy(self)
    if self._seed_policy_state is not None:
      self.seed_policy.set_state(self._seed_policy_state)
      self._seed_policy_state = None
    mbd = self.min_boundary_dist
    progress: Progress | None = None  # over candidate seeds: the policy knows them after next()
    with timer_counter(self.counters, "segment_all"):
      while True:
        with timer_counter(self.counters, "seed-policy"):
          pos = next(self.seed_policy, None)
        if progress is None and self.seed_policy.coords is not None:
          progress = Progress(len(self.seed_policy.coords), "inference seeds", unit="seed",
                              log_every_s=30.0)
        if progress is not None:
          progress.update(self.seed_policy.idx - progress.count)
        if pos is None:
          break
        if not (self.is_valid_pos(pos, ignore_move_threshold=True) and not self._restricted(pos)
                and not (self.seed_mask is not None and self.seed_mask[pos])):
          continue
        self._in_flight = True
        if not partial_segment_iters:
          self.maybe_save_checkpoint(partial_segment_iters=0)
        low = np.array(pos) - mbd
        sel = tuple(slice(max(int(s), 0), int(s + 2 * m + 1)) for s, m in zip(low, mbd))
        if np.any(self.segmentation[sel] > 0):
          self.segmentation[pos] = -1
          self._in_flight = False
          continue
        t_start = time.time()
        num_iters = self.segment_at(pos, partial_segment_iters=partial_segment_iters)
        partial_segment_iters = 0
        t_seg = time.time() - t_start
        self._in_flight = False
        self._finish_object(pos, num_iters, t_seg)
        self.maybe_save_checkpoint(partial_segment_iters=0)
    if progress is not None:
      progress.close()
    _log.info("segmentation done: %d objects", len(self.origins))

  def _finish_object(self, pos: tuple, num_iters: int, t_seg: float) -> None:
    """Turns the current object's logits into a segment, or marks the seed as failed."""
    if num_iters <= 0:
      self.counters.increment("invalid-other-time-ms", t_seg * 1000)
      return
    if self.seed[pos] < self.move_threshold:
      if self.segmentation[pos] == 0:
        self.segmentation[pos] = -1
      self.counters.increment("invalid-weak-time-ms", t_seg * 1000)
      return
    sel = self._touched()
    mask = self.seed[sel] >= self.segment_threshold
    raw_voxels = int(np.sum(mask))
    ids, counts = np.unique(self.segmentation[sel][mask], return_counts=True)
    keep = ids > 0
    ids, counts = ids[keep], counts[keep]
    mask &= self.segmentation[sel] <= 0
    voxels = int(np.sum(mask))
    if voxels < self.min_segment_size:
      if self.segmentation[pos] == 0:
        self.segmentation[pos] = -1
      self.counters.increment("invalid-small-time-ms", t_seg * 1000)
      return
    self.counters.increment("voxels-segmented", voxels)
    self.counters.increment("voxels-overlapping", raw_voxels - voxels)
    sid = self.get_next_segment_id()
    self.segmentation[sel][mask] = sid
    self.seg_prob[sel][mask] = storage.quantize_probability(expit(self.seed[sel][mask]))
    self.overlaps[sid] = np.array([ids, counts])
    self.origins[sid] = storage.OriginInfo(pos, num_iters, t_seg)
    self.counters.increment("valid-time-ms", t_seg * 1000)
    _log.info("object %d: seed (z,y,x) %s, %d voxels, %d evaluations", sid, pos, voxels, num_iters)

  # -- checkpoints ------------------------------------------------------------------------------

  def maybe_save_checkpoint(self, partial_segment_iters: int = 0) -> None:
    """Saves a checkpoint if the interval has passed; on a stop request saves one and stops."""
    if self.stop_requested:
      if self.checkpoint_path:
        self.save_checkpoint(self.checkpoint_path, partial_segment_iters)
      raise InferenceInterrupted()
    if not self.checkpoint_path or self.checkpoint_interval_sec <= 0:
      return
    if time.time() - self.checkpoint_last < self.checkpoint_interval_sec:
      return
    self.save_checkpoint(self.checkpoint_path, partial_segment_iters)
    self.checkpoint_last = time.time()

  def save_checkpoint(self, path: str, partial_segment_iters: int) -> None:
    """Writes the full state (google/ffn's checkpoint keys) to ``path`` atomically."""
    with timer_counter(self.counters, "save_checkpoint"):
      policy_state = None
      if self.seed_policy is not None:
        policy_state = self.seed_policy.get_state(rewind=self._in_flight)
      storage.save_npz_atomic(
          path,
          movement_policy=_boxed(self.movement_policy.get_state()),
          segmentation=self.segmentation, seed=self.seed, seg_qprob=self.seg_prob,
          origins=_boxed(self.origins), overlaps=_boxed(self.overlaps),
          min_pos=self._min_pos, max_pos=self._max_pos,
          history=np.zeros((0, 3), np.int64), history_deleted=np.zeros(0, np.int64),
          seed_policy_state=_boxed(policy_state),
          counters=self.counters.dumps(), partial_segment_iters=partial_segment_iters)
    _log.info("checkpoint saved: %s (%d objects so far)", path, len(self.origins))

  def restore_checkpoint(self, path: str) -> int:
    """Loads a checkpoint; returns the evaluations already done on the in-flight object (or 0)."""
    with np.load(path, allow_pickle=True) as data:
      self.segmentation[:] = data["segmentation"]
      self.seed[:] = data["seed"]
      if "seg_qprob" in data:
        self.seg_prob[:] = data["seg_qprob"]
      self.origins = data["origins"].item()
      self.overlaps = data["overlaps"].item() if "overlaps" in data else {}
      self._max_id = int(self.segmentation.max())
      self._min_pos = np.array(data["min_pos"], dtype=np.int64)
      self._max_pos = np.array(data["max_pos"], dtype=np.int64)
      self.movement_policy.restore_state(data["movement_policy"].item())
      self._seed_policy_state = data["seed_policy_state"].item()
      self.counters.loads(str(data["counters"]))
      partial = int(data["partial_segment_iters"]) if "partial_segment_iters" in data else 0
    _log.info("restored checkpoint %s: %d objects, in-flight evaluations %d",
              os.path.basename(path), len(self.origins), partial)
    return partial
