"""Which checkpoints a sweep evaluates: a training directory's ``model.ckpt-<step>`` files (ours or
google's TF1 ones), thinned and cut by step, or an explicit list; and each one's model settings.

A checkpoint counts once it is complete: its ``.index`` and every ``.data-<i>-of-<n>`` shard
exist (TensorFlow writes the index last), so a sweep polling a directory that training is
writing into never picks up a half-written one. Each checkpoint's ``model_name`` and
``model_args`` come from the ``train_flags.json`` beside it when there is one (``ffn train``
writes it), else from the sweep's inference request (google's checkpoints ship without one).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Sequence

from ffn.errors import FFNError

_CKPT_RE = re.compile(r"^(?P<name>.*?)-(?P<step>\d+)$")
_DATA_RE = re.compile(r"\.data-(\d+)-of-(\d+)$")
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One checkpoint of a sweep.

  ``path``: absolute prefix (``.../model.ckpt-1234``); ``step``: the training step in its name
  (None when the name has none); ``key``: unique, file-name-safe name of this checkpoint in the
  sweep (output folders, item ids); ``model_name``/``model_args``: from ``train_flags.json``
  beside it, None where the request's apply (``model_args`` as google's JSON text);
  ``problem``: why it cannot be evaluated, found before loading (an unreadable
  ``train_flags.json``), reported as its failed rows.
  """
  path: str
  step: int | None
  key: str
  model_name: str | None = None
  model_args: str | None = None
  problem: str | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "Checkpoint":
    return cls(**data)


def step_of(prefix: str) -> int | None:
  """The step in a checkpoint prefix ``<name>-<step>`` (``model.ckpt-27465036`` -> 27465036)."""
  match = _CKPT_RE.match(os.path.basename(prefix))
  return int(match.group("step")) if match else None


def is_complete(prefix: str) -> bool:
  """Whether the checkpoint's ``.index`` and all its data shards exist."""
  if not os.path.isfile(prefix + ".index"):
    return False
  shards = [m for p in glob.glob(glob.escape(prefix) + ".data-*") if (m := _DATA_RE.search(p))]
  if not shards:
    return False
  total = int(shards[0].group(2))
  return {int(m.group(1)) for m in shards} >= set(range(total))


def make(prefix: str, key: str) -> Checkpoint:
  """The checkpoint ``prefix`` with ``model_name``/``model_args`` from the ``train_flags.json``
  beside it (an unreadable one: ``problem``)."""
  from ffn.models import read_train_flags
  try:
    flags = read_train_flags(prefix)
  except FFNError as e:
    return Checkpoint(prefix, step_of(prefix), key, problem=str(e))
  args = flags.get("model_args")
  if isinstance(args, dict):
    args = json.dumps(args, sort_keys=True)
  return Checkpoint(prefix, step_of(prefix), key, flags.get("model_name"), args)


def _safe(text: str) -> str:
  return _SAFE_RE.sub("_", text).strip("_") or "checkpoint"


def discover(train_dir: str, every_steps: int | None = None, last: int | None = None,
             min_step: int | None = None, max_step: int | None = None) -> list[Checkpoint]:
  """The complete ``*-<step>`` checkpoints in ``train_dir``, by increasing step.

  Filters, in this order: ``min_step <= step <= max_step``; ``every_steps`` N keeps the lowest
  step, then each next checkpoint at least N steps after the last one kept (so the choice of old
  checkpoints never changes when new ones appear); ``last`` K keeps the K highest of those.
  Keys are ``ckpt-<step>``.
  """
  if not os.path.isdir(train_dir):
    raise FFNError(f"--train_dir {train_dir}: no such directory")
  for name, value in (("every_steps", every_steps), ("last", last)):
    if value is not None and value < 1:
      raise FFNError(f"--{name} must be >= 1, got {value}")
  found: dict[int, str] = {}
  for index in glob.glob(os.path.join(glob.escape(os.path.abspath(train_dir)), "*.index")):
    prefix = index[:-len(".index")]
    step = step_of(prefix)
    if step is None or not is_complete(prefix):
      continue
    if step in found:
      raise FFNError(f"--train_dir {train_dir}: two checkpoints of step {step} "
                     f"({os.path.basename(found[step])}, {os.path.basename(prefix)})")
    found[step] = prefix
  steps = sorted(s for s in found if (min_step is None or s >= min_step)
                 and (max_step is None or s <= max_step))
  if every_steps is not None:
    kept: list[int] = []
    for s in steps:
      if not kept or s - kept[-1] >= every_steps:
        kept.append(s)
    steps = kept
  if last is not None:
    steps = steps[-last:]
  return [make(found[s], f"ckpt-{s}") for s in steps]


def from_list(paths: Sequence[str]) -> list[Checkpoint]:
  """Checkpoints named one by one (prefixes; they need not exist: a missing one becomes a failed
  row of the sweep). Keys: the prefix's base name, with as many parent folders in front as make
  every key unique (``fib25_model.ckpt-27465036``)."""
  prefixes = [os.path.abspath(p) for p in paths]
  if len(set(prefixes)) != len(prefixes):
    raise FFNError(f"--checkpoints: a checkpoint is listed twice: {list(paths)}")
  depth = 1
  while True:
    keys = [_safe("_".join(p.split(os.sep)[-depth:])) for p in prefixes]
    if len(set(keys)) == len(keys) or depth > max(len(p.split(os.sep)) for p in prefixes):
      break
    depth += 1
  return [make(prefix, key) for prefix, key in zip(prefixes, keys)]
