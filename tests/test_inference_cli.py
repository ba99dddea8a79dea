"""``ffn run_inference`` on bad input: one clear line on stderr, exit 2, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from ffn.errors import FFNError

from ffn.cli import main

GOOD = {
    "image": '{{ hdf5: "{img}:raw" }}',
    "image_mean": "128",
    "image_stddev": "33",
    "seed_policy": '"PolicyPeaks"',
    "model_checkpoint_path": '"{ckpt}"',
    "model_name": '"convstack_3d.ConvStack3DFFNModel"',
    "model_args": r'"{{\"depth\": 12, \"fov_size\": [33, 33, 33], \"deltas\": [8, 8, 8]}}"',
    "segmentation_output_dir": '"{out}"',
    "inference_options": "{{ init_activation: 0.95 pad_value: 0.05 move_threshold: 0.9 "
                         "segment_threshold: 0.6 min_segment_size: 1000 }}",
}


@pytest.fixture()
def setup(tmp_path, sample_fib25):
  img = tmp_path / "img.h5"
  with h5py.File(img, "w") as f:
    f["raw"] = np.full((40, 40, 40), 128, np.uint8)
  ckpt = sample_fib25 / "model" / "model.ckpt-27465036"
  return {"img": str(img), "ckpt": str(ckpt), "out": str(tmp_path / "out"), "dir": tmp_path}


def write_request(setup, **changes) -> str:
  fields = dict(GOOD)
  fields.update(changes)
  text = "\n".join(f"{k}: {v}" if not v.startswith("{") else f"{k} {v}"
                   for k, v in fields.items() if v is not None)
  path = setup["dir"] / "req.pbtxt"
  path.write_text(text.format(**setup))
  return str(path)


def tree(root: Path) -> dict[str, tuple[int, int]]:
  """Every file and folder under ``root``: relative path -> (size in bytes, mtime in ns)."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      stat = os.stat(os.path.join(folder, name))
      out[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
  return out


def run_bad(setup, capsys, req: str, *flags: str) -> str:
  """Runs ``ffn run_inference`` expecting bad input: exit 2, exactly one line on stderr, nothing on
  stdout, and no file or folder created or changed under the test's folder; returns the line."""
  before = tree(setup["dir"])
  code = main(["run_inference", f"--inference_request={req}", *flags])
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert code == 2, captured.err
  assert len(lines) == 1 and lines[0].startswith("ffn run_inference: error: "), captured.err
  assert captured.out == ""
  assert tree(setup["dir"]) == before
  return lines[0]


@pytest.mark.parametrize("change,expect", [
    ({"image": '{{ hdf5: "{dir}/nope.h5:raw" }}'}, "nope.h5: file not found"),
    ({"image": '{{ hdf5: "{img}:missing" }}'}, "no dataset 'missing'"),
    ({"model_checkpoint_path": '"{dir}/model.ckpt-1"'}, "checkpoint not found"),
    ({"seed_policy": '"PolicyBogus"'}, "unknown policy 'PolicyBogus'"),
    ({"model_name": '"nonexistent.Model"'}, "unknown model_name 'nonexistent.Model'"),
    ({"seed_policy_args": '"{{not json"'}, "seed_policy_args: not valid JSON"),
    ({"segmentation_output_dir": None}, "segmentation_output_dir is not set"),
])
def test_bad_request(setup, capsys, change, expect):
  assert expect in run_bad(setup, capsys, write_request(setup, **change))


def test_malformed_pbtxt(setup, capsys):
  path = setup["dir"] / "bad.pbtxt"
  path.write_text('image_mean: 128\nimage_stddev: "abc"\n')
  err = run_bad(setup, capsys, str(path))
  assert "bad.pbtxt" in err and "2:" in err


@pytest.mark.parametrize("box,expect", [
    ("start { x: 20 y: 0 z: 0 } size { x: 30 y: 10 z: 10 }", "outside the volume"),
    ("start { x: 1 } size {", "--bounding_box"),
])
def test_bad_box(setup, capsys, box, expect):
  assert expect in run_bad(setup, capsys, write_request(setup), f"--bounding_box={box}")


def test_missing_request_file(setup, capsys):
  err = run_bad(setup, capsys, str(setup["dir"] / "none.pbtxt"))
  assert "none.pbtxt: inference request file not found" in err


def test_fields_google_ignores_are_named():
  from ffn.inference.request import parse_request
  from ffn.inference.request import google_ignored_request_fields
  request = parse_request('image { hdf5: "a.h5:raw" } batch_size: 4 reference_histogram: "h.npy" '
                          'inference_options { consistency_threshold: 0.5 } '
                          'movement_policy_args: "{}" '
                          'alignment_options { type: NO_ALIGNMENT save_raw: true }')
  assert google_ignored_request_fields(request) == ["reference_histogram"]
  plain = parse_request('image { hdf5: "a.h5:raw" }')
  assert google_ignored_request_fields(plain) == []


@pytest.mark.parametrize("args, expect", [
    ('{"deltas": [4, 8, 8]}', {"deltas_zyx": (4, 8, 8)}),
    ('{"score_threshold": 1.5, "deltas": [0, 2, 2]}', {"deltas_zyx": (0, 2, 2), "score_threshold": 1.5}),
    ("", {}),
])
def test_movement_policy_args(args, expect):
  from ffn.inference.request import parse_request
  from ffn.inference.request import movement_policy_kwargs
  request = parse_request('image { hdf5: "a.h5:raw" }')
  request.movement_policy_args = args
  assert movement_policy_kwargs(request) == expect


@pytest.mark.parametrize("args, expect", [
    ('{"deltas": [4, 8]}', "deltas must be 3 integers"),
    ('{"step": 3}', "JSON object with 'deltas'"),
    ('{"score_threshold": "high"}', "score_threshold must be a number"),
    ("{deltas", "not valid JSON"),
])
def test_bad_movement_policy_args(args, expect):
  from ffn.inference.request import parse_request
  from ffn.inference.request import movement_policy_kwargs
  request = parse_request('image { hdf5: "a.h5:raw" }')
  request.movement_policy_args = args
  with pytest.raises(FFNError, match=expect):
    movement_policy_kwargs(request)


def test_compute_options_reach_the_model(setup):
  from ffn.inference.request import load_request
  from ffn.inference.runner import Runner
  runner = Runner(load_request(write_request(setup)), compute_dtype="float16", jit_compile=True)
  runner.load_model()
  assert runner.predict.compute_dtype == "float16" and runner.predict.jit_compile


@pytest.mark.parametrize("flags, expect", [
    (["--batch_size=0"], "--batch_size"),
    (["--concurrent_requests=-1"], "--concurrent_requests"),
    (["--subvolume_size=0,20,20"], "subvolume size must be positive"),
    (["--subvolume_size=20,20"], "--subvolume_size: expected 3 integers"),
    (["--subvolume_size=20,20,20", "--overlap=20,0,0"], "overlap must be >= 0 and smaller"),
])
def test_bad_executor_flags(setup, capsys, flags, expect):
  assert expect in run_bad(setup, capsys, write_request(setup), *flags)
