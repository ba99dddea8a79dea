"""``--async_input worker`` (ffn/training/worker_input.py) in one process, against the eager path.

The oracle is the eager code that ``ffn train`` runs: ``ExampleSource.example`` for the patches,
``fixed_policy`` + ``crop`` + ``Trainer.train_step`` for the FOV moves and seed write-back. With
batch size 1 the in-graph loop must take the same steps (google's semantics). The equivalence
tests train with SGD, whose updates are linear in the gradients, so that their tolerance follows
from float32 summation (Adam's first steps are +/- lr whatever the gradient's size: a rounding-level
gradient near 0 could flip one).
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from ffn.errors import FFNError
from ffn.training import worker_input as wi
from ffn.training.examples import crop, fixed_policy, initial_seed, max_pred_policy
from ffn.training.trainer import TrainConfig, Trainer

SAMPLE_CROP = REPO_ROOT / "sample_data" / "fib25" / "training_sample2_crop.h5"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
  """A 48^3 corner of the shipped crop twice: contiguous uncompressed (read in place by the
  workers) and gzip-chunked (copied raw), and 50 coordinates."""
  from ffn.data.coordinates import write_coordinates
  root = tmp_path_factory.mktemp("wi")
  with h5py.File(SAMPLE_CROP, "r") as f:
    raw, stack = f["raw"][:48, :48, :48], f["stack"][:48, :48, :48]
  with h5py.File(root / "plain.h5", "w") as f:
    f["raw"], f["stack"] = raw, stack
  with h5py.File(root / "gzip.h5", "w") as f:
    f.create_dataset("raw", data=raw, chunks=(16, 16, 16), compression="gzip")
    f.create_dataset("stack", data=stack, chunks=(16, 16, 16), compression="gzip")
  centers = np.random.default_rng(0).integers(8, 40, size=(50, 3))
  write_coordinates(str(root / "coords.tfr"), np.zeros(len(centers), np.int64), centers, ["s2"])
  return root


def _config(root, train_dir, h5="plain.h5", **extra) -> TrainConfig:
  args = dict(train_coords=str(root / "coords.tfr"), data_volumes=f"s2:{root / h5}:raw",
              label_volumes=f"s2:{root / h5}:stack", model_name="convstack_3d",
              model_args={"depth": 1, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]},
              train_dir=str(train_dir), image_mean=128.0, image_stddev=33.0, batch_size=1,
              optimizer="sgd", learning_rate=0.01, threshold=0.091, seed=3)
  args.update(extra)
  return TrainConfig(**args)


def _plan_tensors(plan):
  return [tf.constant(v) for v in plan.values()]


def _assert_same_updates(initial, eager, graph):
  """The weight updates of the two paths agree. With SGD an update is learning rate x the sum of
  the steps' gradients, linear in them; both paths sum the same float32 terms (graph and eager
  kernels may order them differently: relative error ~1e-6 per sum, far below 1e-3), while one
  step missing, extra or on other data changes an update by a whole step's gradient."""
  for w0, a, b in zip(initial, eager.variables, graph.variables):
    da, db = a.numpy() - w0, b.numpy() - w0
    assert np.abs(da).max() > 0, "the eager steps changed nothing"
    np.testing.assert_allclose(db, da, rtol=1e-3, atol=1e-3 * np.abs(da).max())


def test_volumes_in_place_and_copied(volumes, tmp_path):
  """Contiguous HDF5 is read in place at its byte offset; gzip is copied once; same tensors."""
  flat = []
  for h5 in ("plain.h5", "gzip.h5"):
    trainer = Trainer(_config(volumes, tmp_path / h5, h5))
    vols = wi.WorkerVolumes(trainer.make_source(), str(tmp_path / "cache"))
    images, labels = next(iter(vols.dataset()))
    flat.append([images[0].numpy(), labels[0].numpy()])
    if h5 == "plain.h5":
      assert vols.images[0].path == str(volumes / "plain.h5") and vols.images[0].offset > 0
    else:
      assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["image", "labels"]
  with h5py.File(volumes / "plain.h5", "r") as f:
    np.testing.assert_array_equal(flat[0][0], f["raw"][:].astype(np.float32))
    np.testing.assert_array_equal(flat[0][1], f["stack"][:])
  for a, b in zip(*flat):
    np.testing.assert_array_equal(a, b)


def test_examples_equal_the_eager_stream(volumes, tmp_path):
  """Patches, soft labels, permutation and reflection of stream positions 0..11: bit for bit."""
  cfg = _config(volumes, tmp_path, batch_size=4, permutable_axes=(0, 1, 2))
  trainer = Trainer(cfg)
  source = trainer.make_source()
  vols = wi.WorkerVolumes(source, str(tmp_path / "cache"))
  fov = wi.InGraphFov(trainer, tuple(int(v) for v in source.size_xyz[::-1]))
  planner = wi.Planner(source, vols, 4, trainer.model.deltas, True)
  volumes_3d = next(iter(vols.dataset()))
  for first in (0, 4, 8):
    plan = planner.plan(first)
    images, labels = fov.examples(*volumes_3d, *_plan_tensors(plan)[:5])
    for i in range(4):
      want_image, want_labels = source.example(first + i)
      np.testing.assert_array_equal(images[i].numpy(), want_image)
      np.testing.assert_array_equal(labels[i].numpy(), want_labels)


@pytest.mark.parametrize("policy", ["fixed", "max_pred_moves"])
def test_fov_loop_matches_eager_steps(volumes, tmp_path, policy):
  """Batch 1: the in-graph loop visits the same FOVs as the eager policy (fixed_policy /
  max_pred_policy over the eager seed canvas), takes one optimizer step each, and ends with the
  same weights as the eager steps; for "fixed", one call trains the 3 examples in turn
  (--batches_per_call 3)."""
  cfg = _config(volumes, tmp_path / "a", fov_policy=policy)
  eager = Trainer(cfg)
  source = eager.make_source()
  graph = Trainer(dataclasses.replace(cfg, train_dir=str(tmp_path / "b")))
  initial = [v.numpy() for v in eager.variables]
  vols = wi.WorkerVolumes(source, str(tmp_path / "cache"))
  planner = wi.Planner(source, vols, 1, eager.model.deltas, True)
  count = 3 if policy == "fixed" else 1
  fov = wi.InGraphFov(graph, tuple(int(v) for v in source.size_xyz[::-1]), batches=count)
  iterator = iter(vols.dataset())
  fov_zyx = eager.fov_zyx
  visited, losses = [], []
  for index in range(count):
    image, labels = source.example(index)
    seed = initial_seed(labels.shape, pad=cfg.seed_pad)
    if policy == "fixed":
      shifts = [tuple(int(v) for v in m[::-1]) for m in planner.moves_zyx(index)[1:]]
      offsets = fixed_policy(seed, shifts, cfg.threshold)
    else:
      offsets = max_pred_policy(seed, eager.model.fov_size, eager.model.deltas, cfg.threshold)
    visited.append(0)
    for off in offsets:
      view = crop(seed, off, fov_zyx)
      x = np.stack([crop(image, off, fov_zyx), view], axis=-1)[None]
      logits, loss = eager.train_step(tf.constant(x), tf.constant(crop(labels, off, fov_zyx)[None, ..., None]))
      view[...] = logits.numpy()[0, ..., 0]
      losses.append(float(loss))
      visited[-1] += 1
  n, loss, visits = fov.train_examples(iterator, *_plan_tensors(planner.plan(0, count)),
                                       tf.constant(count * fov.max_visits, tf.int64))
  assert int(n) == len(losses) and visits.numpy().tolist() == visited
  np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
  # threshold 0.091 (logit -2.30) lies amid the untrained prediction at the shifts (-2.48..-1.98,
  # about 0.01 apart): the policy moves and stops, decided far beyond float32 rounding.
  assert max(visited) > 1 and min(visited) < fov.max_visits, visited
  assert int(graph.step.numpy()) == int(eager.step.numpy())
  _assert_same_updates(initial, eager, graph)
  # A call stops at its step budget (the coordinator's way to end at exactly max_steps).
  step = int(graph.step.numpy())
  n, _, visits = fov.train_examples(iterator, *_plan_tensors(planner.plan(0, count)),
                                    tf.constant(2, tf.int64))
  assert int(n) == 2 and visits.numpy().tolist() == [2] + [0] * (count - 1)
  assert int(graph.step.numpy()) == step + 2


def test_slots_refill_as_eager_batches(volumes, tmp_path):
  """Batch 2, one call of 6 examples: a slot whose policy ends takes the call's next example at
  once, as Trainer.next_batch does; the same steps and weights until the eager batch needs a
  7th example (where the call would let the slot idle)."""
  cfg = _config(volumes, tmp_path / "a", batch_size=2, shuffle_moves=False)
  eager = Trainer(cfg)
  source = eager.make_source()
  eager.attach_data(source)
  steps = 0
  while True:
    x, labels, views = eager.next_batch()
    if int(eager.examples_taken.numpy()) > 6:
      break
    logits, _ = eager._run_step(x, labels)
    for i, view in enumerate(views):
      view[...] = logits[i, ..., 0]
    steps += 1
  graph = Trainer(dataclasses.replace(cfg, train_dir=str(tmp_path / "b")))
  initial = [v.numpy() for v in graph.variables]  # the same seed: eager's starting weights
  vols = wi.WorkerVolumes(source, str(tmp_path / "cache"))
  planner = wi.Planner(source, vols, 2, eager.model.deltas, False)
  fov = wi.InGraphFov(graph, tuple(int(v) for v in source.size_xyz[::-1]), batches=3)
  n, _, visits = fov.train_examples(iter(vols.dataset()), *_plan_tensors(planner.plan(0, 6)),
                                    tf.constant(steps, tf.int64))
  assert int(n) == steps > 6 and int(np.sum(visits)) >= steps
  _assert_same_updates(initial, eager, graph)


def test_unsupported_settings_are_refused(volumes, tmp_path):
  with pytest.raises(FFNError, match="--rotation_max_deg, --gamma need --async_input coordinator"):
    wi.check_config(_config(volumes, tmp_path, rotation_max_deg=10.0, gamma=0.1))
