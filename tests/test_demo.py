"""The README's first command, ``ffn demo``, end to end on the shipped sample (google's 100^3
benchmark box, float32, the inference as a local job)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ffn.cli import main
from ffn.inference.request import load_request
from ffn.quiet_tf import is_noise



def _run_demo(out: Path) -> tuple[int, str]:
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status = main(["demo", "--output_dir", str(out), "--cluster", "local"])
  return status, stdout.getvalue()


def _job_dirs(out: Path) -> list[str]:
  """Job ids that have a log folder (submitit names the folders by job id)."""
  return sorted(p.name for p in (out / "jobs" / "logs").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
  """One full demo run (google's 100^3 box, float32, inference as a local job)."""
  out = tmp_path_factory.mktemp("demo") / "out"
  status, printed = _run_demo(out)
  assert status == 0, printed
  return out, printed


def test_demo_outputs_exist_and_are_printed(demo):
  out, printed = demo
  seg = out / "segmentation" / "25" / "25" / "seg-25_25_25.npz"
  for path in (out / "prepare" / "partitions.h5", out / "prepare" / "coordinates.tfrecord.gz",
               out / "neuroglancer", out / "request.pbtxt", seg, out / "segmentation.h5",
               out / "preview.png", out / "scores.json"):
    assert path.exists(), path
    assert str(path) in printed, path
  assert (out / "neuroglancer" / "segmentation" / "info").exists()
  assert (out / "neuroglancer" / "image" / "info").exists()
  with np.load(seg) as result:
    assert result["segmentation"].shape == (100, 100, 100)
  # the viewer hint comes last, once the folder it names exists
  last = printed.rstrip().splitlines()[-1]
  assert last.startswith(f"view it in Neuroglancer: ffn serve {out / 'neuroglancer'}")
  assert printed.index("demo outputs:") < printed.index(last)


def test_demo_says_why_it_does_not_use_the_sample_stats(demo):
  out, printed = demo
  stats = json.loads((out / "prepare" / "image_stats.json").read_text())
  request = load_request(str(out / "request.pbtxt"))
  assert (request.image_mean, request.image_stddev) == (128, 33)  # google's training values
  assert (round(stats["mean"]), round(stats["stddev"])) == (133, 35)  # this crop's
  note = next(line for line in printed.splitlines() if line.strip().startswith("normalisation:"))
  assert "--image_mean 128 --image_stddev 33" in note and "trained with" in note
  assert "133/35" in note and "training a new model" in note
  assert printed.index("[1/4]") < printed.index(note) < printed.index("[3/4]")


def test_job_log_is_free_of_tensorflow_noise_and_reports_moves(demo):
  out, _ = demo
  (log,) = (out / "jobs" / "logs").glob("*/*_0_log.err")
  lines = log.read_text().splitlines()
  assert not [line for line in lines if is_noise(line) or "remapper failed" in line]
  final = [line for line in lines if "inference seeds" in line and "(done in " in line]
  assert len(final) == 1 and re.search(r", \d+ FOV moves \(", final[0])


def test_rerun_of_finished_demo_submits_nothing(demo):
  out, _ = demo
  seg = out / "segmentation" / "25" / "25" / "seg-25_25_25.npz"
  before, jobs = seg.stat().st_mtime_ns, _job_dirs(out)
  assert len(jobs) == 1
  status, printed = _run_demo(out)
  assert status == 0
  assert f"{seg} exists: not submitting a job" in printed
  assert _job_dirs(out) == jobs
  assert seg.stat().st_mtime_ns == before
  assert re.search(r"adapted_rand_error\s+0\.198\s+0\.198", printed)
