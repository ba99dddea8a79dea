"""``ffn secgan slurm_train`` / ``slurm_secgan.py``: SECGAN training as one Slurm job.

Takes every ``ffn secgan train`` flag plus the shared cluster flags of :mod:`slurm.executor`
(``--cluster``, ``--slurm_*``; a request no node can run is warned about, or refused with
``--slurm_strict`` or ``--wait``). The job is one task running :class:`SecganJob`. Preemption and
time limits work as in ``ffn slurm_train``: submitit asks Slurm for USR2 90 s before the limit,
:meth:`SecganJob.checkpoint` saves a checkpoint and resubmits the same callable, and the requeued
job resumes from the latest checkpoint in ``--train_dir`` (same step, optimizer state and pools).
SIGTERM saves and ends the job (status 3).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import submitit

from ffn import quiet_tf
from ffn.errors import FFNError

_log = logging.getLogger("secgan.slurm")


class SecganJob(submitit.helpers.Checkpointable):
  """What the job runs: ``secgan.train`` of ``config`` (a SecganConfig as a dict)."""

  def __init__(self, config: dict[str, Any]):
    self.config = dict(config)
    self._trainer = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_trainer"] = None  # the live trainer stays in this process
    return state

  def __call__(self) -> int:
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_tf.install()
    from secgan.model import SecganConfig
    from secgan.train import SecganTrainer, crop_sources
    cfg = SecganConfig(**self.config)
    sources = crop_sources(cfg)
    trainer = self._trainer = SecganTrainer(cfg)
    trainer.restore_or_init()
    trainer.attach_data(sources)
    trainer.write_flags()
    try:
      return trainer.run()
    finally:
      for source in sources:
        source.close()

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """submitit's preemption/time-limit hook: saves, then resubmits ``self``."""
    if self._trainer is not None:
      self._trainer.save()
    return super().checkpoint(*args, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from secgan.cli import add_train_arguments
  from slurm.executor import add_slurm_arguments
  add_train_arguments(parser)
  add_slurm_arguments(parser)
  parser.add_argument("--wait", action="store_true",
                      help="wait for the job and exit with its status (implies --slurm_strict)")


def run(args: argparse.Namespace) -> int:
  from secgan.cli import config_from_args
  from slurm.executor import JobFailedError, SlurmOptions, make_executor
  options = SlurmOptions.from_args(args)
  if options.nodes != 1 or options.tasks_per_node != 1:
    raise FFNError("--slurm_nodes and --slurm_tasks_per_node must be 1: SECGAN trains in one task")
  options.strict = options.strict or args.wait
  cfg = config_from_args(args)
  os.makedirs(cfg.train_dir, exist_ok=True)
  executor = make_executor(options, cfg.train_dir)
  if executor.cluster == "slurm":
    executor.update_parameters(slurm_signal_delay_s=90)
  try:
    job = executor.submit(SecganJob(cfg.to_json()))
  except submitit.core.utils.FailedJobError as e:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    raise FFNError(f"the cluster refused the job: {lines[-1] if lines else e}") from e
  print(f"submitted {executor.cluster} job {job.job_id}: SECGAN training")
  print(f"  log:             {job.paths.stderr} (stdout: {job.paths.stdout})")
  print(f"  checkpoints:     {cfg.train_dir}")
  print(f"  follow progress: tail -f {job.paths.stderr}")
  print(f"                   tensorboard --logdir {cfg.train_dir}")
  sys.stdout.flush()
  if not args.wait:
    return 0
  while not job.done():
    time.sleep(2)
  error = job.exception()
  if error is not None:
    raise JobFailedError(job, str(error).strip().splitlines()[-1] if str(error).strip() else "failed")
  return int(job.result() or 0)
