"""InferenceRequest text protos (pbtxt): reading, checking (:func:`check_request`), their volume
fields and option fields, and ``--bounding_box`` values; every problem is a one-line FFNError."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

from google.protobuf import text_format

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.inference import inference_pb2
from ffn.inference.seed import make_policy
from ffn.io.textproto import parse_text_proto, read_text_proto
from ffn.io.volumes import VolumeSpec, parse_spec
from ffn.utils import bounding_box_pb2

_log = logging.getLogger(__name__)


def parse_request(text: str, where: str = "inference request") -> inference_pb2.InferenceRequest:
  """Parses InferenceRequest text format; a syntax error -> FFNError with its line and column."""
  return parse_text_proto(text, inference_pb2.InferenceRequest(), where)


def load_request(path_or_text: str) -> inference_pb2.InferenceRequest:
  """An InferenceRequest from a pbtxt file path, or from the text itself (google's flags allow both).

  Relative paths inside the request are left as they are (relative to the working directory,
  like google/ffn).
  """
  return read_text_proto(path_or_text, inference_pb2.InferenceRequest(), "--inference_request",
                         "inference request")


def _volume_text(text: str, field: str) -> str:
  """Checks the volume spec in a DecoratedVolume's ``hdf5`` field: ``file.h5:dataset`` (google's
  syntax) or, beyond google, a TensorStore volume (``zarr://``, ``n5://``, ``precomputed://`` path
  or JSON spec, :mod:`ffn.io.volumes`)."""
  try:
    spec = parse_spec(text)
  except FFNError as e:
    raise FFNError(f"inference request: {field}.hdf5: {e}") from None
  if spec.scheme is None and (spec.dataset is None or spec.name is not None):
    raise FFNError(f"inference request: {field}.hdf5 must be 'file.h5:dataset' (or a zarr://, n5://, "
                   f"precomputed:// or TensorStore JSON volume), got {text!r}")
  return text


def hdf5_spec(volume, field: str) -> str:
  """The volume spec of a DecoratedVolume proto field (:func:`_volume_text`); anything else ->
  FFNError naming it.

  Only ``hdf5`` volumes exist here: ``volinfo`` and ``decorator_specs`` (google's VolumeStore
  features) are refused.
  """
  which = volume.WhichOneof("volume_path")
  if which == "volinfo":
    raise FFNError(f"inference request: {field}: volinfo volumes are not supported "
                   "(use hdf5: \"file.h5:dataset\")")
  if which != "hdf5":
    raise FFNError(f"inference request: {field} needs hdf5: \"file.h5:dataset\"")
  if volume.HasField("decorator_specs"):
    raise FFNError(f"inference request: {field}.decorator_specs is not supported (volinfo only)")
  return _volume_text(volume.hdf5, field)


def parse_bounding_box(text: str) -> BoundingBox:
  """``start { x: .. y: .. z: .. } size { x: .. y: .. z: .. }`` (google's flag) -> BoundingBox."""
  msg = bounding_box_pb2.BoundingBox()
  try:
    text_format.Parse(text, msg)
  except text_format.ParseError as e:
    raise FFNError(f"--bounding_box: malformed BoundingBox text proto: {e}") from None
  if not msg.HasField("start") or not msg.HasField("size"):
    raise FFNError(f"--bounding_box: needs both 'start {{x y z}}' and 'size {{x y z}}', got {text!r}")
  return BoundingBox((msg.start.x, msg.start.y, msg.start.z), (msg.size.x, msg.size.y, msg.size.z))


def format_bounding_box(box: BoundingBox) -> str:
  """The ``--bounding_box`` text for ``box``."""
  s, n = box.start.tolist(), box.size.tolist()
  return (f"start {{ x: {s[0]} y: {s[1]} z: {s[2]} }} "
          f"size {{ x: {n[0]} y: {n[1]} z: {n[2]} }}")


def image_spec(request: inference_pb2.InferenceRequest) -> VolumeSpec:
  """The request's image: a 3D volume, or channel 0 of a 4D (channel,z,y,x) one (google's
  runner reads the image that way)."""
  which = request.image.WhichOneof("volume_path")
  if which != "hdf5":
    raise FFNError("inference request: 'image { hdf5: \"file.h5:dataset\" }' is required"
                   + (" (volinfo volumes are not supported)" if which == "volinfo" else ""))
  return dataclasses.replace(parse_spec(hdf5_spec(request.image, "image")), channel=0)


def check_request(request: inference_pb2.InferenceRequest) -> None:
  """Checks what can be checked without loading anything big; raises FFNError on the first problem.

  Logs one warning naming the set fields that google/ffn HEAD ignores, and so does this runner
  (:func:`google_ignored_request_fields`).
  """
  image_spec(request)
  if not request.segmentation_output_dir:
    raise FFNError("inference request: segmentation_output_dir is not set")
  check_output_dir(request.segmentation_output_dir, "segmentation_output_dir")
  if not request.model_checkpoint_path:
    raise FFNError("inference request: model_checkpoint_path is not set")
  if not request.HasField("image_stddev") or request.image_stddev <= 0:
    raise FFNError("inference request: image_stddev must be set and positive")
  opts = request.inference_options
  for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
    value = getattr(opts, name)
    if not 0.0 < value < 1.0:
      raise FFNError(f"inference request: inference_options.{name} must be a probability in (0, 1), "
                     f"got {value}")
  if not math.isfinite(opts.consistency_threshold):
    raise FFNError("inference request: inference_options.consistency_threshold must be a number, "
                   f"got {opts.consistency_threshold}")
  if request.movement_policy_name not in ("", "FaceMaxMovementPolicy", "movement.FaceMaxMovementPolicy"):
    raise FFNError(f"inference request: movement_policy_name {request.movement_policy_name!r} is not "
                   "supported (only FaceMaxMovementPolicy)")
  make_policy(request.seed_policy, request.seed_policy_args)
  for field in ("masks", "seed_masks"):
    for i, config in enumerate(getattr(request, field)):
      check_mask_config(config, f"{field}[{i}]")
  _check_alignment(request)
  if request.HasField("init_segmentation"):
    hdf5_spec(request.init_segmentation, "init_segmentation")
  _check_shift_mask(request)
  movement_policy_kwargs(request)
  unused = google_ignored_request_fields(request)
  if unused:
    _log.warning("inference request: these fields are set but ignored, as google/ffn (HEAD) ignores "
                 "them too: %s", ", ".join(unused))


def check_output_dir(path: str, field: str) -> None:
  """FFNError unless the directory ``path`` exists or can be created (its nearest existing
  ancestor is a writable directory); creates nothing, so a request refused later leaves no trace."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise FFNError(f"inference request: {field} {path!r}: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise FFNError(f"inference request: {field} {path!r}: {probe} is not writable")


def check_mask_config(config, field: str) -> None:
  """One MaskConfig: a source (image channel 0, a volume spec, or a coordinate expression that
  compiles); FFNError naming ``field`` otherwise. The volume itself is read per subvolume."""
  source = config.WhichOneof("source")
  if source is None:
    raise FFNError(f"inference request: {field} has no source (image, volume or "
                   "coordinate_expression)")
  if source == "coordinate_expression":
    from ffn.inference.masks import compile_expression
    compile_expression(config.coordinate_expression.expression, field)
    return
  channels = getattr(config, source).channels
  if not channels:
    raise FFNError(f"inference request: {field}.{source} has no channels (nothing would be masked)")
  for j, channel in enumerate(channels):
    if channel.channel < 0 or (source == "image" and channel.channel != 0):
      raise FFNError(f"inference request: {field}.{source}.channels[{j}].channel must be "
                     f"{'0 (the image is one channel)' if source == 'image' else '>= 0'}, "
                     f"got {channel.channel}")
  if source == "volume":
    hdf5_spec(config.volume.mask, f"{field}.volume.mask")


def _check_alignment(request: inference_pb2.InferenceRequest) -> None:
  """Only NO_ALIGNMENT: google/ffn raises NotImplementedError for any other type (UNKNOWN_ALIGNMENT
  included, when it is set explicitly)."""
  kind = request.alignment_options.type  # NO_ALIGNMENT when unset
  if kind != inference_pb2.AlignmentOptions.NO_ALIGNMENT:
    try:
      name = inference_pb2.AlignmentOptions.AlignType.Name(kind)
    except ValueError:
      name = str(kind)
    raise FFNError(f"inference request: alignment_options.type {name} is not supported (only "
                   "NO_ALIGNMENT; google/ffn does not implement other alignments either)")


def shift_mask_spec(request: inference_pb2.InferenceRequest) -> str | None:
  """The shift mask's ``file.h5:dataset``, or None when there is none (google ignores a
  ``shift_mask`` message without a volume path)."""
  if not request.HasField("shift_mask") or request.shift_mask.WhichOneof("volume_path") is None:
    return None
  return hdf5_spec(request.shift_mask, "shift_mask")


def _check_shift_mask(request: inference_pb2.InferenceRequest) -> None:
  if shift_mask_spec(request) is None:
    return
  if request.HasField("shift_mask_scale") and request.shift_mask_scale <= 0:
    raise FFNError(f"inference request: shift_mask_scale must be positive, got {request.shift_mask_scale}")
  if not request.HasField("shift_mask_threshold") or request.shift_mask_threshold <= 0:
    raise FFNError("inference request: shift_mask_threshold must be set and positive when shift_mask is "
                   "given (google/ffn would use 0 and block every position)")
  if request.HasField("shift_mask_fov"):
    size = request.shift_mask_fov.size
    if min(size.x, size.y, size.z) <= 0:
      raise FFNError("inference request: shift_mask_fov.size must be positive in x, y and z, got "
                     f"{[size.x, size.y, size.z]}")


def movement_policy_kwargs(request: inference_pb2.InferenceRequest) -> dict:
  """``movement_policy_args`` as keyword overrides of the FaceMaxMovementPolicy, as google reads it.

  Accepted keys: ``deltas`` (the move step, **z,y,x** -- google hands the list to the policy as
  is) and ``score_threshold`` (the minimum face logit for a move, in **logit** units, default
  ``logit(move_threshold)``). Returns ``{"deltas_zyx": ..., "score_threshold": ...}`` with the
  keys that were given.
  """
  if not request.movement_policy_args:
    return {}
  try:
    args = json.loads(request.movement_policy_args)
  except json.JSONDecodeError as e:
    raise FFNError(f"inference request: movement_policy_args is not valid JSON ({e.msg}): "
                   f"{request.movement_policy_args!r}") from None
  if not isinstance(args, dict) or set(args) - {"deltas", "score_threshold"}:
    raise FFNError("inference request: movement_policy_args must be a JSON object with 'deltas' "
                   f"(z,y,x) and/or 'score_threshold' (logit), got {request.movement_policy_args!r}")
  out: dict = {}
  if "deltas" in args:
    deltas = args["deltas"]
    if (not isinstance(deltas, list) or len(deltas) != 3
        or not all(isinstance(d, int) and d >= 0 for d in deltas)):
      raise FFNError(f"inference request: movement_policy_args deltas must be 3 integers >= 0 "
                     f"(z,y,x), got {deltas!r}")
    fov = _model_fov_zyx(request)
    if fov is not None and any(d > (n - 1) // 2 for d, n in zip(deltas, fov)):
      raise FFNError(f"inference request: movement_policy_args deltas {deltas} (z,y,x) must be at "
                     f"most (fov_size - 1) // 2 = {[(n - 1) // 2 for n in fov]} (z,y,x) per axis "
                     f"for the model's fov_size {list(fov)[::-1]} (x,y,z)")
    out["deltas_zyx"] = tuple(deltas)
  if "score_threshold" in args:
    value = args["score_threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise FFNError(f"inference request: movement_policy_args score_threshold must be a number "
                     f"(logit), got {value!r}")
    out["score_threshold"] = float(value)
  return out


def _model_fov_zyx(request: inference_pb2.InferenceRequest) -> tuple[int, ...] | None:
  """The FoV (z,y,x) that ``model_args`` names, or None when it does not (then the checkpoint's
  flags give it, and :class:`~ffn.inference.movement.FaceMaxMovementPolicy` checks the deltas)."""
  try:
    args = json.loads(request.model_args) if request.model_args else {}
  except json.JSONDecodeError:
    return None  # the model loader reports it
  fov = args.get("fov_size") if isinstance(args, dict) else None
  if not isinstance(fov, list) or len(fov) != 3 or not all(isinstance(n, int) for n in fov):
    return None
  return tuple(fov[::-1])


def google_ignored_request_fields(request: inference_pb2.InferenceRequest) -> list[str]:
  """Names of set fields that google/ffn HEAD ignores as well (its older Runner used them for
  histogram matching and self-prediction halting; both were removed)."""
  unused = [name for name in ("reference_histogram", "self_prediction") if request.HasField(name)]
  if request.histogram_masks:
    unused.append("histogram_masks")
  return unused
