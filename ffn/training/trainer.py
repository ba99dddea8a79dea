"""Single-process FFN training in TF2 (google/ffn ``train.py`` semantics, no sessions).

Per step: ``batch_size`` example slots each hold one example (see :mod:`ffn.training.data`) and a
seed canvas; each slot supplies the FOV at its next offset of the ``fov_policy`` ("fixed" or
"max_pred_moves", :mod:`ffn.training.examples`); the model predicts, the loss is
the mean sigmoid cross-entropy against the soft labels, every gradient element is clipped to
+/- ``max_gradient_entry_mag``, and the optimizer applies it. The predicted logits are written
back into each slot's seed canvas, so later FOVs of the same example see the model's own
predictions, as in inference. A slot whose policy is exhausted takes the next example.

Checkpoints (``tf.train.Checkpoint`` via ``CheckpointManager``, prefix ``model.ckpt-<step>``) hold
the model, the optimizer slots, the step and the data-stream position (examples taken so far);
examples in flight when a checkpoint is written are not resumed -- a restart takes fresh ones.

Under a ``tf.distribute`` strategy (see :mod:`ffn.training.distributed`) each worker process owns
``batch_size`` slots per local replica, reads every ``num_workers``-th example of the stream, and
the replicas all-reduce (mean) their gradients before clipping, so ``batch_size`` is per replica.
Stop and save decisions (signals, checkpoint interval) are agreed by all workers after each step;
only the chief (worker 0) writes checkpoints and summaries to ``train_dir``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

import ffn.models
from ffn.axes import xyz_to_zyx
from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic
from ffn.progress import format_eta
from ffn.training.augment import AugmentConfig
from ffn.training.data import ExampleSource
from ffn.training.examples import (FOV_POLICIES, crop, fixed_policy, fov_shifts, initial_seed, logit,
                                   max_pred_policy, patch_moves)
from ffn.training.optimizer import Optimizer

_log = logging.getLogger("ffn.training")

EXIT_PREEMPTED = 3  # status after a SIGTERM: checkpoint saved, training not finished


@dataclasses.dataclass
class TrainConfig:
  """Training settings; names follow google/ffn's train.py flags. Sizes in x,y,z order."""
  train_coords: str
  data_volumes: str
  label_volumes: str
  model_name: str
  model_args: dict
  train_dir: str
  image_mean: float | None
  image_stddev: float | None
  batch_size: int = 64
  max_steps: int = 10000
  seed_pad: float = 0.05
  threshold: float = 0.9
  fov_policy: str = "fixed"
  fov_moves: int = 1
  shuffle_moves: bool = True
  permutable_axes: tuple = (1, 2)
  reflectable_axes: tuple = (0, 1, 2)
  optimizer: str = "sgd"
  learning_rate: float = 0.001
  momentum: float = 0.9
  adam_beta1: float = 0.9
  adam_beta2: float = 0.999
  epsilon: float = 1e-8
  rmsprop_decay: float = 0.9
  max_gradient_entry_mag: float = 0.7
  summary_rate_secs: float = 120.0
  checkpoint_interval_s: float = 300.0
  max_to_keep: int = 5
  keep_checkpoint_every_n_hours: float = 1.0
  log_every: int = 100
  seed: int = 0
  compute_dtype: str = "float32"
  # Several volumes (ffn.training.data): google's per-volume normalisation and sampling weights.
  image_offset_scale_map: str | None = None
  volume_weights: str | None = None
  # EM augmentations (ffn.training.augment.AugmentConfig, same names); 0 = off.
  rotation_max_deg: float = 0.0
  elastic_alpha: float = 0.0
  elastic_sigma: float = 4.0
  misalign_prob: float = 0.0
  misalign_max_shift: int = 0
  missing_section_prob: float = 0.0
  blur_section_prob: float = 0.0
  blur_max_sigma: float = 2.0
  brightness: float = 0.0
  contrast: float = 0.0
  gamma: float = 0.0
  noise_stddev: float = 0.0

  def augment_config(self) -> AugmentConfig:
    """The augmentation strengths of this config (raises FFNError on a bad value)."""
    return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})

  def __post_init__(self) -> None:
    self.augment_config()
    if self.fov_policy not in FOV_POLICIES:
      raise FFNError(f"--fov_policy {self.fov_policy!r}: expected one of {', '.join(FOV_POLICIES)}")
    if self.fov_moves < 1:
      raise FFNError(f"--fov_moves must be >= 1, got {self.fov_moves}")


class _Slot:
  """One batch element: an example, its seed canvas and its lazy FOV policy."""

  def __init__(self, image: np.ndarray, labels: np.ndarray, seed_pad: float,
               policy: Callable[[np.ndarray], Iterator[tuple[int, int, int]]]):
    """``policy``: builds the lazy FOV offset iterator (x,y,z) over this slot's seed canvas."""
    self.image, self.labels = image, labels
    self.seed = initial_seed(labels.shape, pad=seed_pad)
    self.offsets = policy(self.seed)


class Trainer:
  """Owns model, optimizer, checkpointing, the example stream and summaries for one run."""

  def __init__(self, cfg: TrainConfig, strategy: tf.distribute.Strategy | None = None,
               worker: int = 0, num_workers: int = 1):
    """``strategy``: None for one process on the default device; else a strategy whose scope
    holds the variables. ``worker``/``num_workers``: this process among the synchronous workers
    (worker 0 is the chief)."""
    self.cfg = cfg
    self.strategy = strategy or tf.distribute.get_strategy()
    self.worker, self.num_workers = worker, num_workers
    self.is_chief = worker == 0
    self.local_replicas = max(1, self.strategy.num_replicas_in_sync // num_workers)
    with self.strategy.scope():
      self.model = ffn.models.build_model(cfg.model_name, cfg.model_args, seed=cfg.seed)
      self.variables = list(self.model.trainable_variables)
      self.optimizer = Optimizer(cfg.optimizer, self.variables, cfg.learning_rate, cfg.momentum,
                                 cfg.adam_beta1, cfg.adam_beta2, cfg.epsilon, cfg.rmsprop_decay)
      self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
      self.examples_taken = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples_taken")
    self.fov_zyx = xyz_to_zyx(self.model.fov_size)
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                          step=self.step, examples_taken=self.examples_taken)
    # Non-chief workers save too (saving may need every worker), into a scratch directory.
    self._ckpt_dir = cfg.train_dir if self.is_chief else tempfile.mkdtemp(prefix=f"ffn-worker{worker}-")
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, self._ckpt_dir, max_to_keep=cfg.max_to_keep,
        keep_checkpoint_every_n_hours=cfg.keep_checkpoint_every_n_hours,
        checkpoint_name="model.ckpt")
    b = cfg.batch_size
    if strategy is None:
      spec_x = tf.TensorSpec((b,) + tuple(self.fov_zyx) + (2,), tf.float32)
      spec_y = tf.TensorSpec((b,) + tuple(self.fov_zyx) + (1,), tf.float32)
      self.train_step = tf.function(self._train_step, input_signature=[spec_x, spec_y])
    else:
      self.train_step = tf.function(
          lambda x, labels: self.strategy.run(self._train_step, args=(x, labels)))
    self._agree_fn = tf.function(lambda flags: self.strategy.run(_all_sum, args=(flags,)))
    self.source: ExampleSource | None = None
    self._stream = None
    self._slots: list[_Slot | None] = [None] * (b * self.local_replicas)
    self._shifts_rng = np.random.default_rng([cfg.seed, 2])
    self._stop = self._save_now = False

  # -- model step ---------------------------------------------------------------------------

  def _train_step(self, x: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    with tf.GradientTape() as tape:
      logits = self.model(x, compute_dtype=tf.as_dtype(self.cfg.compute_dtype))
      loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
    grads = tape.gradient(loss, self.variables)
    replica = tf.distribute.get_replica_context()
    if replica.num_replicas_in_sync > 1:
      grads = replica.all_reduce(tf.distribute.ReduceOp.MEAN, grads)
    self.apply_gradients(grads)
    return logits, loss

  def apply_gradients(self, grads: list[tf.Tensor]) -> None:
    """google's update: every gradient element clipped to +/- ``max_gradient_entry_mag`` (when
    > 0), the optimizer's step, the global step + 1."""
    clip = self.cfg.max_gradient_entry_mag
    if clip > 0:
      grads = [tf.clip_by_value(g, -clip, clip) for g in grads]
    self.optimizer.apply(grads, self.variables)
    self.step.assign_add(1)

  def _run_step(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """One training step on this worker's batch; returns (logits as numpy, mean local loss)."""
    if self.local_replicas == 1:
      args = [tf.constant(x), tf.constant(labels)]
    else:
      first = self.worker * self.local_replicas
      args = [self.strategy.experimental_distribute_values_from_function(
          lambda ctx, parts=parts: tf.constant(parts[ctx.replica_id_in_sync_group - first]))
              for parts in (np.split(x, self.local_replicas), np.split(labels, self.local_replicas))]
    logits, loss = self.train_step(*args)
    local = self.strategy.experimental_local_results
    return (np.concatenate([v.numpy() for v in local(logits)]),
            float(np.mean([float(v) for v in local(loss)])))

  def _agree(self, stop: bool, save: bool) -> tuple[bool, bool]:
    """(stop, save), each true when any worker asks for it (all workers see the same answer)."""
    if self.num_workers == 1:
      return stop, save
    flags = self._agree_fn(tf.constant([float(stop), float(save)], tf.float32))
    flags = self.strategy.experimental_local_results(flags)[0].numpy()
    return bool(flags[0] > 0), bool(flags[1] > 0)

  def loss_on(self, x: np.ndarray, labels: np.ndarray) -> float:
    """Mean sigmoid cross-entropy of the current model on a fixed batch (no update)."""
    logits = self.model(tf.constant(x, tf.float32))
    return float(tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.constant(labels, tf.float32), logits=logits)))

  # -- data -----------------------------------------------------------------------------------

  def make_source(self) -> ExampleSource:
    """The example stream of this run's config, patches sized for its FOV policy and moves."""
    cfg = self.cfg
    return ExampleSource(cfg.train_coords, cfg.data_volumes, cfg.label_volumes, self.model.fov_size,
                         self.model.deltas, cfg.image_mean, cfg.image_stddev, cfg.permutable_axes,
                         cfg.reflectable_axes, cfg.seed,
                         moves=patch_moves(cfg.fov_policy, cfg.fov_moves),
                         image_offset_scale_map=cfg.image_offset_scale_map,
                         volume_weights=cfg.volume_weights, augment_config=cfg.augment_config())

  def attach_data(self, source: ExampleSource) -> None:
    self.source = source
    self._stream = source.stream(int(self.examples_taken.numpy()), worker=self.worker,
                                 num_workers=self.num_workers)

  def _new_slot(self) -> _Slot:
    image, labels = next(self._stream)
    self.examples_taken.assign_add(1)
    cfg = self.cfg
    if cfg.fov_policy == "max_pred_moves":
      policy = functools.partial(max_pred_policy, fov_xyz=self.model.fov_size,
                                 deltas_xyz=self.model.deltas, threshold=cfg.threshold)
    else:
      shifts = fov_shifts(self.model.deltas)
      if cfg.shuffle_moves:
        self._shifts_rng.shuffle(shifts)
      policy = functools.partial(fixed_policy, shifts=shifts, threshold=cfg.threshold)
    return _Slot(image.numpy(), labels.numpy(), cfg.seed_pad, policy)

  def next_batch(self, slots: list[_Slot | None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(x [b,z,y,x,2], labels [b,z,y,x,1], seed views to write predictions into).

    ``slots``: the batch slots to advance (default: this trainer's own).
    """
    slots = self._slots if slots is None else slots
    xs, ys, views = [], [], []
    for i in range(len(slots)):
      while True:
        slot = slots[i]
        if slot is None:
          slot = slots[i] = self._new_slot()
        off = next(slot.offsets, None)
        if off is not None:
          break
        slots[i] = None
      view = crop(slot.seed, off, self.fov_zyx)
      xs.append(np.stack([crop(slot.image, off, self.fov_zyx), view], axis=-1))
      ys.append(crop(slot.labels, off, self.fov_zyx)[..., None])
      views.append(view)
    return np.stack(xs), np.stack(ys), views

  # -- checkpoints ----------------------------------------------------------------------------

  def restore_or_init(self) -> bool:
    """Restores the latest checkpoint in train_dir; returns True if one was found."""
    latest = tf.train.latest_checkpoint(self.cfg.train_dir)
    if latest is None:
      return False
    self.checkpoint.restore(latest).assert_existing_objects_matched()
    _log.info("resumed from %s at step %d", latest, int(self.step.numpy()))
    return True

  def save(self) -> str:
    path = self.manager.save(checkpoint_number=int(self.step.numpy()))
    _log.info("saved %s", path)
    return path

  def close(self) -> None:
    """Removes a non-chief worker's scratch checkpoint directory."""
    if not self.is_chief:
      shutil.rmtree(self._ckpt_dir, ignore_errors=True)

  def write_flags(self) -> None:
    os.makedirs(self.cfg.train_dir, exist_ok=True)
    flags = dataclasses.asdict(self.cfg)
    flags["model_name"] = ffn.models.canonical_name(self.cfg.model_name)
    write_text_atomic(os.path.join(self.cfg.train_dir, ffn.models.FLAGS_FILE),
                      json.dumps(flags, indent=2, default=list) + "\n")

  # -- loop -----------------------------------------------------------------------------------

  def _on_signal(self, signum, frame) -> None:
    if signum == signal.SIGTERM:
      self._stop = True
    else:
      self._save_now = True

  def run(self) -> int:
    """Trains to ``max_steps``; returns 0, or EXIT_PREEMPTED after a SIGTERM (checkpoint saved)."""
    cfg = self.cfg
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    writer = (tf.summary.create_file_writer(cfg.train_dir) if self.is_chief
              else tf.summary.create_noop_writer())
    metrics = np.zeros(4, np.int64)  # tp, fp, fn, tn at the threshold, since the last summary
    losses: list[float] = []
    t_start = t_log = t_summary = t_ckpt = time.monotonic()
    step0 = last_log_step = int(self.step.numpy())
    status = 0
    try:
      while int(self.step.numpy()) < cfg.max_steps:
        x, labels, views = self.next_batch()
        logits, loss = self._run_step(x, labels)
        pred = logits[..., 0]
        for i, view in enumerate(views):
          view[...] = pred[i]
        losses.append(loss)
        metrics += _confusion(pred, labels[..., 0], logit(cfg.threshold))
        step = int(self.step.numpy())
        now = time.monotonic()
        if step % cfg.log_every == 0 or step == cfg.max_steps:
          rate = (step - last_log_step) / max(now - t_log, 1e-9)
          eta = (cfg.max_steps - step) / max((step - step0) / max(now - t_start, 1e-9), 1e-9)
          _log.info("step %d/%d loss %.4f  %.2f steps/s  ETA %s%s", step, cfg.max_steps,
                    float(np.mean(losses[-cfg.log_every:])), rate, format_eta(eta),
                    f"  worker {self.worker}/{self.num_workers} examples_taken "
                    f"{int(self.examples_taken.numpy())}" if self.num_workers > 1 else "")
          t_log, last_log_step = now, step
        if now - t_summary >= cfg.summary_rate_secs or step == cfg.max_steps:
          with writer.as_default(step=step):
            _write_summaries(losses, metrics, (step - step0) / max(now - t_start, 1e-9), x, pred, labels)
          writer.flush()
          losses, metrics, t_summary = [], np.zeros(4, np.int64), now
        stop, save_now = self._agree(
            self._stop, self._save_now or (self.is_chief and now - t_ckpt >= cfg.checkpoint_interval_s))
        if stop:
          self.save()
          status = EXIT_PREEMPTED
          break
        if save_now:
          self.save()
          self._save_now, t_ckpt = False, now
      else:
        self.save()
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      writer.close()
    return status


def _all_sum(flags: tf.Tensor) -> tf.Tensor:
  """Element-wise sum of ``flags`` over all replicas (in replica context)."""
  replica = tf.distribute.get_replica_context()
  if replica.num_replicas_in_sync == 1:
    return flags
  # tf.identity places the function's input on the replica's device (all_reduce needs one).
  return replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(flags))


def _confusion(pred_logits: np.ndarray, labels: np.ndarray, threshold_logit: float) -> np.ndarray:
  """[tp, fp, fn, tn] of the mask ``pred >= threshold`` against ``labels > 0.5``."""
  p, t = pred_logits >= threshold_logit, labels > 0.5
  return np.array([np.sum(p & t), np.sum(p & ~t), np.sum(~p & t), np.sum(~p & ~t)], np.int64)


def _summary_metadata(plugin: str) -> bytes:
  from tensorflow.core.framework import summary_pb2
  meta = summary_pb2.SummaryMetadata()
  meta.plugin_data.plugin_name = plugin
  return meta.SerializeToString()


def _scalar(tag: str, value: float) -> None:
  """A TensorBoard scalar, written without the tensorboard package (TF's own ``tf.summary.write``)."""
  tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_summary_metadata("scalars"))


def _image(tag: str, image: np.ndarray) -> None:
  """A TensorBoard greyscale image from a 2D array in [0, 1] (PNG, the images plugin's layout)."""
  png = tf.io.encode_png(tf.constant(np.clip(image * 255, 0, 255).astype(np.uint8)[..., None]))
  h, w = image.shape
  tf.summary.write(tag, tf.stack([tf.constant(str(w)), tf.constant(str(h)), png]),
                   metadata=_summary_metadata("images"))


def _write_summaries(losses, metrics, rate: float, x: np.ndarray, pred: np.ndarray,
                     labels: np.ndarray) -> None:
  tp, fp, fn, tn = (float(v) for v in metrics)
  precision = tp / max(tp + fp, 1.0)
  recall = tp / max(tp + fn, 1.0)
  _scalar("pixel_loss", float(np.mean(losses)))
  _scalar("eval/precision", precision)
  _scalar("eval/recall", recall)
  _scalar("eval/f1", 2 * precision * recall / max(precision + recall, 1e-12))
  _scalar("eval/accuracy", (tp + tn) / max(tp + fp + fn + tn, 1.0))
  _scalar("steps_per_second", rate)
  # Centre z slice of the first batch element: image | predicted probability | label.
  z = x.shape[1] // 2
  image = x[0, z, :, :, 0]
  image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
  prob = 1.0 / (1.0 + np.exp(-pred[0, z]))
  _image("center_slice/image_prediction_label",
         np.concatenate([image, prob, labels[0, z, :, :, 0]], axis=1))
