"""What a sweep's array task runs: each (checkpoint, box) evaluation -- segment, optionally reverse
run + consensus, score -- written as one score file.

Files of one evaluation, under the sweep's ``--output_dir`` (``<key>``: the checkpoint's key,
``<x>_<y>_<z>``: the box's start)::

  evals/<key>/forward/<x>/<y>/seg-<x>_<y>_<z>.npz    forward result (google's layout, + .prob)
  evals/<key>/reverse/...  evals/<key>/consensus/...  with --reverse
  evals/<key>/scores/<x>_<y>_<z>.json                the row: status ok | failed, scores, reason

The score file is written last and atomically: it is what makes an evaluation done (a re-run
skips it). A checkpoint that cannot be loaded (missing, corrupt, shapes not matching its
model_args) gets a ``failed`` score file for each of its boxes with the one-line reason, and the
task goes on with its other evaluations; so does an evaluation stopped by an input error
(FFNError). Any other exception fails the task: :mod:`ffn.blockwise` reports its evaluations as
failed with the task's log, and a re-run submits them again. Inference resumes from its
``.cpoint`` checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
from google.protobuf import text_format

import ffn
from ffn.axes import BoundingBox, xyz_to_zyx
from ffn.blockwise import TaskInterrupted, TaskReport, WorkItem, Worker
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.io.atomic import write_text_atomic
from ffn.sweep.checkpoints import Checkpoint, is_complete

_log = logging.getLogger(__name__)

# Scores with ground truth (lower is better), then label-free indicators (proxies).
GT_METRICS = ("vi_split", "vi_merge", "vi", "adapted_rand_error", "adjusted_rand_error")
PROXY_METRICS = ("unsegmented_fraction", "objects", "median_object_voxels",
                 "largest_object_fraction", "fwd_rev_vi", "fwd_rev_adapted_rand_error")


def item_id(key: str, box: BoundingBox) -> str:
  """``<key>@<x>_<y>_<z>``: one evaluation (the box's start names the box)."""
  return f"{key}@" + "_".join(str(int(v)) for v in box.start)


def split_item_id(item_id_: str) -> tuple[str, str]:
  key, _, box = item_id_.rpartition("@")
  return key, box


def eval_dir(output_dir: str, key: str, part: str) -> str:
  """``<output_dir>/evals/<key>/<part>`` (part: forward, reverse, consensus, scores)."""
  return os.path.join(output_dir, "evals", key, part)


def score_path(output_dir: str, item: WorkItem) -> str:
  key, box = split_item_id(item.id)
  return os.path.join(eval_dir(output_dir, key, "scores"), f"{box}.json")


def read_score(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def label_free(seg: np.ndarray) -> dict[str, Any]:
  """Indicators without ground truth: unsegmented fraction, objects, median object size (voxels),
  the largest object's fraction of the box."""
  ids, counts = np.unique(seg, return_counts=True)
  sizes = counts[ids != 0]
  return {"unsegmented_fraction": float(np.mean(seg == 0)) if seg.size else 0.0,
          "objects": int(sizes.size),
          "median_object_voxels": float(np.median(sizes)) if sizes.size else 0.0,
          "largest_object_fraction": float(sizes.max() / seg.size) if sizes.size else 0.0}


def disagreement(forward: np.ndarray, reverse: np.ndarray) -> dict[str, float]:
  """Forward/reverse disagreement: VI (split + merge, nats) and adapted Rand error between the
  two segmentations, every voxel counted (0 = unsegmented is one more segment in each)."""
  from ffn.metrics.scores import adapted_rand_error, contingency, variation_of_information
  table = contingency(forward, reverse, ignore_gt_zero=False)
  split, merge = variation_of_information(table)
  return {"fwd_rev_vi": split + merge, "fwd_rev_adapted_rand_error": adapted_rand_error(table)}


def network_evaluations(path: str) -> int:
  """Network calls of a saved result (its ``inference-calls`` counter)."""
  with np.load(path, allow_pickle=True) as data:
    if "counters" not in data:
      return 0
    return int(json.loads(str(data["counters"])).get("inference-calls", 0))


class SweepWorker(Worker):
  """Evaluates a task's (checkpoint, box) items; pickled to the task (texts and dicts only).

  ``template``: the inference request text (model fields and output directory replaced per
  checkpoint); ``checkpoints``: key -> :meth:`Checkpoint.to_json`; ``reverse``: also run a
  ``PolicyInvertOrigins`` pass and score the split consensus (``split_min_size`` voxels);
  ``groundtruth``: a volume spec, or None for label-free indicators only; ``retry_failed``:
  failed score files do not count as done.
  """

  def __init__(self, output_dir: str, template: str, checkpoints: dict[str, dict[str, Any]],
               reverse: bool, split_min_size: int, groundtruth: str | None, compute_dtype: str,
               retry_failed: bool = False):
    self.output_dir = output_dir
    self.template = template
    self.checkpoints = checkpoints
    self.reverse = reverse
    self.split_min_size = split_min_size
    self.groundtruth = groundtruth
    self.compute_dtype = compute_dtype
    self.retry_failed = retry_failed

  def is_done(self, item: WorkItem) -> bool:
    score = read_score(score_path(self.output_dir, item))
    return score is not None and (score.get("status") == "ok" or not self.retry_failed)

  def run(self, items: Sequence[WorkItem], report: TaskReport) -> None:
    self._runner = None
    groups: dict[str, list[WorkItem]] = {}
    for item in items:
      groups.setdefault(split_item_id(item.id)[0], []).append(item)
    for key, group in groups.items():
      todo = [item for item in group if not self.is_done(item)]
      if not todo:
        continue
      checkpoint = Checkpoint.from_json(self.checkpoints[key])
      start = time.monotonic()
      try:
        model, reason = self._load(checkpoint), None
      except FFNError as e:
        model, reason = None, one_line(e)
      except Exception as e:  # noqa: BLE001 - narrowed here (TensorFlow is imported lazily)
        import tensorflow as tf
        if not isinstance(e, (tf.errors.OpError, ValueError, OSError)):
          raise
        model, reason = None, one_line(e)
      if reason is not None:  # the checkpoint cannot be loaded: its rows say why
        _log.warning("%s: not evaluated: %s", checkpoint.path, reason)
        for item in todo:
          report.started(item)
          self._write(item, checkpoint, {"status": "failed", "reason": reason})
          report.finished(item)
        continue
      _log.info("%s loaded in %.1f s", checkpoint.path, time.monotonic() - start)
      for item in todo:
        if self._stopping:
          raise TaskInterrupted("stopped before the next evaluation")
        report.started(item)
        began = time.monotonic()
        try:
          scores = self._evaluate(checkpoint, model, item)
        except FFNError as e:  # e.g. an unreadable result or ground truth: this row only
          self._write(item, checkpoint, {"status": "failed", "reason": one_line(e)})
        else:
          self._write(item, checkpoint, {"status": "ok", **scores,
                                         "seconds": round(time.monotonic() - began, 3)})
        report.finished(item)

  def stop(self) -> None:
    super().stop()
    runner = getattr(self, "_runner", None)
    if runner is not None:
      runner.request_stop()

  # -- one evaluation ------------------------------------------------------------------------

  def _load(self, checkpoint: Checkpoint):
    from ffn import models
    from ffn.inference.request import parse_request
    if checkpoint.problem:
      raise FFNError(checkpoint.problem)
    if not os.path.isdir(checkpoint.path):  # a directory: its latest checkpoint (models.load)
      if not os.path.exists(checkpoint.path + ".index"):
        raise FFNError(f"{checkpoint.path}: checkpoint not found (no "
                       f"{os.path.basename(checkpoint.path)}.index)")
      if not is_complete(checkpoint.path):
        raise FFNError(f"{checkpoint.path}: incomplete checkpoint (a .data-* shard is missing)")
    request = parse_request(self.template, "sweep inference request")
    name = checkpoint.model_name or request.model_name or None
    args = checkpoint.model_args if checkpoint.model_args is not None else (
        request.model_args or None)
    return models.load(checkpoint.path, name, args, self.compute_dtype)

  def _request(self, checkpoint: Checkpoint, model, part: str, seed_dir: str | None = None):
    from ffn.inference.request import parse_request
    request = parse_request(self.template, "sweep inference request")
    request.model_checkpoint_path = checkpoint.path
    request.model_name = model.model_name
    request.model_args = json.dumps(model.model_args, sort_keys=True)
    request.segmentation_output_dir = eval_dir(self.output_dir, checkpoint.key, part)
    if seed_dir is not None:
      request.seed_policy = "PolicyInvertOrigins"
      request.seed_policy_args = json.dumps({"segmentation_dir": seed_dir})
    return request

  def _segment(self, request, model, box: BoundingBox) -> str:
    from ffn.inference.canvas import InferenceInterrupted
    from ffn.inference.runner import Runner
    runner = Runner(request, compute_dtype=self.compute_dtype, predict=model,
                    fov_size_xyz=model.fov_size, deltas_xyz=model.deltas)
    self._runner = runner
    if self._stopping:
      runner.request_stop()
    try:
      return runner.run(box)
    except InferenceInterrupted as e:
      raise TaskInterrupted(str(e)) from e
    finally:
      self._runner = None

  def _evaluate(self, checkpoint: Checkpoint, model, item: WorkItem) -> dict[str, Any]:
    box = item.write_box
    forward = self._segment(self._request(checkpoint, model, "forward"), model, box)
    paths = [forward]
    scored = forward
    extra: dict[str, Any] = {}
    if self.reverse:
      seeds = eval_dir(self.output_dir, checkpoint.key, "forward")
      reverse = self._segment(self._request(checkpoint, model, "reverse", seeds), model, box)
      paths.append(reverse)
      scored = self._consensus(checkpoint, box)
      extra = disagreement(storage.load_segmentation_file(forward)[0],
                           storage.load_segmentation_file(reverse)[0])
    seg, _ = storage.load_segmentation_file(scored)
    out: dict[str, Any] = {"segmentation": scored, **label_free(seg), **extra,
                           "evaluations": sum(network_evaluations(p) for p in paths)}
    if self.groundtruth:
      from ffn.io.volumes import Volume
      from ffn.metrics.scores import evaluate
      with Volume(self.groundtruth) as vol:
        gt = vol.read_box(box)
      scores = evaluate(seg, gt)
      out.update({name: scores[name] for name in GT_METRICS})
    return {k: (v + 0.0 if isinstance(v, float) else v) for k, v in out.items()}  # no -0.0

  def _consensus(self, checkpoint: Checkpoint, box: BoundingBox) -> str:
    from ffn.consensus.consensus import ConsensusRequest, compute_consensus, save_consensus
    request = ConsensusRequest(type=ConsensusRequest.CONSENSUS_SPLIT,
                               split_min_size=self.split_min_size,
                               segmentation_output_dir=eval_dir(self.output_dir, checkpoint.key,
                                                                "consensus"))
    request.segmentation1.directory = eval_dir(self.output_dir, checkpoint.key, "forward")
    request.segmentation2.directory = eval_dir(self.output_dir, checkpoint.key, "reverse")
    corner = xyz_to_zyx(box.start)
    done = storage.existing_segmentation_path(request.segmentation_output_dir, corner)
    if done is not None:
      return done
    labels, origins = compute_consensus(request, corner, box.shape_zyx())
    return save_consensus(labels, origins, request, corner)

  def _write(self, item: WorkItem, checkpoint: Checkpoint, fields: dict[str, Any]) -> None:
    key, box = split_item_id(item.id)
    row = {"checkpoint": checkpoint.path, "key": key, "step": checkpoint.step, "box": box,
           "box_size": [int(v) for v in item.write_box.size], **fields,
           "ffn_version": ffn.__version__, "time": time.time()}
    write_text_atomic(score_path(self.output_dir, item), json.dumps(row, indent=1) + "\n")


def template_text(request) -> str:
  """The request as the sweep's template: model fields and output directory cleared (they are set
  per checkpoint), so that the manifest records only what is common to every evaluation."""
  template = type(request)()
  template.CopyFrom(request)
  template.model_checkpoint_path = "<per checkpoint>"
  template.segmentation_output_dir = "<per checkpoint>"
  return text_format.MessageToString(template)
