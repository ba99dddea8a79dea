"""The SECGAN training loop: crops, steps, checkpoints, signals, TensorBoard (like ``ffn train``).

``train_dir`` holds ``secgan_flags.json`` (the :class:`~secgan.model.SecganConfig`),
``model.ckpt-<step>.{index,data-*}`` + ``checkpoint`` (``tf.train.CheckpointManager``: both
generators, all discriminators, the four optimizers' slots, the fake pools and the step) and
TensorBoard events: every loss of :data:`secgan.model.LOSS_NAMES` as ``losses/<name>`` (mean since
the last summary), ``steps_per_second``, and the centre z slices of the first batch element as
images ``cycles/labeled`` (L | G(L) | F(G(L))), ``cycles/unlabeled`` (U | F(U) | G(F(U))) and, with
an FFN, ``segmentation/unlabeled`` (F(U) | FFN probability of F(U)).

Checkpoints are written every ``checkpoint_interval_s``, on SIGUSR1 (and training continues), on
SIGTERM (then the loop ends with :data:`ffn.training.trainer.EXIT_PREEMPTED`) and at ``max_steps``.
A run started again with the same ``train_dir`` resumes from the latest checkpoint: crops are drawn
by step (:mod:`secgan.data`) and pool choices by step (:mod:`secgan.pool`), so a resumed run
continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import numpy as np
import tensorflow as tf

from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic
from ffn.progress import format_eta
from ffn.training.trainer import EXIT_PREEMPTED, _image, _scalar
from secgan.data import CropSource
from secgan.model import LOSS_NAMES, Secgan, SecganConfig, load_ffn

_log = logging.getLogger("secgan.train")

FLAGS_FILE = "secgan_flags.json"


def read_config(train_dir: str) -> SecganConfig:
  """The config saved in ``train_dir`` (FFNError if there is none)."""
  path = os.path.join(train_dir, FLAGS_FILE)
  try:
    with open(path) as f:
      return SecganConfig(**json.load(f))
  except FileNotFoundError:
    raise FFNError(f"{path}: not found (is {train_dir} a SECGAN training directory?)") from None
  except (OSError, json.JSONDecodeError, TypeError) as e:
    raise FFNError(f"{path}: unreadable SECGAN flags ({e})") from None


def crop_sources(cfg: SecganConfig) -> tuple[CropSource, CropSource]:
  """The (labeled, unlabeled) crop streams of ``cfg`` (opens and checks every volume)."""
  labeled = CropSource(cfg.labeled_volumes, cfg.input_zyx, 0, cfg.seed, cfg.permutable_axes,
                       cfg.reflectable_axes)
  try:
    unlabeled = CropSource(cfg.unlabeled_volumes, cfg.input_zyx, 1, cfg.seed, cfg.permutable_axes,
                           cfg.reflectable_axes)
  except BaseException:
    labeled.close()
    raise
  return labeled, unlabeled


class SecganTrainer:
  """One training run: the model, its checkpoints, the two crop streams and the loop."""

  def __init__(self, cfg: SecganConfig, ffn_model: tf.Module | None = None):
    """``ffn_model``: the frozen FFN; None loads ``cfg.ffn_checkpoint`` (if any)."""
    self.cfg = cfg
    self.model = Secgan(cfg, ffn_model if ffn_model is not None else load_ffn(cfg))
    self.checkpoint = self.model.checkpoint()
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, cfg.train_dir, max_to_keep=cfg.max_to_keep,
        keep_checkpoint_every_n_hours=cfg.keep_checkpoint_every_n_hours,
        checkpoint_name="model.ckpt")
    self.labeled: CropSource | None = None
    self.unlabeled: CropSource | None = None
    self._stop = self._save_now = False

  @property
  def step(self) -> int:
    return int(self.model.step.numpy())

  def attach_data(self, sources: tuple[CropSource, CropSource] | None = None) -> None:
    """Uses ``sources`` (labeled, unlabeled; default: :func:`crop_sources` of the config)."""
    self.labeled, self.unlabeled = sources if sources is not None else crop_sources(self.cfg)

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) crops of ``step`` [b, z, y, x, 1] in unit space."""
    b = self.cfg.batch_size
    return self.labeled.batch(step, b), self.unlabeled.batch(step, b)

  def restore_or_init(self) -> bool:
    """Restores the latest checkpoint of train_dir; True if there was one."""
    latest = tf.train.latest_checkpoint(self.cfg.train_dir)
    if latest is None:
      return False
    self.checkpoint.restore(latest).assert_existing_objects_matched()
    _log.info("resumed from %s at step %d", latest, self.step)
    return True

  def save(self) -> str:
    path = self.manager.save(checkpoint_number=self.step)
    _log.info("saved %s", path)
    return path

  def write_flags(self) -> None:
    os.makedirs(self.cfg.train_dir, exist_ok=True)
    write_text_atomic(os.path.join(self.cfg.train_dir, FLAGS_FILE),
                      json.dumps(self.cfg.to_json(), indent=2, default=list) + "\n")

  def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
    if signum == signal.SIGTERM:
      self._stop = True
    else:
      self._save_now = True

  def run(self) -> int:
    """Trains to ``max_steps``; 0, or EXIT_PREEMPTED after SIGTERM (checkpoint saved)."""
    cfg = self.cfg
    self._stop = self._save_now = False
    handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
    writer = tf.summary.create_file_writer(cfg.train_dir)
    sums: dict[str, list[float]] = {k: [] for k in LOSS_NAMES}
    t_start = t_log = t_summary = t_ckpt = time.monotonic()
    step0 = last_log_step = self.step
    status = 0
    try:
      while self.step < cfg.max_steps:
        real_l, real_u = self.batch(self.step)
        out, images = self.model.train_step(tf.constant(real_l), tf.constant(real_u))
        for k in LOSS_NAMES:
          sums[k].append(float(out[k]))
        step, now = self.step, time.monotonic()
        if step % cfg.log_every == 0 or step == cfg.max_steps:
          rate = (step - last_log_step) / max(now - t_log, 1e-9)
          eta = (cfg.max_steps - step) / max((step - step0) / max(now - t_start, 1e-9), 1e-9)
          means = "  ".join(f"{k} {np.mean(sums[k][-cfg.log_every:]):.4f}"
                            for k in ("G", "F", "D_u", "D_l", "D_S", "cycle_l", "cycle_u"))
          _log.info("step %d/%d  %s  %.3f steps/s  ETA %s", step, cfg.max_steps, means, rate,
                    format_eta(eta))
          t_log, last_log_step = now, step
        if now - t_summary >= cfg.summary_rate_secs or step == cfg.max_steps:
          with writer.as_default(step=step):
            _write_summaries(sums, (step - step0) / max(now - t_start, 1e-9), images)
          writer.flush()
          sums, t_summary = {k: [] for k in LOSS_NAMES}, now
        if self._stop:
          self.save()
          status = EXIT_PREEMPTED
          break
        if self._save_now or now - t_ckpt >= cfg.checkpoint_interval_s:
          self.save()
          self._save_now, t_ckpt = False, now
      else:
        self.save()
    finally:
      for s, h in handlers.items():
        signal.signal(s, h)
      writer.close()
    return status


def _slice(x: tf.Tensor) -> np.ndarray:
  """Centre z slice of the first batch element of a unit-space [b, z, y, x, 1], in [0, 1]."""
  x = x.numpy()
  return np.clip((x[0, x.shape[1] // 2, :, :, 0] + 1.0) / 2.0, 0.0, 1.0)


def _write_summaries(sums: dict[str, list[float]], rate: float, images: dict[str, tf.Tensor]) -> None:
  for k, values in sums.items():
    if values:
      _scalar(f"losses/{k}", float(np.mean(values)))
  _scalar("steps_per_second", rate)
  _image("cycles/labeled", np.concatenate(
      [_slice(images[k]) for k in ("real_l", "fake_u", "cycled_l")], axis=1))
  _image("cycles/unlabeled", np.concatenate(
      [_slice(images[k]) for k in ("real_u", "fake_l", "cycled_u")], axis=1))
  if "seg_fake" in images:
    seg = images["seg_fake"].numpy()
    prob = seg[0, seg.shape[1] // 2, :, :, 0] + 0.5
    _image("segmentation/unlabeled", np.concatenate([_slice(images["fake_l"]), prob], axis=1))


def train(cfg: SecganConfig, ffn_model: tf.Module | None = None) -> int:
  """Resumes or starts ``cfg``'s run and trains it; the loop's exit status."""
  sources = crop_sources(cfg)  # checks the volumes before a network is built or a file written
  trainer = SecganTrainer(cfg, ffn_model)
  trainer.restore_or_init()
  trainer.attach_data(sources)
  trainer.write_flags()
  try:
    return trainer.run()
  finally:
    trainer.labeled.close()
    trainer.unlabeled.close()
