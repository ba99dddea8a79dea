"""Runs an InferenceRequest on one subvolume: load, flood fill, save (google/ffn's ``Runner``).

Result files: see :mod:`ffn.inference.storage`. A finished result is never recomputed or
overwritten. An existing checkpoint is resumed. A stop request (SIGTERM, e.g. a Slurm preemption)
saves a checkpoint at the next network evaluation and raises
:class:`~ffn.inference.canvas.InferenceInterrupted`.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np

from ffn.axes import BoundingBox, xyz_to_zyx
from ffn.errors import FFNError
from ffn.inference import inference_pb2, storage
from ffn.inference.canvas import Canvas, Predictor
from ffn.inference.counters import Counters, timer_counter
from ffn.inference.masks import ShiftMask, build_mask
from ffn.inference.request import (check_request, hdf5_spec, image_spec, movement_policy_kwargs,
                                   shift_mask_spec)
from ffn.inference.seed import make_policy
from ffn.io.volumes import Volume, check_box_inside, check_dtype, read_label_box

_log = logging.getLogger(__name__)


def empty_reason(image: np.ndarray, mask: np.ndarray | None) -> str | None:
  """Why a subvolume has nothing to segment, or None: every voxel masked (google's runner saves
  nothing then), or a constant image (padding beyond the tissue, e.g. chunks of a large volume
  outside the sample: google would still seed there, its peak finder seeing no edges, and run the
  network on blank image). ``image``, ``mask``: z,y,x arrays of the box."""
  if mask is not None and np.all(mask):
    return "every voxel masked"
  if image.size and float(image.max()) == float(image.min()):
    return "constant image (no tissue)"
  return None


class Runner:
  """Segments subvolumes of the request's image with the request's model."""

  def __init__(self, request: inference_pb2.InferenceRequest, compute_dtype: str = "float32",
               predict: Predictor | None = None, fov_size_xyz=None, deltas_xyz=None,
               jit_compile: bool = False):
    """``predict`` (with ``fov_size_xyz``/``deltas_xyz``) replaces the request's model, which is
  otherwise loaded with ``ffn.models.load`` when the first box is segmented."""
    check_request(request)
    self.request = request
    self.counters = Counters()
    self.image_spec = image_spec(request)
    with Volume(self.image_spec) as vol:
      check_dtype(str(vol.spec), vol.dtype, "uif")
      self.volume_shape = vol.shape
    self.seed_policy = make_policy(request.seed_policy, request.seed_policy_args)
    self.compute_dtype = compute_dtype
    self.jit_compile = jit_compile
    self.predict = predict
    if predict is not None:
      self.fov_size_zyx = xyz_to_zyx(fov_size_xyz)
      self.deltas_zyx = xyz_to_zyx(deltas_xyz)
    self._active_canvases: set[Canvas] = set()
    self._reads: dict[tuple, tuple] = {}  # box -> its reads, from the empty check to make_canvas
    self._lock = threading.Lock()
    self.stop_requested = False

  def load_model(self) -> None:
    """Loads the request's model (once); done lazily so finished or invalid boxes cost nothing."""
    if self.predict is not None:
      return
    from ffn import models
    with self._lock:  # canvases built in several threads load it once
      if self.predict is not None:
        return
      with timer_counter(self.counters, "load-model"):
        model = models.load(self.request.model_checkpoint_path, self.request.model_name or None,
                            self.request.model_args or None, self.compute_dtype,
                            jit_compile=self.jit_compile)
      self.fov_size_zyx = xyz_to_zyx(model.fov_size)
      self.deltas_zyx = xyz_to_zyx(model.deltas)
      self.predict = model

  def full_box(self) -> BoundingBox:
    return BoundingBox((0, 0, 0), tuple(reversed(self.volume_shape)))

  def paths(self, box: BoundingBox) -> tuple[str, str, str]:
    corner = xyz_to_zyx(box.start)
    out = self.request.segmentation_output_dir
    return (storage.segmentation_path(out, corner), storage.object_prob_path(out, corner),
            storage.checkpoint_path(out, corner))

  def is_done(self, box: BoundingBox) -> bool:
    return storage.existing_segmentation_path(self.request.segmentation_output_dir,
                                              xyz_to_zyx(box.start)) is not None

  def make_canvas(self, box: BoundingBox, predict: Predictor | None = None,
                  counters: Counters | None = None) -> Canvas:
    """A canvas for ``box``; ``predict`` (default: the model) and ``counters`` (default: the
    runner's) let several canvases share one batching executor and keep their own counters.
    Safe to call from several threads at once: the runner's counters change only under its lock."""
    check_box_inside(box, self.volume_shape, self.image_spec)
    with self._lock:
      read = self._reads.pop(self._key(box), None)
    loads, raw, image, mask = read or self._read(box)
    self.load_model()
    corner = xyz_to_zyx(box.start)
    seed_mask = build_mask(self.request.seed_masks, raw, "seed_masks", corner)
    shift_mask = self._shift_mask(corner, image.shape, loads)
    _, _, cpoint = self.paths(box)
    movement = movement_policy_kwargs(self.request)
    canvas = Canvas(image, self.request.inference_options, predict or self.predict, self.fov_size_zyx,
                    movement.get("deltas_zyx", self.deltas_zyx),
                    move_score_threshold=movement.get("score_threshold"), corner_zyx=corner,
                    restrictor_mask=mask, seed_mask=seed_mask, shift_mask=shift_mask,
                    checkpoint_path=cpoint, checkpoint_interval_sec=self.request.checkpoint_interval,
                    counters=self.counters if counters is None else counters)
    if self.request.HasField("init_segmentation"):
      spec = hdf5_spec(self.request.init_segmentation, "init_segmentation")
      with timer_counter(loads, "load-init-segmentation"):
        labels = read_label_box(spec, corner, image.shape, what="init_segmentation")
      canvas.init_segmentation(labels, f"{spec} (init_segmentation)")
    with self._lock:
      self.counters.add(loads)
    canvas.stop_requested = self.stop_requested
    return canvas

  @staticmethod
  def _key(box: BoundingBox) -> tuple:
    return tuple(box.start.tolist()) + tuple(box.size.tolist())

  def _read(self, box: BoundingBox) -> tuple[Counters, np.ndarray, np.ndarray, np.ndarray | None]:
    """(load times, raw, normalised float32 image, restrictor mask) of ``box``, all z,y,x."""
    loads = Counters()  # this canvas's load times; added to the runner's under its lock
    with timer_counter(loads, "load-image"), Volume(self.image_spec) as vol:
      raw = vol.read_box(box)
    image = (raw.astype(np.float32) - np.float32(self.request.image_mean)) / np.float32(
        self.request.image_stddev)
    mask = build_mask(self.request.masks, raw, "masks", xyz_to_zyx(box.start))
    return loads, raw, image, mask

  def _save_if_empty(self, box: BoundingBox) -> bool:
    """Saves an empty result for a box with nothing to segment (:func:`empty_reason`) without
    loading the model or running the seed policy; True if it did. Otherwise the box's reads are
    kept for :meth:`make_canvas`. Boxes starting from ``init_segmentation`` are never skipped."""
    if self.request.HasField("init_segmentation"):
      return False
    read = self._read(box)
    reason = empty_reason(read[2], read[3])
    if reason is None:
      with self._lock:
        self._reads[self._key(box)] = read
      return False
    seg_path, prob_path, cpoint = self.paths(box)
    counters = read[0]
    counters.increment("empty-subvolumes")
    shape = tuple(xyz_to_zyx(box.size))
    storage.save_probability(np.zeros(shape, np.uint8), prob_path)
    storage.save_subvolume(np.zeros(shape, np.int32), {}, seg_path,
                           request=self.request.SerializeToString(), counters=counters.dumps(),
                           overlaps={})
    if os.path.exists(cpoint):
      os.remove(cpoint)
    with self._lock:
      self.counters.add(counters)
    _log.info("%s in %s: saved an empty result without running the network", reason, box)
    return True

  def _shift_mask(self, corner_zyx, shape_zyx, counters: Counters) -> ShiftMask | None:
    """The request's shift mask for the box at ``corner_zyx`` (google's ``make_restrictor`` part,
    no alignment), its load time counted in ``counters``. ``shift_mask_scale`` unset means 1;
    ``shift_mask_fov`` unset means the network's FoV centred on the position."""
    spec = shift_mask_spec(self.request)
    if spec is None:
      return None
    scale = self.request.shift_mask_scale if self.request.HasField("shift_mask_scale") else 1
    if self.request.HasField("shift_mask_fov"):
      fov = self.request.shift_mask_fov
      start = xyz_to_zyx((fov.start.x, fov.start.y, fov.start.z))
      size = xyz_to_zyx((fov.size.x, fov.size.y, fov.size.z))
    else:
      size = tuple(int(n) for n in self.fov_size_zyx)
      start = tuple(-(n // 2) for n in size)
    with timer_counter(counters, "load-shift-mask"):
      return ShiftMask.load(spec, corner_zyx, shape_zyx, scale, self.request.shift_mask_threshold,
                            start, size)

  def request_stop(self) -> None:
    """Asks a running segmentation to checkpoint and stop (safe to call from a signal handler)."""
    self.stop_requested = True
    for canvas in list(self._active_canvases):
      canvas.stop_requested = True

  def run(self, box: BoundingBox | None = None, predict: Predictor | None = None) -> str:
    """Segments ``box`` (default: the whole image); returns the result path.

    If the result already exists nothing is done. A checkpoint for the box is resumed.
    ``predict`` replaces the model for this box (e.g. a client of a batching executor). When
    several boxes run at once (:mod:`ffn.inference.executor`), each canvas counts into its own
    counters, saved with its result, which are then added to the runner's.
    """
    box = box or self.full_box()
    seg_path, prob_path, cpoint = self.paths(box)
    if self.is_done(box):
      _log.info("%s exists: subvolume already segmented, nothing to do", seg_path)
      return seg_path
    check_box_inside(box, self.volume_shape, self.image_spec)
    if self._save_if_empty(box):
      return seg_path
    counters = Counters() if predict is not None else None
    canvas = self.make_canvas(box, predict=predict, counters=counters)
    if predict is not None:
      canvas.progress_bar = False  # other canvases may be running: log lines, not competing bars
    with self._lock:
      self._active_canvases.add(canvas)
      canvas.stop_requested |= self.stop_requested  # a stop that arrived while it was built
    try:
      self._segment(canvas, box, seg_path, prob_path, cpoint)
    finally:
      with self._lock:
        self._active_canvases.discard(canvas)
        if counters is not None:
          self.counters.add(counters)
    return seg_path

  def _segment(self, canvas: Canvas, box: BoundingBox, seg_path: str, prob_path: str,
               cpoint: str) -> None:
    partial = 0
    if os.path.exists(cpoint):
      try:
        partial = canvas.restore_checkpoint(cpoint)
      except (OSError, ValueError, KeyError) as e:
        raise FFNError(f"{cpoint}: unreadable inference checkpoint ({e}); delete it to start over") from None
    if self.request.alignment_options.save_raw:
      self.save_raw_image(canvas)
    start = time.time()
    if canvas.restrictor_mask is not None and np.all(canvas.restrictor_mask):
      _log.info("everything in %s is masked: saving an empty result", box)  # google saves nothing
    else:
      canvas.segment_all(self.seed_policy, partial_segment_iters=partial)
    _log.info("segmented %s in %.1f s", box, time.time() - start)
    self.save(canvas, seg_path, prob_path)
    if os.path.exists(cpoint):
      os.remove(cpoint)

  def save_raw_image(self, canvas: Canvas) -> None:
    """``alignment_options.save_raw``: the (normalised, float32) image the canvas segments, as
    ``seg-<x>_<y>_<z>.align`` (npz with key ``im``, z,y,x) beside the result, like google/ffn."""
    path = storage.subvolume_path(self.request.segmentation_output_dir, canvas.corner_zyx, "align")
    if not os.path.exists(path):
      storage.save_npz_atomic(path, im=canvas.image)

  def save(self, canvas: Canvas, seg_path: str, prob_path: str) -> None:
    """Writes the result (failed-seed markers removed) and then the probability map."""
    labels = np.where(canvas.segmentation < 0, 0, canvas.segmentation)
    storage.save_probability(canvas.seg_prob, prob_path)
    storage.save_subvolume(labels, canvas.origins, seg_path,
                           request=self.request.SerializeToString(),
                           counters=canvas.counters.dumps(), overlaps=canvas.overlaps,
                           **canvas.result_extras())
