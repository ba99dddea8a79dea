"""Training on a 64^3 piece of the shipped FIB-25 crop with a tiny FFN: learning, checkpoints, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from ffn.training import examples
from ffn.training.data import ExampleSource
from ffn.training.trainer import EXIT_PREEMPTED, Trainer, TrainConfig

TINY_ARGS = {"depth": 2, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}


@pytest.fixture(scope="module")
def crop_data(sample_fib25, tmp_path_factory):
  """64^3 voxels of the shipped crop (raw + body labels; x,y,z 50..113 of training_sample2) and 200
  google-format coordinates."""
  root = tmp_path_factory.mktemp("fib25crop")
  with h5py.File(sample_fib25 / "training_sample2_crop.h5", "r") as f:
    raw, stack = f["raw"][:64, :64, :64], f["stack"][:64, :64, :64]
  with h5py.File(root / "crop.h5", "w") as f:
    f["raw"], f["stack"] = raw, stack
  centers = np.random.default_rng(0).integers(8, 56, size=(200, 3))
  with tf.io.TFRecordWriter(str(root / "coords.tfr"), options="GZIP") as w:
    for c in centers:
      feature = {"center": tf.train.Feature(int64_list=tf.train.Int64List(value=c)),
                 "label_volume_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"s2"]))}
      w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  return root


def _flags(root, train_dir, max_steps: int) -> list[str]:
  return ["--train_coords", str(root / "coords.tfr"),
          "--data_volumes", f"s2:{root / 'crop.h5'}:raw", "--label_volumes", f"s2:{root / 'crop.h5'}:stack",
          "--model_name", "convstack_3d", "--model_args", '{"depth": 2, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}',
          "--image_mean", "128", "--image_stddev", "33", "--train_dir", str(train_dir),
          "--batch_size", "4", "--max_steps", str(max_steps), "--optimizer", "adam",
          "--log_every", "10", "--checkpoint_interval_s", "1000"]


def _config(root, train_dir, max_steps: int) -> TrainConfig:
  return TrainConfig(train_coords=str(root / "coords.tfr"), data_volumes=f"s2:{root / 'crop.h5'}:raw",
                     label_volumes=f"s2:{root / 'crop.h5'}:stack", model_name="convstack_3d",
                     model_args=TINY_ARGS, train_dir=str(train_dir), image_mean=128, image_stddev=33,
                     batch_size=4, max_steps=max_steps, optimizer="adam", log_every=50)


def _source(root, trainer: Trainer) -> ExampleSource:
  cfg = trainer.cfg
  return ExampleSource(cfg.train_coords, cfg.data_volumes, cfg.label_volumes, trainer.model.fov_size,
                       trainer.model.deltas, cfg.image_mean, cfg.image_stddev, seed=cfg.seed)


def test_example_semantics():
  labels = np.zeros((5, 5, 5), np.int64)
  labels[2:, :, :] = 7
  labels[4, 4, 4] = 0
  mask = examples.object_mask(labels)
  assert mask[2, 2, 2] and not mask[0, 0, 0] and not mask[4, 4, 4]
  soft = examples.soften_labels(mask)
  assert set(np.unique(soft)) == {np.float32(0.05), np.float32(0.95)}
  seed = examples.initial_seed((9, 9, 9))
  assert seed[4, 4, 4] == pytest.approx(np.log(0.95 / 0.05)) and seed[0, 0, 0] < 0
  shifts = examples.fov_shifts((2, 3, 4))
  assert len(shifts) == 26 and (2, 0, -4) in shifts
  # Only the centre is visited until the seed says the object reaches a shifted position.
  policy = examples.fixed_policy(seed, [(2, 0, 0), (0, 0, 2)], 0.9)
  assert next(policy) == (0, 0, 0)
  seed[6, 4, 4] = 5.0  # z+2 (x,y,z offset (0,0,2)) becomes object
  assert list(policy) == [(0, 0, 2)]
  # Offsets are x,y,z: (1, 0, 0) moves along the last array axis.
  a = np.arange(5 * 5 * 5).reshape(5, 5, 5)
  assert examples.crop(a, (1, 0, 0), (1, 1, 1))[0, 0, 0] == a[2, 2, 3]
  # Augmentation applies the same transform to image and labels and keeps the object centred.
  rng = np.random.default_rng(3)
  img, lab = examples.augment(rng, [a, a.copy()])
  np.testing.assert_array_equal(img, lab)
  assert img[2, 2, 2] == a[2, 2, 2] and sorted(img.ravel()) == sorted(a.ravel())


def test_training_lowers_loss(crop_data, tmp_path):
  trainer = Trainer(_config(crop_data, tmp_path / "run", max_steps=150))
  source = _source(crop_data, trainer)
  # A fixed evaluation batch: examples the run never takes, FOV at the centre, initial seed.
  xs, ys = [], []
  for i in range(10_000, 10_008):
    image, labels = source.example(i)
    seed = examples.initial_seed(labels.shape)
    xs.append(np.stack([examples.crop(image, (0, 0, 0), (9, 9, 9)),
                        examples.crop(seed, (0, 0, 0), (9, 9, 9))], -1))
    ys.append(examples.crop(labels, (0, 0, 0), (9, 9, 9))[..., None])
  x, y = np.stack(xs), np.stack(ys)
  before = trainer.loss_on(x, y)
  trainer.attach_data(source)
  assert trainer.run() == 0
  after = trainer.loss_on(x, y)
  assert int(trainer.step.numpy()) == 150
  assert after < 0.75 * before, (before, after)
  assert os.path.exists(tmp_path / "run" / "model.ckpt-150.index")
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run").iterdir())


def test_sigterm_saves_and_resume_continues(crop_data, tmp_path):
  train_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py")] + _flags(crop_data, train_dir, 100_000),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=REPO_ROOT)
  deadline = time.monotonic() + 120
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "step 10/" in line:
      proc.send_signal(signal.SIGUSR1)  # save and continue
    if "step 30/" in line:
      proc.send_signal(signal.SIGTERM)
      break
    assert time.monotonic() < deadline, "".join(lines)
  rest, _ = proc.communicate(timeout=120)
  assert proc.returncode == EXIT_PREEMPTED, "".join(lines) + rest
  flags = (train_dir / "train_flags.json").read_text()
  assert "convstack_3d.ConvStack3DFFNModel" in flags
  ckpt = tf.train.latest_checkpoint(str(train_dir))
  saved_step = int(ckpt.rsplit("-", 1)[1])
  assert saved_step >= 30
  state = tf.train.get_checkpoint_state(str(train_dir))
  usr1_steps = [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths][:-1]
  assert len(usr1_steps) == 1 and 10 <= usr1_steps[0] < saved_step
  reader = tf.train.load_checkpoint(ckpt)

  trainer = Trainer(_config(crop_data, train_dir, max_steps=saved_step + 5))
  assert trainer.restore_or_init()
  assert int(trainer.step.numpy()) == saved_step
  assert int(trainer.optimizer.iterations.numpy()) == saved_step
  taken = int(trainer.examples_taken.numpy())
  assert taken == reader.get_tensor("examples_taken/.ATTRIBUTES/VARIABLE_VALUE") and taken >= 4
  # Optimizer slots after restore equal the saved ones, and they are not trivial.
  keys = [k for k in reader.get_variable_to_shape_map() if k.startswith("optimizer/slots/")]
  assert len(keys) == 2 * len(trainer.variables)
  # (the object-graph path escapes '.' in dict keys as '..')
  slots = {f"optimizer/slots/{kind}/{name.replace('.', '..')}/.ATTRIBUTES/VARIABLE_VALUE": v
           for kind, d in trainer.optimizer.slots.items() for name, v in d.items()}
  assert set(slots) == set(keys)
  for key, var in slots.items():
    np.testing.assert_array_equal(var.numpy(), reader.get_tensor(key))
  assert np.abs(slots[keys[0]].numpy()).max() > 0
  # The model loads for inference from the training directory alone (flags file beside it).
  import ffn.models
  loaded = ffn.models.load(str(train_dir))
  np.testing.assert_array_equal(loaded.model.convs["conv0_a"].weights.numpy(),
                                trainer.model.convs["conv0_a"].weights.numpy())
  # The data stream continues at the saved position: the next example is example #taken.
  source = _source(crop_data, trainer)
  trainer.attach_data(source)
  image, labels = next(trainer._stream)
  want_image, want_labels = source.example(taken)
  np.testing.assert_array_equal(image.numpy(), want_image)
  np.testing.assert_array_equal(labels.numpy(), want_labels)
  trainer.attach_data(source)
  assert trainer.run() == 0
  assert int(trainer.step.numpy()) == saved_step + 5
  assert int(trainer.examples_taken.numpy()) > taken


def test_bfloat16_step_and_clipping(tmp_path):
  cfg = TrainConfig(train_coords="", data_volumes="", label_volumes="", model_name="convstack_3d",
                    model_args=TINY_ARGS, train_dir=str(tmp_path), image_mean=128, image_stddev=33,
                    batch_size=2, optimizer="sgd", learning_rate=1.0, max_gradient_entry_mag=0.01,
                    compute_dtype="bfloat16")
  trainer = Trainer(cfg)
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=(2, 9, 9, 9, 2)).astype(np.float32))
  y = tf.constant(rng.uniform(0.05, 0.95, size=(2, 9, 9, 9, 1)).astype(np.float32))
  before = [v.numpy() for v in trainer.variables]
  logits, loss = trainer.train_step(x, y)
  assert logits.dtype == tf.float32 and np.isfinite(float(loss))
  # SGD with lr 1: each element moves by exactly its clipped gradient, so at most 0.01.
  steps = [np.abs(v.numpy() - b).max() for v, b in zip(trainer.variables, before)]
  assert max(steps) == pytest.approx(0.01, rel=1e-5) and min(steps) > 0


def test_bad_inputs_are_user_errors(crop_data, tmp_path):
  from ffn.errors import FFNError
  h5 = crop_data / "crop.h5"
  with pytest.raises(FFNError, match=r"coords\.tfr: volumes \['s2'\] are not in both"):
    ExampleSource(str(crop_data / "coords.tfr"), f"other:{h5}:raw", f"other:{h5}:stack",
                  (9, 9, 9), (2, 2, 2), 128, 33)
  with pytest.raises(FFNError, match="no dataset 'labels'"):
    ExampleSource(str(crop_data / "coords.tfr"), f"s2:{h5}:raw", f"s2:{h5}:labels",
                  (9, 9, 9), (2, 2, 2), 128, 33)
  with pytest.raises(FFNError, match="no coordinate is at least"):
    ExampleSource(str(crop_data / "coords.tfr"), f"s2:{h5}:raw", f"s2:{h5}:stack",
                  (65, 65, 65), (2, 2, 2), 128, 33)
  proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py")]
                        + _flags(crop_data, tmp_path / "run", 10)[:-2] + ["--image_stddev", "0"],
                        capture_output=True, text=True, cwd=REPO_ROOT)
  assert proc.returncode == 2 and "--image_stddev must be positive" in proc.stderr
