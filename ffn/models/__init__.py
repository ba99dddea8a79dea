"""FFN models: a registry by google/ffn ``model_name`` and checkpoint loading.

:func:`load` restores a model from a google/ffn TF1 checkpoint, from one of this toolkit's TF2
training checkpoints, or from a training directory (its latest checkpoint), and returns a
:class:`LoadedModel` that maps numpy inputs [b, z, y, x, 2] to logits [b, z, y, x, 1].
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Callable

import numpy as np

from ffn.errors import FFNError

# File written beside training checkpoints with the training flags (model_name, model_args, ...).
FLAGS_FILE = "train_flags.json"

# Accepted ``compute_dtype`` values of :func:`load` (the dtype of the convolutions; the residual
# stream and the output stay float32). float32 is the default and the reference.
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# google/ffn model_name -> "module:class" of the implementation. Short names are aliases.
_REGISTRY: dict[str, str] = {
    "convstack_3d.ConvStack3DFFNModel": "ffn.models.convstack_3d:ConvStack3DFFNModel",
}
_ALIASES: dict[str, str] = {
    "convstack_3d": "convstack_3d.ConvStack3DFFNModel",
    "ConvStack3DFFNModel": "convstack_3d.ConvStack3DFFNModel",
}


def register(model_name: str, target: str, aliases: tuple[str, ...] = ()) -> None:
  """Registers a model class ("package.module:Class") under google-style ``model_name``.

  The class must be a ``tf.Module`` taking ``fov_size``, ``deltas`` (x,y,z) and its own keyword
  args, with ``named_variables()``, ``tf2_checkpoint_key(name)`` and ``__call__(x, compute_dtype)``.
  """
  _REGISTRY[model_name] = target
  for alias in aliases:
    _ALIASES[alias] = model_name


def canonical_name(model_name: str) -> str:
  """google's full model name for ``model_name`` (which may be a short alias)."""
  name = _ALIASES.get(model_name, model_name)
  if name not in _REGISTRY:
    known = sorted(set(_REGISTRY) | set(_ALIASES))
    raise FFNError(f"unknown model_name {model_name!r} (known: {', '.join(known)})")
  return name


def parse_model_args(model_args: str | dict | None) -> dict[str, Any]:
  """google's JSON ``model_args`` string (or a dict) -> dict."""
  if model_args is None or model_args == "":
    return {}
  if isinstance(model_args, dict):
    return dict(model_args)
  try:
    out = json.loads(model_args)
  except json.JSONDecodeError as e:
    raise FFNError(f"model_args is not valid JSON ({e.msg}): {model_args!r}") from None
  if not isinstance(out, dict):
    raise FFNError(f"model_args must be a JSON object, got {model_args!r}")
  return out


def build_model(model_name: str, model_args: str | dict | None, seed: int = 0):
  """Instantiates a registered model with freshly initialised weights."""
  import importlib
  import inspect
  name = canonical_name(model_name)
  module_name, cls_name = _REGISTRY[name].split(":")
  cls = getattr(importlib.import_module(module_name), cls_name)
  args = parse_model_args(model_args)
  accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "seed"}
  unknown = sorted(set(args) - accepted)
  if unknown:
    raise FFNError(f"model_args for {name}: unknown keys {unknown} (accepted: {sorted(accepted)})")
  return cls(seed=seed, **args)


def resolve_checkpoint(path: str) -> str:
  """A checkpoint prefix for ``path``: a prefix as is, or the latest checkpoint in a directory."""
  import tensorflow as tf
  if os.path.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      # No 'checkpoint' index file: take the highest-numbered prefix present.
      prefixes = [p[:-len(".index")] for p in glob.glob(os.path.join(path, "*.index"))]
      numbered = [(int(m.group(1)), p) for p in prefixes if (m := re.search(r"-(\d+)$", p))]
      if not numbered:
        raise FFNError(f"{path}: no checkpoint found in this directory")
      latest = max(numbered)[1]
    return latest
  if not os.path.exists(path + ".index"):
    raise FFNError(f"{path}: checkpoint not found (no {os.path.basename(path)}.index)")
  return path


def read_train_flags(path: str) -> dict[str, Any]:
  """The training flags saved beside the checkpoints of ``path`` (a directory or prefix); {} if none."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  flags_path = os.path.join(folder, FLAGS_FILE)
  if not os.path.exists(flags_path):
    return {}
  try:
    with open(flags_path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise FFNError(f"{flags_path}: unreadable training flags ({e})") from None


def restore_weights(model, checkpoint: str) -> None:
  """Copies weights from a TF1 (google) or TF2 (this toolkit) checkpoint into ``model``.

  Every variable's shape is checked first; a mismatch raises FFNError naming the variable, the
  checkpoint and both shapes, and nothing is assigned.
  """
  import tensorflow as tf
  try:
    reader = tf.train.load_checkpoint(checkpoint)
  except (tf.errors.OpError, ValueError) as e:
    raise FFNError(f"{checkpoint}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
  shapes = reader.get_variable_to_shape_map()
  is_tf2 = "_CHECKPOINTABLE_OBJECT_GRAPH" in shapes
  values: list[tuple[Any, np.ndarray]] = []
  for name, var in model.named_variables().items():
    key = model.tf2_checkpoint_key(name) if is_tf2 else name
    if key not in shapes:
      raise FFNError(f"{checkpoint}: variable {name} is missing from the checkpoint "
                     f"(model_args do not match the checkpoint?)")
    want = tuple(var.shape.as_list())
    have = tuple(shapes[key])
    if want != have:
      raise FFNError(f"{checkpoint}: variable {name} has shape {list(have)} in the checkpoint but "
                     f"the model (model_args) expects {list(want)}")
    values.append((var, reader.get_tensor(key)))
  extra = _extra_model_variables(shapes, model, is_tf2)
  if extra:
    raise FFNError(f"{checkpoint}: checkpoint has model variables the model lacks, e.g. {extra[0]} "
                   f"(model_args depth smaller than the checkpoint's?)")
  for var, value in values:
    var.assign(value.astype(var.dtype.as_numpy_dtype))


def _extra_model_variables(shapes: dict, model, is_tf2: bool) -> list[str]:
  """Checkpoint keys inside the model's scope that the model has no variable for."""
  names = model.named_variables()
  expected = {model.tf2_checkpoint_key(n) for n in names} if is_tf2 else set(names)
  common = os.path.commonprefix(sorted(expected))
  scope = common[:common.rfind("/") + 1]
  return sorted(k for k in shapes if k.startswith(scope) and k not in expected
                and ".OPTIMIZER_SLOT" not in k)


def check_compute_options(compute_dtype: str, jit_compile: bool) -> None:
  """Raises FFNError unless ``compute_dtype`` is in COMPUTE_DTYPES and ``jit_compile`` a bool."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise FFNError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
  if not isinstance(jit_compile, (bool, np.bool_)):
    raise FFNError(f"jit_compile must be True or False, got {jit_compile!r}")


class LoadedModel:
  """A restored model with a numpy-in, numpy-out call.

  ``fov_size`` and ``deltas`` are (x, y, z). Calls are compiled once per input shape
  (``tf.function`` with a fixed signature), so repeated calls never retrace. ``compute_dtype`` and
  ``jit_compile`` are described in :func:`load`.
  """

  def __init__(self, model, model_name: str, model_args: dict, checkpoint: str,
               compute_dtype: str = "float32", jit_compile: bool = False):
    import tensorflow as tf
    check_compute_options(compute_dtype, jit_compile)
    self.model = model
    self.model_name = model_name
    self.model_args = model_args
    self.checkpoint = checkpoint
    self.compute_dtype = compute_dtype
    self.jit_compile = bool(jit_compile)
    dtype = tf.as_dtype(compute_dtype)
    self._fn = tf.function(lambda x: model(x, compute_dtype=dtype), autograph=False,
                           jit_compile=self.jit_compile)
    self._concrete: dict[tuple[int, ...], Callable] = {}

  @property
  def fov_size(self) -> tuple[int, int, int]:
    return tuple(self.model.fov_size)  # type: ignore[return-value]

  @property
  def deltas(self) -> tuple[int, int, int]:
    return tuple(self.model.deltas)  # type: ignore[return-value]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    """Logits float32 [b, z, y, x, 1] for float32 input [b, z, y, x, 2] (image, seed logits)."""
    import tensorflow as tf
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 5 or x.shape[-1] != 2:
      raise ValueError(f"model input must be [b, z, y, x, 2], got shape {x.shape}")
    fn = self._concrete.get(x.shape)
    if fn is None:
      fn = self._fn.get_concrete_function(tf.TensorSpec(x.shape, tf.float32))
      self._concrete[x.shape] = fn
    return fn(tf.constant(x)).numpy()


def load(checkpoint_path: str, model_name: str | None = None, model_args: str | dict | None = None,
         compute_dtype: str = "float32", jit_compile: bool = False) -> LoadedModel:
  """Restores a model for inference.

  Args:
    checkpoint_path: a google/ffn TF1 checkpoint prefix (``.../model.ckpt-27465036``), a TF2
      checkpoint prefix written by ``ffn train``, or a directory (its latest checkpoint).
    model_name: google's model name (``convstack_3d.ConvStack3DFFNModel``) or a short alias; None
      takes it from the training flags saved beside the checkpoint.
    model_args: google's JSON string or a dict (``fov_size``/``deltas`` in x,y,z order); None
      takes them from the saved training flags.
    compute_dtype: the dtype of the hidden convolutions: "float32" (default), "bfloat16" or
      "float16". With the half types each of them casts its input down and its output back to
      float32 (bfloat16: two convolutions, with the weights split in two bfloat16 terms); the
      first and last convolution, bias additions, residual stream, ReLUs, seed addition and the
      returned logits stay float32 (``ConvStack3DFFNModel.__call__``). On the fib25 model, 2-core
      Xeon with AMX-BF16: bfloat16 ~2.2x faster than float32 (max logit difference 0.06); with
      oneDNN's AVX512-BF16 kernels instead of AMX (what a CPU without AMX, e.g. an AMD EPYC, gets)
      bfloat16 was ~3x *slower* than float32 there; float16 ~1.8x *slower* than float32 (max
      difference 0.02). The half types are meant for AMX CPUs and GPUs. See benchmarks/README.md.
    jit_compile: compile the network with XLA (``tf.function(jit_compile=True)``), once per input
      shape. Off by default: on that CPU XLA was ~7.7x slower for every dtype; meant for GPUs.

  Raises:
    FFNError: unknown compute_dtype, missing/mismatching checkpoint, bad model_name/model_args.
  """
  check_compute_options(compute_dtype, jit_compile)
  checkpoint = resolve_checkpoint(str(checkpoint_path))
  if model_name is None or model_args is None:
    saved = read_train_flags(str(checkpoint_path))
    if model_name is None:
      model_name = saved.get("model_name")
      if model_name is None:
        raise FFNError(f"{checkpoint_path}: no model_name given and no {FLAGS_FILE} beside it")
    if model_args is None:
      model_args = saved.get("model_args", {})
  args = parse_model_args(model_args)
  model = build_model(model_name, args)
  restore_weights(model, checkpoint)
  return LoadedModel(model, canonical_name(model_name), args, checkpoint, compute_dtype,
                     jit_compile)
