"""The FFN model against google's own published TF1 graph and weights, and its reduced precision.

The reference runs google's serialized graph (the ``.meta`` shipped with the fib25 checkpoint): the
subgraph from the ``seed``/``patches`` placeholders to the ``add`` node that yields the logits is
cut out of the MetaGraphDef (the full graph cannot be imported because it holds Google-internal
input ops such as ``SSTableReaderV2``), its ``VariableV2`` nodes are replaced by the checkpoint
values, and it is run in a ``tf.compat.v1.Session``. Only that test needs ``../shared/data`` (the
``.meta`` does not ship); everything else runs on the checkpoint and crop shipped in
``sample_data/fib25``.

Reduced precision (bfloat16, float16; with and without XLA) is checked against a float64 forward
pass of the same weights with a tolerance derived from the arithmetic, not read off one CPU:
:func:`float64_forward` also returns ``probes`` simulated runs in which every rounding the
compute dtype makes is replaced by a random relative error of the dtype's full unit roundoff
``u`` (float16 2^-11, bfloat16 2^-8, float32 2^-24) -- inputs of the half-precision convolutions
rounded, their products accumulated in the half type (the worst case: oneDNN accumulates in
float32, Eigen's CPU kernels without AVX512-FP16 (AMD EPYC) in float16, XLA in float32), outputs
rounded, float32 bias and residual additions rounded. The rounding of the weights themselves is
not random: it is applied exactly (the reference runs on the weights as the model represents
them in the compute dtype, ``weight_terms``). Modelling rounding errors as independent,
zero-mean and bounded by ``u`` times the exact value (the standard probabilistic model of
rounding error analysis, Higham & Mary 2019), the error of each logit is to first order a sum of
many such terms, about normal with variance at most the probes' mean square at that voxel; the
ratio of the error to the probes' rms then stays below Student's t quantile for ``probes``
degrees of freedom at ``1 - P_FAIL / (2 * voxels)``. For sums of products accumulated in the
half type, the partial sums' energy is the one of a random summation order,
``n * (sum t^2 / 6 + (sum t)^2 / 3)`` for ``n`` terms ``t``.

``python tests/test_models.py`` regenerates ``tests/data/fib25_logits_golden.npz`` (needs
``../shared/data``).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.stats

import ffn.models
from ffn.errors import FFNError

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "sample_data" / "fib25"
SHARED_FIB25 = REPO_ROOT.parent / "shared" / "data" / "fib25"
GOLDEN = Path(__file__).parent / "data" / "fib25_logits_golden.npz"
CKPT_NAME = "model/model.ckpt-27465036"
FIB25_ARGS = {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}
CROP_START_ZYX = (100, 100, 100)  # in training_sample2 (the golden file's coordinates)
SUBSAMPLE = 4  # golden file keeps every 4th voxel along each axis

# Unit roundoff u (half the gap between 1 and the next number) of each compute dtype, and half
# the gap between its subnormal numbers (the absolute error of rounding a tiny value): rounding
# v to nearest errs by at most u * |v| + ETA.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ETA = {"float32": 2.0**-150, "float16": 2.0**-25, "bfloat16": 2.0**-134}
# Probability, under the rounding-error model, that a correct computation fails a bound test.
P_FAIL = 1e-6


def fib25_input(start_zyx: tuple[int, int, int] = CROP_START_ZYX, size: int = 33) -> np.ndarray:
  """[1, size, size, size, 2]: training_sample2 at ``start_zyx`` (z, y, x of the full volume, read
  from the shipped crop) normalised (raw-128)/33, and an inference seed (0.95 at the centre)."""
  with h5py.File(SAMPLE / "training_sample2_crop.h5", "r") as f:
    offset_zyx = tuple(int(v) for v in f["raw"].attrs["offset_xyz"][::-1])
    z, y, x = (s - o for s, o in zip(start_zyx, offset_zyx))
    raw = f["raw"][z:z + size, y:y + size, x:x + size]
  assert raw.shape == (size,) * 3, "crop does not cover the requested patch"
  out = np.empty((1, size, size, size, 2), np.float32)
  out[..., 0] = (raw.astype(np.float32) - 128.0) / 33.0
  out[..., 1] = np.log(0.05 / 0.95)
  out[0, size // 2, size // 2, size // 2, 1] = np.log(0.95 / 0.05)
  return out


def shared_fib25_or_fail(needed: str) -> Path:
  """``../shared/data/fib25`` if it has ``needed``; else fails under CI and skips otherwise."""
  if not (SHARED_FIB25 / needed).exists():
    message = f"needs {SHARED_FIB25 / needed} (not shipped in sample_data)"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)
  return SHARED_FIB25


def google_graph_logits(fib25: Path, x: np.ndarray) -> np.ndarray:
  """Logits of google's serialized TF1 graph with the fib25 weights, for input ``x``."""
  import tensorflow as tf
  from tensorflow.core.framework import graph_pb2
  from tensorflow.core.protobuf import meta_graph_pb2

  prefix = str(fib25 / CKPT_NAME)
  meta = meta_graph_pb2.MetaGraphDef()
  meta.ParseFromString(Path(prefix + ".meta").read_bytes())
  sub = tf.compat.v1.graph_util.extract_sub_graph(meta.graph_def, ["add"])
  reader = tf.train.load_checkpoint(prefix)
  frozen = graph_pb2.GraphDef()
  for node in sub.node:
    new = frozen.node.add()
    if node.op == "VariableV2":
      new.name, new.op = node.name, "Const"
      new.attr["dtype"].type = tf.float32.as_datatype_enum
      new.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(reader.get_tensor(node.name)))
    else:
      new.CopyFrom(node)
      new.device = ""
      del new.attr["_output_shapes"]
  ops = {n.op for n in frozen.node}
  assert ops <= {"Add", "BiasAdd", "ConcatV2", "Const", "Conv3D", "Identity", "Placeholder", "Relu"}
  graph = tf.Graph()
  with graph.as_default():
    tf.graph_util.import_graph_def(frozen, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
      return sess.run("add:0", {"patches:0": x[..., 0:1], "seed:0": x[..., 1:2]})


def float64_forward(model, x: np.ndarray, compute_dtype: str = "float32", probes: int = 0,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """float64 logits of ``model`` for ``x`` [b, z, y, x, 2], and simulated rounding errors.

  The convolutions the model runs in ``compute_dtype`` (``model.conv_dtype``) use its weights
  exactly as the model represents them in that dtype (``model.weight_terms``, one convolution
  per term); everything else is exact. Returns
  ``(logits [b, z, y, x, 1], deviations [probes, b, z, y, x, 1])``: each deviation is a float64
  run in which every rounding of the model's arithmetic (see the module docstring) is a random
  relative error of +-u, minus the logits.
  """
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  f32 = UNIT_ROUNDOFF["float32"]
  low = tf.as_dtype(compute_dtype)

  def sign(like: tf.Tensor) -> tf.Tensor:
    return tf.constant(rng.integers(0, 2, size=like.shape) * 2.0 - 1.0)

  def tile(t: tf.Tensor) -> tf.Tensor:
    return tf.tile(t, [probes, 1, 1, 1, 1])

  def conv3d(t: tf.Tensor, w: np.ndarray) -> tf.Tensor:
    return tf.nn.conv3d(t, tf.constant(w), strides=[1] * 5, padding="SAME")

  def conv(name: str, a0: tf.Tensor, ak: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    layer = model.convs[name]
    dtype = model.conv_dtype(name, low)
    terms = [tf.cast(w, tf.float64).numpy() for w in model.weight_terms(name, low)]
    b = layer.biases.numpy().astype(np.float64)
    u, eta = UNIT_ROUNDOFF[dtype.name], ETA[dtype.name]
    if dtype != tf.float32:  # the input is rounded to the compute dtype
      ak = ak + (u * tile(tf.abs(a0)) + eta) * sign(ak)
    y0, yk = 0, 0
    for w in terms:  # one convolution per weight term, each output cast to float32
      t0 = conv3d(a0, w)
      tk = conv3d(ak, w)
      # Accumulation of n products t in precision u: partial-sum energy of a random order.
      n = int(np.prod(w.shape[:4]))
      energy = n * (conv3d(a0 * a0, w * w) / 6 + t0 * t0 / 3)
      tk = tk + u * tile(tf.sqrt(energy)) * sign(tk)
      if dtype != tf.float32:  # the output is rounded to the compute dtype, then cast up exactly
        tk = tk + (u * tile(tf.abs(t0)) + eta) * sign(tk)
      y0, yk = y0 + t0, yk + tk
    if len(terms) > 1:  # their float32 sum
      yk = yk + f32 * tile(tf.abs(y0)) * sign(yk)
    y0, yk = y0 + b, yk + b
    return y0, yk + f32 * tile(tf.abs(y0)) * sign(yk)  # float32 bias addition

  def add(p0: tf.Tensor, q0: tf.Tensor, pk: tf.Tensor, qk: tf.Tensor):
    s0 = p0 + q0
    return s0, pk + qk + f32 * tile(tf.abs(s0)) * sign(pk)

  x0 = tf.constant(x, tf.float64)
  xk = tile(x0)
  relu = tf.nn.relu
  n0, nk = conv("conv0_a", x0, xk)
  n0, nk = conv("conv0_b", relu(n0), relu(nk))
  for i in range(1, model.depth):
    a0, ak = conv(f"conv{i}_a", relu(n0), relu(nk))
    a0, ak = conv(f"conv{i}_b", relu(a0), relu(ak))
    n0, nk = add(a0, n0, ak, nk)
  l0, lk = conv("conv_lom", relu(n0), relu(nk))
  logits, logits_k = add(x0[..., 1:2], l0, xk[..., 1:2], lk)
  logits = logits.numpy()
  deviations = logits_k.numpy().reshape((probes,) + logits.shape) - logits
  return logits, deviations


def rounding_error_ratio(got: np.ndarray, want: np.ndarray, deviations: np.ndarray
                         ) -> tuple[float, float]:
  """(max over voxels of |got - want| / rms of the deviations there, its bound).

  The bound is Student's t quantile with ``probes`` degrees of freedom at 1 - P_FAIL/(2 voxels):
  the ratio of a normal error to an independent rms estimate of (at least) its spread.
  """
  probes = deviations.shape[0]
  rms = np.sqrt(np.mean(deviations**2, axis=0))
  ratio = np.abs(got.astype(np.float64) - want) / rms
  return float(ratio.max()), float(scipy.stats.t.ppf(1 - P_FAIL / (2 * want.size), probes))


def rms(a: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


@pytest.fixture(scope="module")
def fib25_model():
  return ffn.models.load(str(SAMPLE / CKPT_NAME), "convstack_3d.ConvStack3DFFNModel", FIB25_ARGS)


def test_matches_google_graph(fib25_model):
  shared = shared_fib25_or_fail(CKPT_NAME + ".meta")
  x = fib25_input()
  want = google_graph_logits(shared, x)
  got = fib25_model(x)
  assert got.shape == (1, 33, 33, 33, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  # The output is a real, non-trivial prediction: both signs occur and the seed voxel is inside.
  assert got[0, 16, 16, 16, 0] > 0 and (got < 0).any()


def test_matches_golden_file(fib25_model):
  golden = np.load(GOLDEN)
  assert tuple(golden["crop_start_zyx"]) == CROP_START_ZYX
  x = fib25_input()
  got = fib25_model(x)[0, ::SUBSAMPLE, ::SUBSAMPLE, ::SUBSAMPLE, 0]
  np.testing.assert_allclose(got, golden["logits"], atol=1e-3, rtol=0)
  # The golden values are the google graph's; the same checkpoint in float64 agrees with them.
  ref = float64_forward(fib25_model.model, x)[0][0, ::SUBSAMPLE, ::SUBSAMPLE, ::SUBSAMPLE, 0]
  np.testing.assert_allclose(ref, golden["logits"], atol=1e-3, rtol=0)


def test_batch_is_independent_and_shape_cached(fib25_model):
  x = fib25_input()
  batch = np.concatenate([x, x[:, ::-1]], axis=0)
  out = fib25_model(batch)
  np.testing.assert_allclose(out[0:1], fib25_model(x), atol=1e-4)
  fib25_model(batch)
  assert fib25_model._fn.experimental_get_tracing_count() == 2  # one trace per input shape
  assert fib25_model.fov_size == (33, 33, 33) and fib25_model.deltas == (8, 8, 8)


# A real 17^3 patch (centred on the golden crop's centre): the float64 probes cost ~1/7 of 33^3.
FIB25_SMALL_START_ZYX = (108, 108, 108)
FIB25_PROBES = 8


@pytest.fixture(scope="module")
def fib25_small():
  """(input, float64 logits and deviations per reduced compute dtype) on the 17^3 patch."""
  x = fib25_input(FIB25_SMALL_START_ZYX, 17)
  model = ffn.models.build_model("convstack_3d", FIB25_ARGS)
  ffn.models.restore_weights(model, str(SAMPLE / CKPT_NAME))
  refs = {d: float64_forward(model, x, d, FIB25_PROBES, seed=1) for d in UNIT_ROUNDOFF}
  return model, x, refs


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fib25_reduced_precision_within_rounding_bound(fib25_small, dtype):
  model, x, refs = fib25_small
  low = ffn.models.load(str(SAMPLE / CKPT_NAME), "convstack_3d", FIB25_ARGS, dtype)
  got = low(x)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  want, deviations = refs[dtype]
  ratio, bound = rounding_error_ratio(got, want, deviations)
  assert ratio < bound, f"{dtype}: error {ratio:.2f} x simulated rounding error (bound {bound:.2f})"
  # It really ran in reduced precision: float32 arithmetic could not be this far from float64.
  ratio32, bound32 = rounding_error_ratio(got, *refs["float32"])
  assert ratio32 > bound32
  if dtype == "float16":  # 10 mantissa bits beat bfloat16's 7 (rms over the patch)
    other = ffn.models.load(str(SAMPLE / CKPT_NAME), "convstack_3d", FIB25_ARGS, "bfloat16")
    assert rms(got - want) < rms(other(x) - refs["bfloat16"][0])


def test_depth_mismatch_names_variable():
  with pytest.raises(FFNError, match=r"model\.ckpt-27465036.*seed_update/conv11_a"):
    ffn.models.load(str(SAMPLE / CKPT_NAME), "convstack_3d", dict(FIB25_ARGS, depth=11))
  with pytest.raises(FFNError, match=r"seed_update/conv12_a/weights is missing"):
    ffn.models.load(str(SAMPLE / CKPT_NAME), "convstack_3d", dict(FIB25_ARGS, depth=13))


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(FFNError, match=r"seed_update/conv0_a/weights has shape \[3, 3, 3, 2, 32\].*"
                                     r"expects \[3, 3, 3, 2, 16\]"):
    ffn.models.load(str(SAMPLE / CKPT_NAME), "convstack_3d", dict(FIB25_ARGS, features=16))


def test_missing_checkpoint_and_bad_args(tmp_path):
  with pytest.raises(FFNError, match="checkpoint not found"):
    ffn.models.load(str(tmp_path / "model.ckpt-1"), "convstack_3d", FIB25_ARGS)
  with pytest.raises(FFNError, match="no checkpoint found"):
    ffn.models.load(str(tmp_path), "convstack_3d", FIB25_ARGS)
  with pytest.raises(FFNError, match="unknown model_name"):
    ffn.models.build_model("resnet", FIB25_ARGS)
  with pytest.raises(FFNError, match="unknown keys"):
    ffn.models.build_model("convstack_3d", {"dept": 3})
  with pytest.raises(FFNError, match="not valid JSON"):
    ffn.models.parse_model_args("{depth: 3}")


def test_tf2_checkpoint_roundtrip(tmp_path):
  import tensorflow as tf
  args = {"depth": 2, "fov_size": [9, 7, 5], "deltas": [2, 2, 1]}
  model = ffn.models.build_model("convstack_3d", args, seed=3)
  ckpt = tf.train.Checkpoint(model=model)
  ckpt.save(str(tmp_path / "ckpt"))
  loaded = ffn.models.load(str(tmp_path), "convstack_3d", args)  # directory -> latest
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 9, 2)).astype(np.float32)
  np.testing.assert_array_equal(loaded(x), model(tf.constant(x)).numpy())
  other = ffn.models.build_model("convstack_3d", args, seed=4)
  assert not np.allclose(other(tf.constant(x)).numpy(), model(tf.constant(x)).numpy())


TINY_ARGS = {"depth": 2, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
  """A directory with a TF2 checkpoint of a depth-2, 9^3 FFN with random weights."""
  import tensorflow as tf
  folder = tmp_path_factory.mktemp("tiny")
  model = ffn.models.build_model("convstack_3d", TINY_ARGS, seed=3)
  tf.train.Checkpoint(model=model).save(str(folder / "ckpt"))
  return str(folder)


def tiny_input(batch: int = 2) -> np.ndarray:
  """[batch, 9, 9, 9, 2] float32: random image, inference-style seed channel."""
  x = np.random.default_rng(0).normal(size=(batch, 9, 9, 9, 2)).astype(np.float32)
  x[..., 1] = np.log(0.05 / 0.95)
  x[:, 4, 4, 4, 1] = np.log(0.95 / 0.05)
  return x


TINY_PROBES = 32


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tiny_within_rounding_bound(tiny_checkpoint, dtype, jit):
  """Every compute dtype, default path and XLA, against float64 (not against each other)."""
  model = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, dtype, jit_compile=jit)
  assert model.compute_dtype == dtype and model.jit_compile is jit
  x = tiny_input()
  got = model(x)
  assert got.dtype == np.float32 and got.shape == (2, 9, 9, 9, 1)
  want, deviations = float64_forward(model.model, x, dtype, TINY_PROBES, seed=2)
  ratio, bound = rounding_error_ratio(got, want, deviations)
  assert ratio < bound, f"{dtype}: error {ratio:.2f} x simulated rounding error (bound {bound:.2f})"
  if dtype != "float32":  # really ran in reduced precision: float32 could not be this far off
    ratio32, bound32 = rounding_error_ratio(got, *float64_forward(model.model, x, "float32",
                                                                  TINY_PROBES, seed=2))
    assert ratio32 > bound32
  model(x)
  assert model._fn.experimental_get_tracing_count() == 1


def test_tiny_float16_closer_than_bfloat16(tiny_checkpoint):
  x = tiny_input()
  errors = {}
  for dtype in ("float16", "bfloat16"):
    model = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, dtype)
    errors[dtype] = rms(model(x) - float64_forward(model.model, x, dtype)[0])
  assert 0 < errors["float16"] < errors["bfloat16"]  # 10 mantissa bits beat bfloat16's 7


def test_weight_terms_sum_to_weights(fib25_model):
  """Rounding to nearest: |w - hi| <= u|w| (+ ETA), lo = rn(w - hi) leaves u|w - hi| <= u^2|w|."""
  import tensorflow as tf
  model = fib25_model.model
  for dtype, terms, u in ((tf.float32, 1, 0.0), (tf.float16, 1, UNIT_ROUNDOFF["float16"]),
                          (tf.bfloat16, 2, UNIT_ROUNDOFF["bfloat16"]**2)):
    for name, conv in model.convs.items():
      got = model.weight_terms(name, dtype)
      w = conv.weights.numpy().astype(np.float64)
      if name in model.float32_convs:
        assert len(got) == 1 and got[0].dtype == tf.float32
        np.testing.assert_array_equal(got[0].numpy(), w)
        continue
      assert len(got) == terms and all(t.dtype == dtype for t in got)
      total = sum(tf.cast(t, tf.float64).numpy() for t in got)
      error = np.abs(total - w)
      assert np.all(error <= u * np.abs(w) + terms * ETA[dtype.name]), (name, dtype.name)
  assert set(model.float32_convs) == {"conv0_a", "conv_lom"}


def test_bound_rejects_wrong_weights(tiny_checkpoint):
  """The tolerance sees another checkpoint, and the same one with a layer scaled by 1.2."""
  model = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, "float16")
  x = tiny_input()
  got = model(x)
  for seed, factor in ((4, 1.0), (3, 1.2)):
    wrong = ffn.models.build_model("convstack_3d", TINY_ARGS, seed=seed)
    wrong.convs["conv1_a"].weights.assign(wrong.convs["conv1_a"].weights * factor)
    want, deviations = float64_forward(wrong, x, "float16", TINY_PROBES, seed=2)
    ratio, bound = rounding_error_ratio(got, want, deviations)
    assert ratio > bound, (seed, factor)


def test_bad_compute_options(tiny_checkpoint):
  import tensorflow as tf
  for bad in ("float64", "fp16", "half", None):
    with pytest.raises(FFNError, match=r"compute_dtype must be one of float32, bfloat16, float16"):
      ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, compute_dtype=bad)
  with pytest.raises(FFNError, match="jit_compile must be True or False"):
    ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, jit_compile="no")
  model = ffn.models.build_model("convstack_3d", TINY_ARGS)
  with pytest.raises(FFNError, match="compute_dtype must be one of"):
    model(tf.constant(tiny_input()), compute_dtype=tf.float64)


def main() -> None:
  x = fib25_input()
  logits = google_graph_logits(SHARED_FIB25, x)[0, ::SUBSAMPLE, ::SUBSAMPLE, ::SUBSAMPLE, 0]
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, logits=logits.astype(np.float32),
                      crop_start_zyx=np.array(CROP_START_ZYX), subsample=SUBSAMPLE)
  print(f"wrote {GOLDEN}: logits {logits.shape}")


if __name__ == "__main__":
  main()
