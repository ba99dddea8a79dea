"""Catalogue of bad input across the commands: each is refused with exit status 2, exactly one
stderr line (log lines included) naming the file or field and the problem, and no new or changed
file anywhere under the test's data folder (where every output location lies).

Commands run in-process through :func:`ffn.cli.main` (stderr and the root logger captured).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import SAMPLE_CKPT, SAMPLE_CROP
from ffn.cli import main
from ffn.inference import storage

FFN_ARGS = '{\\"depth\\": 12, \\"fov_size\\": [33, 33, 33], \\"deltas\\": [8, 8, 8]}'


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_fib25) -> Path:
  """Inputs, good and bad, in one folder (outputs of the cases go below it too)."""
  root = tmp_path_factory.mktemp("bad_input")
  with h5py.File(SAMPLE_CROP, "r") as f:
    raw, stack = f["raw"][:40, :40, :40], f["stack"][:40, :40, :40]
  with h5py.File(root / "good.h5", "w") as f:
    f["raw"], f["stack"] = raw, stack
    f["flat2d"] = raw[0]
    f["empty"] = np.zeros((0, 40, 40), np.uint8)
    f["float"] = raw.astype(np.float32)
    f["vol4d"] = np.stack([raw, raw])
    f["small"] = stack[:20]
    f["bool"] = raw > 100
    f["negative"] = -stack.astype(np.int64)  # ids below 0: garbage that would score "fine"
  (root / "corrupt.h5").write_bytes(np.random.default_rng(0).bytes(4096))
  (root / "coords.tfrecord.gz").write_bytes(b"\x1f\x8b\x08\x00" + np.random.default_rng(1).bytes(500))
  (root / "badckpt").mkdir()
  (root / "badckpt" / "model.ckpt-1.index").write_bytes(b"not a checkpoint index")
  (root / "badckpt" / "model.ckpt-1.data-00000-of-00001").write_bytes(b"garbage")
  seg = np.zeros((40, 40, 40), np.uint32)
  seg[:20] = 1
  storage.save_subvolume(seg[:30], {}, str(root / "result" / "0" / "0" / "seg-0_0_0.npz"))
  import tifffile
  tifffile.imwrite(root / "rgb.tif", np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
  (root / "plain_file").write_text("x")
  (root / "a_folder").mkdir()
  return root


def request_text(root: Path, **fields: str) -> str:
  """An InferenceRequest for the 40^3 test image with the shipped model; ``fields`` replace or
  add top-level fields (``name=None`` text: the field's whole text)."""
  base = {
      "image": f'image {{ hdf5: "{root}/good.h5:raw" }}',
      "image_mean": "image_mean: 128", "image_stddev": "image_stddev: 33",
      "seed_policy": 'seed_policy: "PolicyPeaks"',
      "model_checkpoint_path": f'model_checkpoint_path: "{SAMPLE_CKPT}"',
      "model_name": 'model_name: "convstack_3d.ConvStack3DFFNModel"',
      "model_args": f'model_args: "{FFN_ARGS}"',
      "segmentation_output_dir": f'segmentation_output_dir: "{root}/out"',
      "inference_options": ("inference_options { init_activation: 0.95 pad_value: 0.05 "
                            "move_threshold: 0.9 segment_threshold: 0.6 min_segment_size: 100 }"),
  }
  base.update(fields)
  return "\n".join(base.values())


def _snapshot(root: Path) -> dict[str, tuple]:
  return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob("*"))}


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
  """``ffn <argv>`` in-process: (exit status, stderr lines, log records included)."""
  err = io.StringIO()
  handler = logging.StreamHandler(err)
  handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
  root_logger = logging.getLogger()
  root_logger.addHandler(handler)
  level = root_logger.level
  root_logger.setLevel(logging.INFO)
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      try:
        status = main(argv)
      except SystemExit as e:  # argparse
        status = e.code
  finally:
    root_logger.removeHandler(handler)
    root_logger.setLevel(level)
  return status, err.getvalue().splitlines()


def _request_file(root: Path, name: str, text: str) -> str:
  path = root / "requests" / f"{name}.pbtxt"
  path.parent.mkdir(exist_ok=True)
  path.write_text(text)
  return str(path)


BOX = "start { x: 0 y: 0 z: 0 } size { x: 40 y: 40 z: 40 }"


def _inference(name: str, box: str = BOX, **fields: str):
  """A run_inference case: the request file is written by the fixture step of the test."""
  return ("run_inference", name, fields, box)


BOX_30 = "start { x: 0 y: 0 z: 0 } size { x: 40 y: 40 z: 30 }"  # the stored result's box
CONSENSUS = ('segmentation1 {{ directory: "{{r}}/result" }} segmentation2 {{ directory: "{{r}}/result" }} '
             'segmentation_output_dir: "{{r}}/{out}" type: CONSENSUS_SPLIT')

# (command, case id, argv with {r} for the data folder, substrings of the one error line)
CASES = [
    ("stats", "missing file", ["--input", "{r}/nope.h5:raw"], ["nope.h5: file not found"]),
    ("stats", "wrong dataset", ["--input", "{r}/good.h5:nope"], ["good.h5: no dataset 'nope'", "raw"]),
    ("stats", "2D dataset", ["--input", "{r}/good.h5:flat2d", "--output", "{r}/s.json"],
     ["good.h5:flat2d: expected a 3D (z,y,x) volume, got shape [40, 40]"]),
    ("stats", "empty volume", ["--input", "{r}/good.h5:empty"], ["good.h5:empty: the volume is empty"]),
    ("stats", "4D volume where channels make no sense", ["--input", "{r}/good.h5:vol4d"],
     ["good.h5:vol4d: expected a 3D (z,y,x) volume, got shape [2, 40, 40, 40]"]),
    ("stats", "wrong dtype", ["--input", "{r}/good.h5:float", "--output", "{r}/s.json"],
     ["good.h5:float", "uint8", "float32"]),
    ("stats", "corrupt HDF5", ["--input", "{r}/corrupt.h5:raw"], ["corrupt.h5: not a readable HDF5 file"]),
    ("stats", "box outside", ["--input", "{r}/good.h5:raw", "--bounding_box_start", "30,0,0",
                              "--bounding_box_size", "20,5,5"], ["outside the volume of size [40, 40, 40]"]),
    ("stats", "negative box", ["--input", "{r}/good.h5:raw", "--bounding_box_start=-5,0,0",
                               "--bounding_box_size", "5,5,5"], ["start=[-5, 0, 0]", "outside the volume"]),
    ("stats", "colour TIFF", ["--input", "{r}/rgb.tif"], ["rgb.tif: expected a single-channel 2D slice"]),
    ("stats", "unknown TensorStore scheme", ["--input", "s3://bucket/raw"], ["unknown scheme 's3://'"]),
    ("stats", "missing zarr", ["--input", "zarr://{r}/none.zarr"], ["none.zarr: file or directory not found"]),
    ("convert", "colour TIFF", ["--input", "{r}/rgb.tif", "--output", "{r}/conv.h5:raw"],
     ["rgb.tif: expected a single-channel 2D slice"]),
    ("compute_partitions", "float labels", ["--input_volume", "{r}/good.h5:float", "--output_volume",
                                            "{r}/af.h5:af", "--thresholds", "0.1", "--lom_radius", "4,4,4"],
     ["good.h5:float", "float32"]),
    ("compute_partitions", "malformed thresholds", ["--input_volume", "{r}/good.h5:stack", "--output_volume",
                                                    "{r}/af.h5:af", "--thresholds", "a,b", "--lom_radius", "4"],
     ["thresholds: expected comma-separated numbers"]),
    ("build_coordinates", "corrupt partitions", ["--partition_volumes", "p:{r}/corrupt.h5:af",
                                                 "--coordinate_output", "{r}/c.tfr", "--margin", "4,4,4"],
     ["corrupt.h5: not a readable HDF5 file"]),
    ("build_coordinates", "unnamed volume", ["--partition_volumes", "{r}/good.h5:raw",
                                             "--coordinate_output", "{r}/c.tfr", "--margin", "4,4,4"],
     ["a name is required here"]),
    ("evaluate", "mismatched shapes", ["--segmentation", "{r}/result/0/0/seg-0_0_0.npz", "--groundtruth",
                                       "{r}/good.h5:small", "--output_json", "{r}/scores.json"],
     ["good.h5:small", "outside the volume of size [40, 40, 20]"]),
    ("evaluate", "negative ground-truth ids", ["--segmentation", "{r}/good.h5:stack", "--groundtruth",
                                               "{r}/good.h5:negative", "--output_json", "{r}/scores.json"],
     ["good.h5:negative", "negative ids"]),
    ("stats", "output is a directory", ["--input", "{r}/good.h5:raw", "--output", "{r}/a_folder"],
     ["a_folder: is a directory"]),
    ("evaluate", "missing segmentation", ["--segmentation", "{r}/none.npz", "--groundtruth", "{r}/good.h5:stack"],
     ["none.npz: segmentation file not found"]),
    ("export", "unwritable output", ["--segmentation", "{r}/result/0/0/seg-0_0_0.npz", "--format", "h5",
                                     "--output", "{r}/plain_file/sub/seg.h5:seg"],
     ["cannot create output directory"]),
    ("serve", "missing folder", ["{r}/no_such_dir"], ["no_such_dir"]),
    ("batch_status", "not a run", ["{r}/result"], ["result"]),
    ("stitch", "no results", ["--segmentation_dir", "{r}/requests_none", "--output", "{r}/st.h5:seg"],
     ["requests_none"]),
    ("consensus", "existing output", ["--consensus_request", CONSENSUS.format(out="cons_existing"),
                                      "--bounding_box", BOX_30, "--output_h5", "{r}/good.h5:raw"],
     ["--output_h5: {r}/good.h5:raw already exists"]),
    ("consensus", "malformed request", ["--consensus_request", "segmentation1 { directory: ",
                                        "--bounding_box", BOX_30], ["ConsensusRequest"]),
    ("consensus", "missing segmentation", ["--consensus_request", CONSENSUS.format(out="cons_missing").replace(
                                                 '{r}/result" } seg', '{r}/none" } seg'), "--bounding_box", BOX_30], ["none"]),
    ("train", "label dataset missing",
     ["--train_coords", "{r}/coords.tfrecord.gz", "--data_volumes", "s:{r}/good.h5:raw", "--label_volumes",
      "s:{r}/good.h5:labels", "--model_name", "convstack_3d.ConvStack3DFFNModel", "--model_args",
      '{"depth": 1, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}', "--image_mean", "128", "--image_stddev",
      "33", "--train_dir", "{r}/train"], ["good.h5: no dataset 'labels'"]),
    ("train", "corrupt coordinate file",
     ["--train_coords", "{r}/coords.tfrecord.gz", "--data_volumes", "s:{r}/good.h5:raw", "--label_volumes",
      "s:{r}/good.h5:stack", "--model_name", "convstack_3d.ConvStack3DFFNModel", "--model_args",
      '{"depth": 1, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}', "--image_mean", "128", "--image_stddev",
      "33", "--train_dir", "{r}/train"], ["coords.tfrecord.gz"]),
    ("train", "mismatched shapes",
     ["--train_coords", "{r}/coords.tfrecord.gz", "--data_volumes", "s:{r}/good.h5:raw", "--label_volumes",
      "s:{r}/good.h5:small", "--model_name", "convstack_3d.ConvStack3DFFNModel", "--model_args",
      '{"depth": 1, "fov_size": [9, 9, 9], "deltas": [2, 2, 2]}', "--image_mean", "128", "--image_stddev",
      "33", "--train_dir", "{r}/train"], ["image shape", "label shape"]),
    ("train", "unknown model",
     ["--train_coords", "{r}/coords.tfrecord.gz", "--data_volumes", "s:{r}/good.h5:raw", "--label_volumes",
      "s:{r}/good.h5:stack", "--model_name", "nope.Model", "--model_args", "{}", "--image_mean", "128",
      "--image_stddev", "33", "--train_dir", "{r}/train"], ["nope.Model"]),
]

INFERENCE = [
    ("malformed pbtxt", {"inference_options": "inference_options { init_activation: 0.95"},
     ["malformed InferenceRequest text proto: 9:38"]),
    ("unknown field", {"colour": "colour: 3"}, ["colour"]),
    ("unknown seed policy", {"seed_policy": 'seed_policy: "PolicyNope"'}, ["unknown policy 'PolicyNope'"]),
    ("seed policy argument type", {"seed_policy": 'seed_policy: "PolicyGrid3d" seed_policy_args: '
                                                  '"{\\"step\\": \\"a\\"}"'},
     ["seed_policy_args.step of PolicyGrid3d must be an integer"]),
    ("seed policy corner", {"seed_policy": 'seed_policy: "PolicyInvertOrigins" seed_policy_args: '
                                           '"{\\"segmentation_dir\\": \\"x\\", \\"corner\\": [1, 2]}"'},
     ["corner of PolicyInvertOrigins must be 3 integers"]),
    ("movement deltas beyond the FoV", {"movement": 'movement_policy_args: "{\\"deltas\\": [17, 8, 8]}"'},
     ["movement_policy_args deltas [17, 8, 8] (z,y,x) must be at most"]),
    ("missing checkpoint", {"model_checkpoint_path": 'model_checkpoint_path: "{r}/none/model.ckpt-1"'},
     ["none/model.ckpt-1"]),
    ("corrupt checkpoint", {"model_checkpoint_path": 'model_checkpoint_path: "{r}/badckpt/model.ckpt-1"'},
     ["badckpt/model.ckpt-1"]),
    ("unknown model", {"model_name": 'model_name: "nope.Model"'}, ["nope.Model"]),
    ("unwritable output", {"segmentation_output_dir": 'segmentation_output_dir: "{r}/plain_file/out"'},
     ["segmentation_output_dir", "plain_file is not a directory"]),
    ("2D image", {"image": 'image { hdf5: "{r}/good.h5:flat2d" }'}, ["good.h5:flat2d: expected a 3D"]),
    ("image dtype", {"image": 'image { hdf5: "{r}/good.h5:bool" }'}, ["good.h5:bool: dtype bool is not allowed"]),
    ("mask dataset missing", {"masks": 'masks { volume { mask { hdf5: "{r}/good.h5:nomask" } '
                                       'channels { channel: 0 values: 1 } } }'},
     ["good.h5: no dataset 'nomask'", "masks[0].volume.mask"]),
    ("bad coordinate expression", {"masks": 'masks { coordinate_expression { expression: "z <" } }'},
     ["masks[0].coordinate_expression 'z <' is not a Python expression"]),
    ("init_segmentation dtype", {"init": 'init_segmentation { hdf5: "{r}/good.h5:float" }'},
     ["good.h5:float", "dtype float32"]),
]
INFERENCE_BOXES = [
    ("box outside", "start { x: 10 y: 0 z: 0 } size { x: 40 y: 40 z: 40 }", ["outside the volume"]),
    ("negative box", "start { x: -1 y: 0 z: 0 } size { x: 10 y: 10 z: 10 }", ["start=[-1, 0, 0]"]),
    ("malformed box", "start { x: 1 ", ["--bounding_box: malformed"]),
]


def _check(data: Path, command: str, argv: list[str], expect: list[str]) -> None:
  before = _snapshot(data)
  status, lines = run_cli([command] + [a.replace("{r}", str(data)) for a in argv])
  assert status == 2, lines
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"ffn {command}: error: "), lines
  for text in expect:
    assert text.replace("{r}", str(data)) in lines[0], (text, lines[0])
  assert _snapshot(data) == before


@pytest.mark.parametrize("command,argv,expect", [c[:1] + c[2:] for c in CASES], ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(data, command, argv, expect):
  _check(data, command, argv, expect)


@pytest.mark.parametrize("fields,expect", [c[1:] for c in INFERENCE], ids=[c[0] for c in INFERENCE])
def test_bad_inference_request_is_one_line_and_writes_nothing(data, fields, expect):
  fields = {k: v.replace("{r}", str(data)) for k, v in fields.items()}
  name = hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:8]
  fields.setdefault("segmentation_output_dir", f'segmentation_output_dir: "{data}/out_{name}"')
  path = _request_file(data, name, request_text(data, **fields))
  _check(data, "run_inference", ["--inference_request", path, "--bounding_box", BOX], expect)


@pytest.mark.parametrize("box,expect", [c[1:] for c in INFERENCE_BOXES], ids=[c[0] for c in INFERENCE_BOXES])
def test_bad_inference_box_is_one_line_and_writes_nothing(data, box, expect):
  path = _request_file(data, "good", request_text(data))
  _check(data, "run_inference", ["--inference_request", path, "--bounding_box", box], expect)
