"""The FFN model against google's own published TF1 graph and weights.

The reference runs google's serialized graph (the ``.meta`` shipped with the fib25 checkpoint): the
subgraph from the ``seed``/``patches`` placeholders to the ``add`` node that yields the logits is cut
out of the MetaGraphDef (the full graph cannot be imported because it holds Google-internal input
ops such as ``SSTableReaderV2``), its ``VariableV2`` nodes are replaced by the checkpoint values,
and it is run in a ``tf.compat.v1.Session``.

``python tests/test_models.py`` regenerates ``tests/data/fib25_logits_golden.npz``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import ffn.models
from ffn.errors import FFNError

GOLDEN = Path(__file__).parent / "data" / "fib25_logits_golden.npz"
CKPT_NAME = "model/model.ckpt-27465036"
FIB25_ARGS = {"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}
CROP_START_ZYX = (100, 100, 100)
SUBSAMPLE = 4  # golden file keeps every 4th voxel along each axis


def fib25_input(fib25: Path) -> np.ndarray:
  """[1, 33, 33, 33, 2]: a training_sample2 crop normalised (raw-128)/33 and an inference seed."""
  z, y, x = CROP_START_ZYX
  with h5py.File(fib25 / "training_sample2.h5", "r") as f:
    raw = f["raw"][z:z + 33, y:y + 33, x:x + 33]
  out = np.empty((1, 33, 33, 33, 2), np.float32)
  out[..., 0] = (raw.astype(np.float32) - 128.0) / 33.0
  out[..., 1] = np.log(0.05 / 0.95)
  out[0, 16, 16, 16, 1] = np.log(0.95 / 0.05)
  return out


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


@pytest.fixture(scope="module")
def fib25_model(fib25_dir):
  return ffn.models.load(str(fib25_dir / CKPT_NAME), "convstack_3d.ConvStack3DFFNModel", FIB25_ARGS)


def test_matches_google_graph(fib25_dir, fib25_model):
  x = fib25_input(fib25_dir)
  want = google_graph_logits(fib25_dir, x)
  got = fib25_model(x)
  assert got.shape == (1, 33, 33, 33, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
  # The output is a real, non-trivial prediction: both signs occur and the seed voxel is inside.
  assert got[0, 16, 16, 16, 0] > 0 and (got < 0).any()


def test_matches_golden_file(fib25_dir, fib25_model):
  golden = np.load(GOLDEN)
  assert tuple(golden["crop_start_zyx"]) == CROP_START_ZYX
  x = fib25_input(fib25_dir)
  got = fib25_model(x)[0, ::SUBSAMPLE, ::SUBSAMPLE, ::SUBSAMPLE, 0]
  np.testing.assert_allclose(got, golden["logits"], atol=1e-3, rtol=0)


def test_batch_is_independent_and_shape_cached(fib25_dir, fib25_model):
  x = fib25_input(fib25_dir)
  batch = np.concatenate([x, x[:, ::-1]], axis=0)
  out = fib25_model(batch)
  np.testing.assert_allclose(out[0:1], fib25_model(x), atol=1e-4)
  fib25_model(batch)
  assert fib25_model._fn.experimental_get_tracing_count() == 2  # one trace per input shape
  assert fib25_model.fov_size == (33, 33, 33) and fib25_model.deltas == (8, 8, 8)


def test_bfloat16_close_to_float32(fib25_dir, fib25_model):
  fast = ffn.models.load(str(fib25_dir / CKPT_NAME), "convstack_3d", FIB25_ARGS, "bfloat16")
  x = fib25_input(fib25_dir)
  ref, got = fib25_model(x), fast(x)
  assert got.dtype == np.float32
  # bfloat16 keeps 8 mantissa bits: logits agree roughly, and the object mask almost everywhere.
  assert np.median(np.abs(got - ref)) < 0.5
  assert np.mean((got > 0) == (ref > 0)) > 0.97


def test_float16_close_to_float32(fib25_dir, fib25_model):
  half = ffn.models.load(str(fib25_dir / CKPT_NAME), "convstack_3d", FIB25_ARGS, "float16")
  x = fib25_input(fib25_dir)
  ref, got = fib25_model(x), half(x)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  # float16 keeps 10 mantissa bits: much closer than bfloat16 (measured max 0.01 on real patches).
  assert 0 < np.abs(got - ref).max() < 0.05
  assert np.mean((got > 0) == (ref > 0)) > 0.999


def test_depth_mismatch_names_variable(fib25_dir):
  with pytest.raises(FFNError, match=r"model\.ckpt-27465036.*seed_update/conv11_a"):
    ffn.models.load(str(fib25_dir / CKPT_NAME), "convstack_3d", dict(FIB25_ARGS, depth=11))
  with pytest.raises(FFNError, match=r"seed_update/conv12_a/weights is missing"):
    ffn.models.load(str(fib25_dir / CKPT_NAME), "convstack_3d", dict(FIB25_ARGS, depth=13))


def test_shape_mismatch_names_both_shapes(fib25_dir):
  with pytest.raises(FFNError, match=r"seed_update/conv0_a/weights has shape \[3, 3, 3, 2, 32\].*"
                                     r"expects \[3, 3, 3, 2, 16\]"):
    ffn.models.load(str(fib25_dir / CKPT_NAME), "convstack_3d", dict(FIB25_ARGS, features=16))


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


def test_tiny_float16_close_to_float32(tiny_checkpoint):
  ref_model = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS)
  half = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, compute_dtype="float16")
  assert ref_model.compute_dtype == "float32" and half.compute_dtype == "float16"
  x = tiny_input()
  ref, got = ref_model(x), half(x)
  assert got.dtype == np.float32 and got.shape == (2, 9, 9, 9, 1)
  diff = np.abs(got - ref)
  assert 0 < diff.max() < 5e-3  # really ran in float16, yet within float16 rounding
  bf16 = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, compute_dtype="bfloat16")
  assert diff.max() < np.abs(bf16(x) - ref).max()  # 10 mantissa bits beat bfloat16's 7


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 0.02), ("float16", 5e-3)])
def test_jit_compile_matches_default_path(tiny_checkpoint, dtype, atol):
  plain = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, dtype)
  xla = ffn.models.load(tiny_checkpoint, "convstack_3d", TINY_ARGS, dtype, jit_compile=True)
  assert plain.jit_compile is False and xla.jit_compile is True
  x = tiny_input()
  got = xla(x)
  assert got.dtype == np.float32 and got.shape == (2, 9, 9, 9, 1)
  np.testing.assert_allclose(got, plain(x), atol=atol, rtol=0)
  xla(x)
  assert xla._fn.experimental_get_tracing_count() == 1


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
  from conftest import FIB25
  x = fib25_input(FIB25)
  logits = google_graph_logits(FIB25, x)[0, ::SUBSAMPLE, ::SUBSAMPLE, ::SUBSAMPLE, 0]
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, logits=logits.astype(np.float32),
                      crop_start_zyx=np.array(CROP_START_ZYX), subsample=SUBSAMPLE)
  print(f"wrote {GOLDEN}: logits {logits.shape}")


if __name__ == "__main__":
  main()
