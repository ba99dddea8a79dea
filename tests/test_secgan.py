"""SECGAN (secgan/): shapes and margins, loss terms, pools, one step, resume, tiled transfer, CLI.

Everything runs on tiny networks (generators of 1-2 modules with 4 channels, conv discriminators with
2-4 channels, a 1-layer FFN with 4 features) and tiny random uint8 volumes, so that the whole
file stays within a few seconds of TensorFlow tracing on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tensorflow as tf

import ffn.models
from ffn.cli import main as ffn_main
from ffn.io.volumes import Volume
from secgan import losses
from secgan.model import SecganConfig
from secgan.networks import ConvDiscriminator, Generator, ResNetDiscriminator
from secgan.normalization import SCALE, from_unit, to_unit, unit_to_ffn
from secgan.pool import FakePool
from secgan.train import FLAGS_FILE, SecganTrainer, read_config
from secgan.transfer import TiledTransfer, load_generator, read_reflected, reflect_index

FLOAT32_EPS = float(np.finfo(np.float32).eps)
TINY_FFN_ARGS = {"depth": 1, "features": 4, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}


def tiny_config(tmp: Path, **kw) -> SecganConfig:
  values = dict(labeled_volumes=[f"{tmp / 'l.h5'}:raw"], unlabeled_volumes=[f"{tmp / 'u.h5'}:raw"],
                train_dir=str(tmp / "train"), fov_size=(5, 5, 5), generator_depth=1,
                generator_channels=4, discriminator="conv", discriminator_channels=2,
                discriminator_depth=2, batch_size=2, pool_size=2, learning_rate=1e-3,
                summary_rate_secs=0.0, log_every=1, permutable_axes=(0, 1, 2))
  values.update(kw)
  return SecganConfig(**values)


def tiny_ffn(tmp: Path) -> str:
  """A 1-layer FFN saved as this toolkit's TF2 checkpoint (+ train_flags.json): its directory."""
  folder = tmp / "ffn"
  folder.mkdir(exist_ok=True)
  model = ffn.models.build_model("convstack_3d", TINY_FFN_ARGS, seed=3)
  tf.train.Checkpoint(model=model).write(str(folder / "model.ckpt-1"))
  (folder / ffn.models.FLAGS_FILE).write_text(json.dumps(
      {"model_name": "convstack_3d.ConvStack3DFFNModel", "model_args": TINY_FFN_ARGS}))
  return str(folder)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
  """Two uint8 volumes: 'labeled' (smooth blobs) and 'unlabeled' (their darker, noisier copy)."""
  tmp = tmp_path_factory.mktemp("secgan")
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, size=(30, 28, 26)).astype(np.float64)
  for axis in range(3):
    base = (base + np.roll(base, 1, axis) + np.roll(base, -1, axis)) / 3
  labeled = np.clip((base - base.mean()) * 6 + 128, 0, 255).astype(np.uint8)
  unlabeled = np.clip(labeled * 0.5 + 40 + rng.normal(0, 3, labeled.shape), 0, 255).astype(np.uint8)
  for name, data in (("l", labeled), ("u", unlabeled)):
    with h5py.File(tmp / f"{name}.h5", "w") as f:
      f.create_dataset("raw", data=data)
  tiny_ffn(tmp)
  return tmp


@pytest.fixture(scope="module")
def ffn_model(volumes):
  return ffn.models.load(str(volumes / "ffn")).model


# ----------------------------------------------------------------------------- networks

def test_generator_output_shape_and_margin():
  gen = Generator("G", depth=2, channels=4, seed=1)
  assert gen.margin == 4
  x = np.random.default_rng(1).uniform(-1, 1, (1, 13, 12, 11, 1)).astype(np.float32)
  y = gen(tf.constant(x)).numpy()
  assert y.shape == (1, 5, 4, 3, 1)
  assert np.all(np.abs(y) < 1)  # tanh
  # Output voxel (z,y,x) sees exactly input [z, z + 2m] (VALID convolutions): changing the input's
  # first corner voxel changes output voxel (0,0,0) and no other one.
  x2 = x.copy()
  x2[0, 0, 0, 0, 0] += 1.0
  changed = np.argwhere(gen(tf.constant(x2)).numpy() != y)
  assert changed.tolist() == [[0, 0, 0, 0, 0]]


def test_generator_in_bfloat16_is_close_to_float32():
  gen = Generator("G", depth=2, channels=4, seed=2)
  x = tf.constant(np.random.default_rng(2).uniform(-1, 1, (1, 11, 11, 11, 1)).astype(np.float32))
  full, half = gen(x).numpy(), gen(x, tf.bfloat16).numpy()
  assert half.dtype == np.float32
  # bfloat16 keeps 8 significant bits: inputs and weights rounded by 2^-9 relative at each of
  # 5 layers; the tanh output (|y| < 1) may move by a few percent, not more.
  assert 0 < np.max(np.abs(full - half)) < 0.05


def test_discriminator_shapes():
  x = tf.zeros((2, 9, 9, 9, 1))
  assert ResNetDiscriminator("D", 1, channels=2, stages=2)(x).shape == (2, 3, 3, 3, 1)
  assert ConvDiscriminator("D", 1, channels=2, depth=2)(x).shape == (2, 3, 3, 3, 1)
  assert ConvDiscriminator("D", 1, channels=2, depth=3)(x).shape == (2, 2, 2, 2, 1)


# ------------------------------------------------------------------------------- losses

def test_loss_terms_against_hand_computed_values():
  real, fake = tf.constant([1.0, 0.5]), tf.constant([0.0, -0.5])
  # 0.5 * (((1-1)^2 + (0.5-1)^2) / 2 + (0^2 + 0.5^2) / 2) = 0.5 * (0.125 + 0.125)
  assert float(losses.lsgan_discriminator(real, fake)) == pytest.approx(0.125, abs=1e-7)
  # ((0.5-1)^2 + (2-1)^2) / 2
  assert float(losses.lsgan_generator(tf.constant([0.5, 2.0]))) == pytest.approx(0.625, abs=1e-7)
  x = tf.constant([[0.0, 1.0], [-1.0, 0.5]])
  assert float(losses.cycle_l1(x, x + tf.constant([[0.5, -0.5], [0.0, 1.0]]))) == pytest.approx(0.5)


def test_normalisation_round_trip_and_ffn_input():
  raw = np.arange(256, dtype=np.uint8)
  unit = to_unit(raw)
  assert unit[0] == -1.0 and unit[-1] == 1.0
  np.testing.assert_array_equal(from_unit(unit), raw)
  np.testing.assert_array_equal(from_unit(np.array([-3.0, 3.0])), [0, 255])  # clipped
  # The FFN sees (raw - mean) / stddev whether it reads raw or unit space.
  np.testing.assert_allclose(unit_to_ffn(unit, 128.0, 33.0), (raw - 128.0) / 33.0,
                             atol=4 * FLOAT32_EPS * 255 / 33)
  assert SCALE == 127.5


# -------------------------------------------------------------------------------- pools

def test_fake_pool_fills_then_swaps_deterministically():
  pool = FakePool("p", 2, (1,))
  seed = tf.constant([0, 0], tf.int64)
  first = pool.query(tf.constant([[1.0], [2.0]]), seed).numpy()
  np.testing.assert_array_equal(first, [[1.0], [2.0]])  # filling: returned as they are
  assert int(pool.count.numpy()) == 2
  seen = []
  for step in range(1, 9):
    stored = set(pool.images.numpy().ravel().tolist())
    new = float(10 + step)
    out = float(pool.query(tf.constant([[new]]), tf.constant([0, step], tf.int64)).numpy()[0, 0])
    assert out == new or out in stored
    seen.append(out)
  assert any(s < 10 for s in seen)  # an old fake came back at least once
  again = FakePool("q", 2, (1,))
  again.query(tf.constant([[1.0], [2.0]]), seed)
  replay = [float(again.query(tf.constant([[10.0 + s]]), tf.constant([0, s], tf.int64)).numpy()[0, 0])
            for s in range(1, 9)]
  assert replay == seen
  assert FakePool("z", 0, (1,)).query(tf.constant([[5.0]]), seed).numpy().tolist() == [[5.0]]


# --------------------------------------------------------------------------------- step

def test_losses_and_one_step_lowering_each_loss_on_a_fixed_batch(volumes, ffn_model):
  """The total losses are the weighted terms; each update lowers its own network's loss, the
  other networks held at their old weights."""
  cfg = tiny_config(volumes, ffn_checkpoint=str(volumes / "ffn"), learning_rate=1e-4)
  trainer = SecganTrainer(cfg, ffn_model)
  trainer.attach_data()
  real_l, real_u = trainer.batch(0)
  assert real_l.shape == real_u.shape == (2, 13, 13, 13, 1)  # 5 + 4 margins of 2
  model = trainer.model
  before = {k: float(v) for k, v in model.losses(real_l, real_u).items()}
  cycles = 2.5 * before["cycle_l"] + 0.5 * before["cycle_u"]
  assert before["G"] == pytest.approx(before["adv_G"] + cycles, rel=1e-6)
  assert before["F"] == pytest.approx(before["adv_F"] + before["seg_F"] + cycles, rel=1e-6)
  m = cfg.margin
  cycled = model.F(model.G(tf.constant(real_l))).numpy()
  target = real_l[:, 2 * m:-2 * m, 2 * m:-2 * m, 2 * m:-2 * m]
  assert before["cycle_l"] == pytest.approx(float(np.mean(np.abs(cycled - target))), rel=1e-5)
  # On the first step the pools (size 2 = batch) are filling: they return the fakes themselves,
  # so the discriminators' step losses are the losses above.
  nets = {"G": model.G, "F": model.F, "D_u": model.D_u, "D_l": model.D_l, "D_S": model.D_S}
  old = {k: [v.numpy() for v in n.trainable_variables] for k, n in nets.items()}
  ffn_before = [v.numpy() for v in ffn_model.variables]
  step_losses, _ = model.train_step(real_l, real_u)
  for v, value in zip(ffn_model.variables, ffn_before):  # the FFN is frozen
    np.testing.assert_array_equal(v.numpy(), value)
  for k in ("G", "F", "D_u", "D_l", "D_S"):
    assert float(step_losses[k]) == pytest.approx(before[k], rel=1e-5)
  new = {k: [v.numpy() for v in n.trainable_variables] for k, n in nets.items()}

  def load(which: dict) -> None:
    for k, n in nets.items():
      for v, value in zip(n.trainable_variables, which[k]):
        v.assign(value)

  for name in nets:
    load({k: new[k] if k == name else old[k] for k in nets})
    after = float(model.losses(real_l, real_u)[name])
    assert after < before[name], (name, before[name], after)


# --------------------------------------------------------------------------- checkpoints

def test_sigterm_checkpoint_then_resume_continues_exactly(volumes, ffn_model):
  """SIGTERM: checkpoint + status 3; a new trainer resumes from it and ends where the first
  one, continued without a restart, ends (every checkpointed variable equal)."""
  cfg = tiny_config(volumes, train_dir=str(volumes / "term"), max_steps=10 ** 6,
                    ffn_checkpoint=str(volumes / "ffn"))
  first = SecganTrainer(cfg, ffn_model)
  first.attach_data()

  def kill_after_two_steps() -> None:
    deadline = time.monotonic() + 300
    while first.step < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=kill_after_two_steps, daemon=True).start()
  assert first.run() == 3
  k = first.step
  assert k >= 2 and tf.train.latest_checkpoint(cfg.train_dir).endswith(f"model.ckpt-{k}")
  resumed = SecganTrainer(tiny_config(volumes, train_dir=cfg.train_dir, max_steps=k + 2,
                                      ffn_checkpoint=str(volumes / "ffn")), ffn_model)
  assert resumed.restore_or_init() and resumed.step == k
  resumed.attach_data()
  assert resumed.run() == 0 and resumed.step == k + 2
  first.cfg.max_steps = k + 2  # the first trainer goes on, never restarted
  assert first.run() == 0
  for a, b in zip(first.model.checkpoint_variables(), resumed.model.checkpoint_variables()):
    assert a.name == b.name
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert int(first.model.pool_l.count.numpy()) == 2  # the pools are part of it, and full


# ----------------------------------------------------------------------------- transfer

@pytest.mark.parametrize("n, lo, hi", [(5, 3, 4), (2, 3, 3), (4, 9, 2)])
def test_reflect_index_is_numpy_reflect(n, lo, hi):
  values = np.arange(n) * 7
  want = np.pad(values, (lo, hi), mode="reflect")
  np.testing.assert_array_equal(values[reflect_index(np.arange(-lo, n + hi), n)], want)


def test_tiled_transfer_equals_untiled_and_reflection_oracle(volumes):
  gen = Generator("F", depth=2, channels=4, seed=5)
  m = gen.margin
  with Volume(f"{volumes / 'u.h5'}:raw") as vol:
    raw = vol.read_all()[:17, :15, :14]

    class Crop:  # the volume's first 17 x 15 x 14 voxels, read like a Volume
      shape = raw.shape

      def __getitem__(self, key):
        return raw[key]

    read = lambda s, n: read_reflected(Crop(), s, n)  # noqa: E731
    whole = TiledTransfer(gen, (32, 32, 32)).box(read, (0, 0, 0), raw.shape)
    tiled = TiledTransfer(gen, (6, 4, 5)).box(read, (0, 0, 0), raw.shape)
  assert whole.shape == raw.shape
  # Oracle: the generator on the whole volume padded by numpy's reflection.
  padded = np.pad(to_unit(raw), m, mode="reflect")
  oracle = gen(tf.constant(padded[None, ..., None])).numpy()[0, ..., 0]
  # Same sums in another order: float32 rounding of 27 x 4-channel sums through 4 layers.
  tol = 64 * FLOAT32_EPS * 27 * 4 * 4
  np.testing.assert_allclose(whole, oracle, atol=tol, rtol=0)
  np.testing.assert_allclose(tiled, whole, atol=tol, rtol=0)


def _save_tiny_run(volumes: Path, name: str) -> SecganConfig:
  cfg = tiny_config(volumes, train_dir=str(volumes / name), max_steps=1)
  trainer = SecganTrainer(cfg)
  trainer.write_flags()
  trainer.save()
  return cfg


def test_cli_transfer_blockwise_resume_and_manifest(volumes, capsys):
  cfg = _save_tiny_run(volumes, "xfer_run")
  assert read_config(cfg.train_dir).generator_depth == 1
  out = volumes / "xfer.h5"
  args = ["secgan", "transfer", "--checkpoint", cfg.train_dir, "--input", f"{volumes / 'u.h5'}:raw",
          "--output", f"{out}:raw", "--cluster", "debug", "--block_size", "16,16,16",
          "--tile_size", "9,9,9"]
  assert ffn_main(args) == 0
  with h5py.File(out, "r") as f:
    result = f["raw"][...]
  with Volume(f"{volumes / 'u.h5'}:raw") as vol:
    raw = vol.read_all()
    gen = load_generator(cfg.train_dir)
    unit = TiledTransfer(gen, (40, 40, 40)).box(lambda s, n: read_reflected(vol, s, n), (0, 0, 0),
                                                vol.shape)
  assert result.shape == raw.shape and result.dtype == np.uint8
  # Blocks and tiles change the order of float sums only: values may differ by one grey level,
  # and only where the float value sits at a rounding boundary.
  expected = from_unit(unit)
  diff = np.abs(result.astype(int) - expected)
  assert diff.max() <= 1
  frac = ((unit[diff > 0] + 1.0) * SCALE) % 1.0
  assert np.all(np.abs(frac - 0.5) < 1e-3)
  # Resume: one block lost -> only it is computed again, the output is the same.
  run_dir = Path(f"{out}.secgan_run")
  blocks = sorted((run_dir / "blocks").glob("*.npy"))
  assert len(blocks) == 8  # 26 x 28 x 30 in blocks of 16: 2 x 2 x 2
  mtimes = {b.name: b.stat().st_mtime_ns for b in blocks}
  blocks[3].unlink()
  out.unlink()
  assert ffn_main(args) == 1  # that block's task finished without it: failed, not resubmitted
  assert not out.exists()
  assert ffn_main(args + ["--retry_failed"]) == 0
  for b in sorted((run_dir / "blocks").glob("*.npy")):
    assert (b.stat().st_mtime_ns == mtimes[b.name]) == (b.name != blocks[3].name)
  with h5py.File(out, "r") as f:
    np.testing.assert_array_equal(f["raw"][...], result)
  # Into another dataset of the same file: the first one is kept.
  assert ffn_main(args[:7] + [f"{out}:again"] + args[8:] + ["--run_dir", str(run_dir)]) == 0
  with h5py.File(out, "r") as f:
    np.testing.assert_array_equal(f["again"][...], result)
    np.testing.assert_array_equal(f["raw"][...], result)
  # Zarr output of the same run.
  zarr = volumes / "xfer.zarr"
  assert ffn_main(args[:7] + [f"zarr://{zarr}", "--run_dir", str(run_dir)] + args[8:]) == 0
  import tensorstore as ts
  store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(zarr)}}).result()
  np.testing.assert_array_equal(store.read().result(), result)
  # Other settings for the same run directory: refused in one line, exit 2.
  capsys.readouterr()
  assert ffn_main(args[:-1] + ["5,5,5", "--retry_failed"]) == 2
  assert "tile_size" in capsys.readouterr().err


def test_cli_train_and_slurm_launcher(volumes):
  train_dir = volumes / "cli_train"
  args = ["secgan", "train", "--labeled_volume", f"{volumes / 'l.h5'}:raw",
          "--unlabeled_volume", f"{volumes / 'u.h5'}:raw", "--train_dir", str(train_dir),
          "--ffn_checkpoint", str(volumes / "ffn"), "--fov_size", "7,7,7", "--generator_depth", "1",
          "--generator_channels", "4", "--discriminator", "resnet", "--discriminator_channels", "2",
          "--discriminator_depth", "1", "--batch_size", "1", "--max_steps", "2",
          "--summary_rate_secs", "0"]
  assert ffn_main(args) == 0
  cfg = json.loads((train_dir / FLAGS_FILE).read_text())
  assert cfg["discriminator"] == "resnet" and cfg["cycle_l_lambda"] == 2.5
  assert tf.train.latest_checkpoint(str(train_dir)).endswith("model.ckpt-2")
  tags = set()
  for event_file in train_dir.glob("events.out.tfevents.*"):
    for record in tf.compat.v1.train.summary_iterator(str(event_file)):
      tags |= {v.tag for v in record.summary.value}
  assert {"losses/G", "losses/F", "losses/D_S", "losses/cycle_l", "cycles/labeled",
          "cycles/unlabeled", "segmentation/unlabeled"} <= tags
  # The Slurm launcher (debug cluster: the job runs in this process) resumes the same run, at
  # its end already: it restores step 2, saves it again and succeeds.
  index = train_dir / "model.ckpt-2.index"
  written = index.stat().st_mtime_ns
  time.sleep(0.01)
  launch = ["secgan", "slurm_train"] + args[2:] + ["--cluster", "debug", "--wait"]
  assert ffn_main(launch) == 0
  assert tf.train.latest_checkpoint(str(train_dir)).endswith("model.ckpt-2")
  assert index.stat().st_mtime_ns != written


def test_cli_rejects_bad_input(volumes, capsys):
  base = ["secgan", "train", "--unlabeled_volume", f"{volumes / 'u.h5'}:raw",
          "--train_dir", str(volumes / "bad"), "--fov_size", "33,33,33", "--generator_depth", "1",
          "--generator_channels", "2", "--discriminator", "conv", "--discriminator_channels", "2"]
  assert ffn_main(base + ["--labeled_volume", f"{volumes / 'l.h5'}:raw"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "smaller than a training crop" in err[0]
  assert not (volumes / "bad").exists()
  assert ffn_main(["secgan", "transfer", "--checkpoint", str(volumes / "nowhere"), "--input",
                   f"{volumes / 'u.h5'}:raw", "--output", f"{volumes / 'o.h5'}", "--cluster",
                   "debug"]) == 2
  assert "expected path.h5:dataset or zarr://path" in capsys.readouterr().err
