"""FOV policies of training: google's ``fixed`` and ``max_pred_moves``, and ``--fov_moves`` patch sizes."""

from __future__ import annotations

import argparse
import dataclasses
import json

import h5py
import numpy as np
import pytest

from ffn.errors import FFNError
from ffn.training import cli as train_cli
from ffn.training import examples
from ffn.training.data import ExampleSource

FOV, DELTAS = (5, 5, 5), (2, 2, 2)  # x,y,z


def _write(seed: np.ndarray, points_xyz: dict[tuple[int, int, int], float], off_xyz) -> None:
  """Plays the model: the FOV at ``off_xyz`` predicts -5 except at ``points_xyz`` (x,y,z from the
  patch centre, logits), written into ``seed`` as the trainer writes its predictions."""
  examples.crop(seed, off_xyz, FOV)[...] = -5.0
  c = np.array(seed.shape) // 2
  for (x, y, z), v in points_xyz.items():
    seed[c[0] + z, c[1] + y, c[2] + x] = v


def test_max_pred_policy_golden():
  # fov 5, deltas 2, google's fov_moves 1 (+1 for this policy): a 13^3 patch, offsets within +/- 4.
  size = examples.example_size_xyz(FOV, DELTAS, examples.patch_moves("max_pred_moves", 1))
  assert size.tolist() == [13, 13, 13]
  seed = examples.initial_seed((13, 13, 13))
  policy = examples.max_pred_policy(seed, FOV, DELTAS, threshold=0.9)
  # Predictions of each visit (x,y,z -> logit); everything else in the FOV is background.
  predictions = {
      (0, 0, 0): {(2, 1, 0): 6.0, (0, 2, 0): 5.0, (0, 0, -2): 1.0},  # 1.0 < logit(0.9): no move
      (2, 1, 0): {},
      # (2,0,0) scores highest but lies in the cell of (2,1,0): skipped; then (-2,3,0), (0,4,0).
      (0, 2, 0): {(2, 0, 0): 7.0, (-2, 3, 0): 6.5, (0, 4, 0): 6.0},
      (-2, 3, 0): {(-3, 5, 0): 9.0},  # y 5 leaves the patch: dropped
      # (0,6,0) leaves the patch; (1,2,0) is in the cell of (0,2,0).
      (0, 4, 0): {(0, 6, 0): 6.0, (1, 2, 0): 6.0},
  }
  visited = []
  for off in policy:  # lazy: each visit's prediction is written before the next offset is asked
    visited.append(off)
    _write(seed, predictions[off], off)
  assert visited == [(0, 0, 0), (2, 1, 0), (0, 2, 0), (-2, 3, 0), (0, 4, 0)]


def test_max_pred_policy_follows_an_object_to_the_patch_edge():
  # An object along +x (logit 6): the FOV walks it in steps of deltas and stops at the patch edge.
  seed = examples.initial_seed((13, 13, 13))
  tube = {(x, 0, 0): 6.0 for x in range(0, 7)}
  visited = []
  for off in examples.max_pred_policy(seed, FOV, DELTAS, threshold=0.9):
    visited.append(off)
    _write(seed, tube, off)
  assert visited == [(0, 0, 0), (2, 0, 0), (4, 0, 0)]
  # Nothing reaches the threshold: only the centre.
  seed = examples.initial_seed((13, 13, 13))
  assert list(examples.max_pred_policy(seed, FOV, DELTAS, threshold=0.9)) == [(0, 0, 0)]


def test_patch_sizes_and_fixed_default():
  assert examples.patch_moves("fixed", 1) == 1 and examples.patch_moves("fixed", 2) == 2
  assert examples.patch_moves("max_pred_moves", 2) == 3
  # fixed, fov_moves 1 (the default): one delta each way, as before.
  assert examples.example_size_xyz((9, 9, 9), (2, 3, 4)).tolist() == [13, 15, 17]
  assert examples.example_size_xyz((9, 9, 9), (2, 3, 4), 3).tolist() == [21, 27, 33]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """A 40^3 volume of 10^3 blocks (labels 1..64, raw by label + noise), 60 coordinates."""
  from ffn.data.coordinates import write_coordinates
  root = tmp_path_factory.mktemp("fovdata")
  z, y, x = np.indices((40, 40, 40))
  labels = (1 + x // 10 + 4 * (y // 10) + 16 * (z // 10)).astype(np.int64)
  rng = np.random.default_rng(0)
  raw = (rng.integers(60, 200, size=65)[labels] + rng.normal(0, 8, labels.shape)).clip(0, 255)
  with h5py.File(root / "vol.h5", "w") as f:
    f["raw"], f["stack"] = raw.astype(np.uint8), labels
  centers = rng.integers(0, 40, size=(60, 3))
  write_coordinates(str(root / "coords.tfr.gz"), np.zeros(60, np.int64), centers, ["v"])
  return root, centers


def _args(root, train_dir, *extra: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  train_cli.add_arguments(parser)
  return parser.parse_args([
      "--train_coords", str(root / "coords.tfr.gz"), "--data_volumes", f"v:{root / 'vol.h5'}:raw",
      "--label_volumes", f"v:{root / 'vol.h5'}:stack", "--model_name", "convstack_3d",
      "--model_args", '{"depth": 1, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}',
      "--image_mean", "128", "--image_stddev", "40", "--train_dir", str(train_dir),
      "--batch_size", "2", "--optimizer", "adam", "--checkpoint_interval_s", "1000", *extra])


def test_fov_moves_patch_and_border(synthetic):
  root, centers = synthetic
  h5 = root / "vol.h5"
  source = ExampleSource(str(root / "coords.tfr.gz"), f"v:{h5}:raw", f"v:{h5}:stack", (9, 9, 9),
                         (2, 2, 2), 128, 40, moves=3)
  image, labels = source.example(0)
  assert image.shape == labels.shape == (21, 21, 21)
  # Coordinates closer than 21 // 2 to the edge are skipped, as with one move.
  inside = np.all((centers >= 10) & (centers + 11 <= 40), axis=1)
  assert len(source) == inside.sum() and 0 < inside.sum() < len(centers)
  with pytest.raises(FFNError, match=r"no coordinate is at least fov/2 \+ 20 x deltas"):
    ExampleSource(str(root / "coords.tfr.gz"), f"v:{h5}:raw", f"v:{h5}:stack", (9, 9, 9),
                  (2, 2, 2), 128, 40, moves=20)


def test_flags_validated(synthetic, tmp_path):
  root, _ = synthetic
  with pytest.raises(FFNError, match="--fov_moves must be >= 1, got 0"):
    train_cli.config_from_args(_args(root, tmp_path, "--fov_moves", "0"))
  with pytest.raises(SystemExit):
    _args(root, tmp_path, "--fov_policy", "random")
  cfg = train_cli.config_from_args(_args(root, tmp_path))
  assert (cfg.fov_policy, cfg.fov_moves) == ("fixed", 1)
  # slurm_train hands every task (and a requeued job) the config as a dict: the policy stays.
  from ffn.training.distributed import DistributedTraining
  cfg = train_cli.config_from_args(_args(root, tmp_path, "--fov_policy", "max_pred_moves",
                                         "--fov_moves", "2"))
  kept = DistributedTraining(dataclasses.asdict(cfg))._config(1)
  assert (kept.fov_policy, kept.fov_moves) == ("max_pred_moves", 2)


def test_train_max_pred_moves(synthetic, tmp_path, monkeypatch):
  import ffn.training.trainer as trainer_module
  from ffn.training.trainer import Trainer
  root, _ = synthetic
  offsets = []

  def recording_policy(*a, **kw):
    for off in examples.max_pred_policy(*a, **kw):
      offsets.append(off)
      yield off
  monkeypatch.setattr(trainer_module, "max_pred_policy", recording_policy)
  # A low threshold lets the untrained model's predictions move the FOV.
  args = _args(root, tmp_path / "run", "--fov_policy", "max_pred_moves", "--fov_moves", "2",
               "--threshold", "0.2", "--max_steps", "12", "--log_every", "4")
  trainer = Trainer(train_cli.config_from_args(args))
  trainer.write_flags()
  source = trainer.make_source()
  assert source.size_xyz.tolist() == [21, 21, 21]  # 9 + 2 * 2 * (2 + 1)
  trainer.attach_data(source)
  losses = []
  for _ in range(12):
    x, labels, views = trainer.next_batch()
    logits, loss = trainer._run_step(x, labels)
    for i, view in enumerate(views):
      view[...] = logits[i, ..., 0]
    losses.append(loss)
  assert int(trainer.step.numpy()) == 12 and np.all(np.isfinite(losses))
  # 24 FOVs from fewer examples: examples yield more than one FOV.
  assert int(trainer.examples_taken.numpy()) < 12 * 2
  assert len(set(offsets)) > 1 and max(max(map(abs, off)) for off in offsets) <= 6
  flags = json.loads((tmp_path / "run" / "train_flags.json").read_text())
  assert (flags["fov_policy"], flags["fov_moves"]) == ("max_pred_moves", 2)
  # The whole loop (checkpoint at the end) through the CLI entry point.
  assert train_cli.run(_args(root, tmp_path / "cli", "--fov_policy", "max_pred_moves",
                             "--fov_moves", "2", "--threshold", "0.2", "--max_steps", "6")) == 0
