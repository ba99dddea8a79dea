"""The flood-fill state of one subvolume: google/ffn's ``Canvas``, on plain numpy arrays.

All arrays are z,y,x. ``seed`` holds the current object's logits (NaN where not yet predicted);
``segmentation`` holds object ids (> 0), -1 for seed points that failed (google's marker) and 0
for unsegmented voxels. The network is any ``predict(x[b,z,y,x,2]) -> logits[b,z,y,x,1]`` callable
(channel 0 = normalised image, channel 1 = seed logits).

Thresholds in the InferenceOptions are probabilities; they are converted to float32 logits once,
as google/ffn stores them back into its float proto fields.

Request options handled here besides the thresholds:

* ``consistency_threshold`` (> 0): :meth:`Canvas.update_at` evaluates the network repeatedly at the
  same position, feeding its own prediction back as the seed input, until the mean over the FoV of
  ``|p_in - p_out|`` (probabilities: expit of the logits fed in and of the logits returned) is below
  the threshold, at most ``MAX_SELF_CONSISTENT_ITERS`` (32) evaluations. The first comparison is
  against the seed as fed (unvisited voxels at ``pad_value``). The last prediction is kept even
  when it did not converge; the disconnected-seed freeze is applied to it afterwards. This is the
  loop of google/ffn's older ``inference.py`` versions; google's current HEAD dropped it and
  ignores the option. 0 or unset: one evaluation per position (HEAD's behaviour).
* ``init_segmentation`` (:meth:`Canvas.init_segmentation`, google's
  ``init_segmentation_from_volume``): ids are made contiguous, the map to the original ids is kept
  in ``local_to_global_ids`` and, unlike google, saved with the result (:mod:`ffn.inference.storage`).
* ``shift_mask`` (:class:`ffn.inference.masks.ShiftMask`, google's ``MovementRestrictor``): checked
  wherever the restrictor mask is, i.e. for seeds and for every FoV move.

Progress (over candidate seeds) also reports the objects made, the fraction of voxels segmented,
the *live* seeds -- remaining candidates on unsegmented, unmasked voxels -- and bases its ETA on
how fast that number drains (:class:`_SeedProgress`). It also reports while one object grows
(which can take minutes): FOV moves so far and their rate, and the object's seed, moves and
voxels above the segment threshold.

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

import collections
import logging
import os
import threading
import time
import weakref
from typing import Callable, Sequence

import numpy as np
from scipy.special import expit, logit

from ffn.errors import FFNError
from ffn.inference import storage
from ffn.inference.counters import Counters, timer_counter
from ffn.inference.masks import ShiftMask
from ffn.inference.movement import FaceMaxMovementPolicy
from ffn.inference.seed import BaseSeedPolicy
from ffn.progress import Progress

_log = logging.getLogger(__name__)
Predictor = Callable[[np.ndarray], np.ndarray]
MAX_SELF_CONSISTENT_ITERS = 32  # google/ffn's cap on evaluations per position (consistency_threshold)


class InferenceInterrupted(Exception):
  """Raised after a stop request (e.g. SIGTERM) once the checkpoint is saved."""


# One checkpoint written at a time in this process (google/ffn serialises them with a lock too):
# with N canvases in threads, N saves at once would hold N sets of compression buffers and compete
# for the disk, and the later ones would save a state no fresher for it.
_CHECKPOINT_LOCK = threading.Lock()


def _boxed(value) -> np.ndarray:
  """A 0-d object array holding ``value`` (pickled by np.savez, read back with ``.item()``)."""
  out = np.empty((), dtype=object)
  out[()] = value
  return out


def movement_state_array(state) -> np.ndarray:
  """A movement policy state ``(queue, visited cells, start z,y,x)`` in google/ffn HEAD's
  checkpoint form: ``np.asarray([(deque, set, start)], dtype=object)``, shape (1, 3)."""
  queue, done, start = state
  out = np.empty((1, 3), dtype=object)
  out[0, 0] = collections.deque(queue)
  out[0, 1] = set(done)
  out[0, 2] = tuple(int(v) for v in start)
  return out


def movement_state_from_array(value: np.ndarray, default_start: Sequence[int]):
  """``(queue, visited cells, start)`` from a checkpoint's ``movement_policy``: google HEAD's
  (1, 3) object array, google's older (1, 2) one (no start: ``default_start``), or the 0-d boxed
  tuple this toolkit wrote before. ValueError for anything else."""
  value = np.asarray(value, dtype=object)
  if value.shape == ():
    return value.item()
  if value.ndim == 2 and value.shape[0] == 1 and value.shape[1] in (2, 3):
    items = list(value[0])
    start = items[2] if len(items) == 3 and items[2] is not None else default_start
    return items[0], items[1], start
  raise ValueError(f"movement_policy state of shape {value.shape} (expected google's (1, 3))")


def seed_state_array(state) -> np.ndarray:
  """A seed policy state ``(coords, idx)`` (or None) in google/ffn's checkpoint form:
  ``np.asarray((coords, idx), dtype=object)``, shape (2,); None as a 0-d array holding None."""
  if state is None:
    return _boxed(None)
  coords, idx = state
  out = np.empty(2, dtype=object)
  out[0], out[1] = coords, int(idx)
  return out


def seed_state_from_array(value: np.ndarray):
  """``(coords, idx)`` or None from a checkpoint's ``seed_policy_state``: google's (2,) object
  array or the 0-d boxed value this toolkit wrote before. ValueError for anything else."""
  value = np.asarray(value, dtype=object)
  if value.shape == ():
    return value.item()
  if value.shape == (2,):
    return value[0], int(value[1])
  raise ValueError(f"seed_policy_state of shape {value.shape} (expected google's (2,))")


def _logit32(probability: float) -> np.float32:
  return np.float32(logit(np.float64(np.float32(probability))))


class Canvas:
  """Segments one subvolume by flood filling from seeds (see the module docstring)."""

  PROGRESS_LOG_EVERY_S = 30.0  # seconds between progress log lines when stderr is not a terminal
  # A tqdm bar for the seed progress: None = when stderr is a terminal; False = log lines only
  # (set when several canvases run at once, whose bars would overwrite each other).
  progress_bar: bool | None = None

  def __init__(self, image: np.ndarray, options, predict: Predictor, fov_size_zyx: Sequence[int],
               deltas_zyx: Sequence[int], *, corner_zyx: Sequence[int] = (0, 0, 0),
               restrictor_mask: np.ndarray | None = None, seed_mask: np.ndarray | None = None,
               shift_mask: ShiftMask | None = None, move_score_threshold: float | None = None,
               checkpoint_path: str | None = None, checkpoint_interval_sec: float = 0,
               counters: Counters | None = None):
    """``image``: normalised float32 z,y,x; ``options``: InferenceOptions proto;
    ``restrictor_mask``: True where nothing may be segmented; ``seed_mask``: True where no object
    may start; ``shift_mask``: FoV positions blocked by large slice shifts;
    ``deltas_zyx``: the movement step; ``move_score_threshold``: the minimum face logit for a
    move (default: the move threshold, as a logit); ``checkpoint_interval_sec`` <= 0 disables periodic checkpoints."""
    self.image = image
    self.shape = tuple(image.shape)
    self.predict_fn = predict
    self.corner_zyx = tuple(int(v) for v in corner_zyx)
    self.restrictor_mask = restrictor_mask
    self.seed_mask = seed_mask
    self.shift_mask = shift_mask
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
    self.consistency_threshold = float(options.consistency_threshold)
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
    self.local_to_global_ids: np.ndarray | None = None  # set by init_segmentation
    self.segmented_voxels = 0  # voxels with an id > 0; counted when segment_all starts
    self.seed_policy: BaseSeedPolicy | None = None
    self._seed_policy_state = None
    self._in_flight = False
    self._progress: _SeedProgress | None = None  # set while segment_all runs
    self.movement_policy = FaceMaxMovementPolicy(
        self, deltas_zyx, self.move_threshold if move_score_threshold is None
        else np.float32(move_score_threshold))
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
    """google's ``MovementRestrictor.is_valid_pos``, negated: masked, or blocked by the shift mask."""
    if self.restrictor_mask is not None and self.restrictor_mask[pos]:
      return True
    return self.shift_mask is not None and self.shift_mask.blocks(pos)

  def update_at(self, pos: Sequence[int]) -> np.ndarray:
    """Runs the network with the FoV centred at ``pos``; writes and returns the new logits."""
    start = np.array(pos) - self.fov_size // 2
    sel = tuple(slice(int(s), int(s + n)) for s, n in zip(start, self.fov_size))
    logit_seed = self.seed[sel].copy()
    logit_seed[np.isnan(logit_seed)] = self.pad_value
    x = np.empty((1,) + tuple(int(n) for n in self.fov_size) + (2,), np.float32)
    x[0, ..., 0] = self.image[sel]
    x[0, ..., 1] = logit_seed
    logits = self._predict(x)
    if self.consistency_threshold > 0:  # google's older self-consistency loop (module docstring)
      prob_in = expit(logit_seed)
      for _ in range(MAX_SELF_CONSISTENT_ITERS - 1):
        prob_out = expit(logits)
        if np.mean(np.abs(prob_in - prob_out)) < self.consistency_threshold:
          break
        prob_in = prob_out
        x[0, ..., 1] = logits
        logits = self._predict(x)
    if self.disco_seed_threshold >= 0:
      old = self.seed[sel]
      if np.mean(logits >= self.move_threshold) > self.disco_seed_threshold:
        with np.errstate(invalid="ignore"):
          freeze = (old < 0) & (logits > old)  # NaN compares False: unvisited voxels stay free
        logits[freeze] = old[freeze]
    self.seed[sel] = logits
    return logits

  def _predict(self, x: np.ndarray) -> np.ndarray:
    """One network evaluation: logits z,y,x of the FoV input ``x`` [1,z,y,x,2]."""
    with timer_counter(self.counters, "inference"):
      return np.asarray(self.predict_fn(x), dtype=np.float32)[0, ..., 0].copy()

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
        if self._progress is not None:
          self._progress.step(start_pos, num_iters)
        self.maybe_save_checkpoint(partial_segment_iters=num_iters)
    return num_iters

  def get_next_segment_id(self) -> int:
    self._max_id += 1
    while self._max_id in self.origins:
      self._max_id += 1
    return self._max_id

  # -- whole subvolume --------------------------------------------------------------------------

  def init_segmentation(self, labels: np.ndarray, where: str = "init_segmentation") -> None:
    """Starts from an existing segmentation of this box (google's ``init_segmentation_from_volume``).

    ``labels``: integer ids z,y,x of the canvas shape, 0 = unsegmented. The ids are renumbered
    1..N in increasing order of the original id (google's ``make_contiguous``); the original of
    local id ``i`` is ``local_to_global_ids[i]`` (uint64, entry 0 is 0), saved with the result.
    Segmented voxels get probability 1.0 (quantised) in ``seg_prob``; new objects get ids > N.
    These objects have no origins and are never grown further (new objects may not overlap them).
    """
    labels = np.asarray(labels)
    if labels.shape != self.shape:
      raise FFNError(f"{where}: shape {labels.shape} (z,y,x) differs from the subvolume's {self.shape}")
    if labels.dtype.kind not in "uib":
      raise FFNError(f"{where}: dtype {labels.dtype.name} is not allowed (expected integer ids)")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
      raise FFNError(f"{where}: negative ids (min {labels.min()}); ids must be >= 0")
    ids, local = np.unique(labels, return_inverse=True)
    ids = ids.astype(np.uint64)
    if ids.size and ids[0] != 0:  # 0 is always local id 0, even if absent
      ids = np.concatenate([np.zeros(1, np.uint64), ids])
      local = local + 1
    if len(ids) - 1 > np.iinfo(np.int32).max:
      raise FFNError(f"{where}: too many objects ({len(ids) - 1}) for int32 local ids")
    self.segmentation[:] = local.reshape(self.shape)
    self.seg_prob[self.segmentation > 0] = storage.quantize_probability(np.array([1.0]))[0]
    self.local_to_global_ids = ids if ids.size else np.zeros(1, np.uint64)
    self._max_id = len(self.local_to_global_ids) - 1
    _log.info("initial segmentation %s: %d objects", where, self._max_id)

  def result_extras(self) -> dict[str, np.ndarray]:
    """Extra arrays to save with the result (``local_to_global_ids`` after init_segmentation)."""
    if self.local_to_global_ids is None:
      return {}
    return {"local_to_global_ids": self.local_to_global_ids}

  def segment_all(self, seed_policy: Callable[["Canvas"], BaseSeedPolicy],
                  partial_segment_iters: int = 0) -> None:
    """Tries to grow an object from every seed the policy yields."""
    self.seed_policy = seed_policy(self)
    if self._seed_policy_state is not None:
      self.seed_policy.set_state(self._seed_policy_state)
      self._seed_policy_state = None
    mbd = self.min_boundary_dist
    resumed_at = self.seed_policy.idx  # > 0 when restored from a checkpoint
    self.segmented_voxels = int(np.count_nonzero(self.segmentation > 0))
    progress: _SeedProgress | None = None  # over candidate seeds: the policy knows them after next()
    try:
      with timer_counter(self.counters, "segment_all"):
        while True:
          with timer_counter(self.counters, "seed-policy"):
            try:
              pos = next(self.seed_policy, None)
            except InferenceInterrupted:  # stopped during the policy's set-up: save what there is
              if self.checkpoint_path:  # (a policy without its points recomputes them on resume)
                self.save_checkpoint(self.checkpoint_path, 0)
              raise
          if progress is None and self.seed_policy.coords is not None:
            progress = self._progress = _SeedProgress(self, self.seed_policy, resumed_at)
          if progress is not None:
            progress.update()
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
    finally:  # also when a step raises (stop request, failed network call): no bar left open
      if progress is not None:
        progress.close()
      self._progress = None
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
    self.segmented_voxels += voxels
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
    """Writes the full state to ``path`` atomically, one checkpoint of this process at a time.

    Keys and forms are google/ffn's (``movement_policy`` and ``seed_policy_state`` as object
    arrays of google's shapes, see :func:`movement_state_array`, :func:`seed_state_array`), so
    google's ``restore_checkpoint`` reads it; ``min_pos``, ``max_pos``, ``partial_segment_iters``
    and ``local_to_global_ids`` are our additions (google ignores them).
    """
    with timer_counter(self.counters, "save_checkpoint"), _CHECKPOINT_LOCK:
      policy_state = None
      if self.seed_policy is not None:
        policy_state = self.seed_policy.get_state(rewind=self._in_flight)
      storage.save_npz_atomic(
          path,
          movement_policy=movement_state_array(self.movement_policy.get_state()),
          segmentation=self.segmentation, seed=self.seed, seg_qprob=self.seg_prob,
          origins=_boxed(self.origins), overlaps=_boxed(self.overlaps),
          min_pos=self._min_pos, max_pos=self._max_pos,
          history=np.zeros((0, 3), np.int64), history_deleted=np.zeros(0, np.int64),
          seed_policy_state=seed_state_array(policy_state),
          counters=self.counters.dumps(), partial_segment_iters=partial_segment_iters,
          **self.result_extras())
    _log.info("checkpoint saved: %s (%d objects so far)", path, len(self.origins))

  def restore_checkpoint(self, path: str) -> int:
    """Loads a checkpoint (ours, old or new, or google/ffn's); returns the evaluations already
    done on the in-flight object (0 for google's, which resumes at seed boundaries).

    A google checkpoint has no ``min_pos``/``max_pos``: the region the last object touched is
    then taken to be the whole subvolume (cleared before the next object, as google does).
    """
    with np.load(path, allow_pickle=True) as data:
      self.segmentation[:] = data["segmentation"]
      self.seed[:] = data["seed"]
      if "seg_qprob" in data:
        self.seg_prob[:] = data["seg_qprob"]
      self.origins = data["origins"].item()
      self.overlaps = data["overlaps"].item() if "overlaps" in data else {}
      self._max_id = int(self.segmentation.max())
      if "min_pos" in data and "max_pos" in data:
        self._min_pos = np.array(data["min_pos"], dtype=np.int64)
        self._max_pos = np.array(data["max_pos"], dtype=np.int64)
      else:
        self._min_pos = np.zeros(3, np.int64)
        self._max_pos = np.array(self.shape, np.int64) - 1
      self.movement_policy.restore_state(
          movement_state_from_array(data["movement_policy"], self._min_pos.tolist()))
      self._seed_policy_state = seed_state_from_array(data["seed_policy_state"])
      self.counters.loads(str(data["counters"]))
      partial = int(data["partial_segment_iters"]) if "partial_segment_iters" in data else 0
      if "local_to_global_ids" in data:
        self.local_to_global_ids = np.asarray(data["local_to_global_ids"], dtype=np.uint64)
    _log.info("restored checkpoint %s: %d objects, in-flight evaluations %d",
              os.path.basename(path), len(self.origins), partial)
    return partial


class _SeedProgress:
  """Progress over a seed policy's candidates, with an ETA from the seeds that still matter.

  Seeds are consumed unevenly: early ones grow large objects (slow), late ones mostly fall on
  voxels already segmented and are skipped at once, so an ETA from the seed count is far too
  pessimistic early on. *Live* seeds are the remaining candidates that are inside the margin, not
  masked (restrictor and seed masks; the shift mask is not checked here), and on a voxel that is
  not segmented (id <= 0); only they can still cost network evaluations. Live seeds disappear either by being tried or by being covered by a new object; the
  ETA is ``live * elapsed / (live at start - live now)``, i.e. the remaining live seeds times the
  time per live seed tried, scaled by the fraction of live seeds that were tried rather than
  covered so far. Cost: one gather over the remaining candidates (not the volume) per report, at
  most every ``Progress`` refresh and never more often than 100x its own duration.

  Inside an object, :meth:`step` (after every FOV move) lets ``Progress`` report too; the report
  then names the object's seed, its moves and its voxels at or above the segment threshold so
  far (before overlaps with earlier objects are removed; one count over the region it touched).
  """

  def __init__(self, canvas: Canvas, policy: BaseSeedPolicy, resumed_at: int = 0):
    """``resumed_at``: candidates already done before this run (restored from a checkpoint)."""
    self.canvas, self.policy = weakref.proxy(canvas), policy  # no canvas <-> reporter cycle
    coords = np.asarray(policy.coords, dtype=np.int64).reshape(-1, 3)
    margin, shape = np.asarray(canvas.margin), np.asarray(canvas.shape)
    ok = np.all(coords - margin >= 0, axis=1) & np.all(coords + margin < shape, axis=1)
    for mask in (canvas.restrictor_mask, canvas.seed_mask):
      if mask is not None and ok.any():
        ok[ok] &= ~mask[tuple(coords[ok].T)]
    self._index = np.flatnonzero(ok)  # candidate numbers, ascending
    self._flat = np.ravel_multi_index(tuple(coords[ok].T), canvas.shape) if ok.any() \
        else np.zeros(0, np.int64)
    self._voxels = int(np.prod(canvas.shape))
    self._next_at, self._cached = 0.0, 0
    self.moves = 0  # FOV moves (network positions) in this run
    self.object_seed: tuple | None = None  # seed (z,y,x) of the object growing now
    self.object_moves = 0
    self.live_start = self.live()
    self.start = time.monotonic()
    corner = ",".join(str(v) for v in reversed(canvas.corner_zyx))
    self.progress = Progress(len(coords), f"inference seeds (subvolume at x,y,z {corner})",
                             unit="seed", log_every_s=Canvas.PROGRESS_LOG_EVERY_S,
                             initial=resumed_at, estimate=self.estimate, bar=canvas.progress_bar)

  def live(self) -> int:
    """Remaining candidates (not yet yielded) that can still start an object."""
    first = np.searchsorted(self._index, self.policy.idx)
    return int(np.count_nonzero(self.canvas.segmentation.reshape(-1)[self._flat[first:]] <= 0))

  def estimate(self) -> tuple[float | None, str]:
    """(ETA in seconds or None, detail text) for :class:`~ffn.progress.Progress`."""
    now = time.monotonic()
    if now >= self._next_at:
      self._cached = self.live()
      self._next_at = now + 100 * (time.monotonic() - now)
    live, drained = self._cached, self.live_start - self._cached
    eta = live * (now - self.start) / drained if drained > 0 else None
    done = 100.0 * self.canvas.segmented_voxels / max(self._voxels, 1)
    rate = self.moves / max(now - self.start, 1e-9)
    detail = (f"{len(self.canvas.origins)} objects, {done:.1f}% voxels segmented, {live} live seeds, "
              f"{self.moves} FOV moves ({rate:.1f}/s)")
    if self.object_seed is not None:
      canvas = self.canvas
      voxels = int(np.count_nonzero(canvas.seed[canvas._touched()] >= canvas.segment_threshold))
      seed = ",".join(str(int(v)) for v in self.object_seed)
      detail += (f"; growing object from seed z,y,x {seed}: {self.object_moves} FOV moves, "
                 f"{voxels} voxels so far")
    return eta, detail

  def update(self) -> None:
    """After the policy yielded a seed: counts the seeds consumed (no object is growing)."""
    self.object_seed = None
    self.progress.update(self.policy.idx - self.progress.count)

  def step(self, seed_zyx: tuple, object_moves: int) -> None:
    """After a FOV move of the object grown from ``seed_zyx`` (its ``object_moves``-th)."""
    self.moves += 1
    self.object_seed, self.object_moves = seed_zyx, object_moves
    self.progress.tick()

  def close(self) -> None:
    self._next_at = 0.0  # the final report counts afresh
    self.progress.close()
