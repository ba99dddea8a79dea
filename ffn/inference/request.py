"""Reading InferenceRequest text protos (pbtxt), their volume fields and ``--bounding_box`` values,
with clear errors."""

from __future__ import annotations

from google.protobuf import text_format

from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.inference import inference_pb2
from ffn.io.textproto import parse_text_proto, read_text_proto
from ffn.utils import bounding_box_pb2


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


def hdf5_spec(volume, field: str) -> str:
  """The ``file.h5:dataset`` of a DecoratedVolume proto field; anything else -> FFNError naming it.

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
  parts = volume.hdf5.split(":")
  if len(parts) != 2 or not all(parts):
    raise FFNError(f"inference request: {field}.hdf5 must be 'file.h5:dataset', got {volume.hdf5!r}")
  return volume.hdf5


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
