"""The console command as a new user meets it: fast --help, no TensorFlow noise around errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from ffn.cli import COMMANDS
from ffn.quiet_tf import is_noise

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "sample_data" / "fib25" / "model" / "model.ckpt-27465036"


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


# Runs `ffn <argv>` in-process and reports afterwards whether TensorFlow was imported.
_DRIVER = """
import sys
from ffn.cli import main
try:
  status = main(sys.argv[1:])
except SystemExit as e:
  status = e.code
print("tensorflow imported:", "tensorflow" in sys.modules)
sys.exit(status)
"""


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_does_not_import_tensorflow(command):
  result = _python(_DRIVER, command, "--help")
  assert result.returncode == 0, result.stderr
  assert f"usage: ffn {command}" in result.stdout
  assert result.stdout.rstrip().endswith("tensorflow imported: False"), result.stdout[-300:]
  assert result.stderr == ""


def test_help_of_script_entry_point_does_not_import_tensorflow():
  result = subprocess.run([sys.executable, "-X", "importtime", "run_inference.py", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0
  assert "--inference_request" in result.stdout
  imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")]
  assert "ffn.cli" in imported
  assert not [name for name in imported if name.split(".")[0] == "tensorflow"]


def test_bad_input_after_tensorflow_import_is_one_line(tmp_path):
  """A missing checkpoint is found after TensorFlow is imported: still exactly one stderr line."""
  request = (REPO / "configs" / "inference_training_sample2.pbtxt").read_text()
  request = request.replace("sample_data/fib25/model/model.ckpt-27465036",
                            str(tmp_path / "missing" / "model.ckpt-1"))
  request = request.replace('hdf5: "sample_data/', f'hdf5: "{REPO}/sample_data/')
  request = request.replace('segmentation_output_dir: "', f'segmentation_output_dir: "{tmp_path}/')
  assert str(tmp_path / "missing") in request and f"{tmp_path}/" in request
  path = tmp_path / "request.pbtxt"
  path.write_text(request)
  result = _python(_DRIVER, "run_inference", "--inference_request", str(path), "--bounding_box",
                   "start { x: 25 y: 25 z: 25 } size { x: 40 y: 40 z: 40 }")
  assert result.returncode == 2
  assert result.stdout.strip() == "tensorflow imported: True"
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("ffn run_inference: error: ") and "missing" in lines[0]
  assert [p.name for p in tmp_path.iterdir()] == ["request.pbtxt"]  # nothing written


def test_model_evaluation_prints_no_tensorflow_lines():
  """Import, model load and one evaluation (where grappler's remapper pass used to fail with an
  E-line) print nothing on stderr. (The logits themselves are checked in tests/test_models.py.)"""
  code = f"""
import numpy as np
from ffn import quiet_tf
quiet_tf.install()
from ffn import models
model = models.load({str(CHECKPOINT)!r}, "convstack_3d.ConvStack3DFFNModel",
                    '{{"depth": 12, "fov_size": [33, 33, 33], "deltas": [8, 8, 8]}}')
x = np.random.default_rng(0).standard_normal((1, 33, 33, 33, 2)).astype(np.float32)
print(np.asarray(model(x)).shape)
"""
  result = _python(code)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "(1, 33, 33, 33, 1)"
  assert result.stderr == ""


@pytest.mark.parametrize("line,noise", [
    ("I0000 00:00:1796151183.147950   24883 port.cc:153] oneDNN custom operations are on.", True),
    ("W0000 00:00:1796151183.147950   24883 cpu_feature_guard.cc:1] x", True),
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", True),
    ("2024-01-01 12:00:00.000001: I tensorflow/core/util/port.cc:113] oneDNN", True),
    ("E0000 00:00:1796151183.147950   24883 meta_optimizer.cc:967] remapper failed", False),
    ("F0000 00:00:1796151183.147950   24883 x.cc:1] Check failed", False),
    ("ffn run_inference: error: x", False),
    ("Traceback (most recent call last):", False),
])
def test_noise_filter_keeps_errors(line, noise):
  assert is_noise(line) is noise


def test_missing_tensorflow_is_one_line(tmp_path):
  """An environment without TensorFlow (e.g. the CPU/GPU extra left out): one line, exit 2."""
  code = ("import sys; sys.modules['tensorflow'] = None  # makes `import tensorflow` fail\n"
          "from ffn.cli import main; sys.exit(main(sys.argv[1:]))")
  result = _python(code, "train", "--train_coords", str(tmp_path / "c.tfrecord"), "--data_volumes",
                   "a:x.h5:raw", "--label_volumes", "a:x.h5:stack", "--model_name",
                   "convstack_3d.ConvStack3DFFNModel", "--model_args", "{}", "--image_mean", "1",
                   "--image_stddev", "1", "--train_dir", str(tmp_path / "run"))
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      f"ffn train: error: TensorFlow is not installed in {sys.prefix} (README.md: "
      "'Installing by hand, GPU')"]
  assert list(tmp_path.iterdir()) == []
