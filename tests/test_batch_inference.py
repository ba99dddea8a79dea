"""Tests of ``ffn batch_inference`` / ``ffn batch_status`` on the shipped FIB-25 sample.

Every chunk of a batch run must be exactly the result ``ffn run_inference --subvolume_size`` gives
for the same chunk (same box, tiling, request, compute dtype): the reference below is that
command, run in this process. Networks run in bfloat16 on chunks of 48^3 (~2 s each here).
Tests marked ``slurm`` submit real job arrays to the Slurm cluster answering ``sinfo``
(tests/slurm_cluster.py: they check the job fits first, and cancel their jobs at teardown).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ffn.axes import BoundingBox, split_box
from ffn.cli import main
from ffn.inference import storage
from ffn.inference.request import format_bounding_box
from slurm.executor import SlurmOptions
from slurm_cluster import RequeueHold, require_fit, slurm_job_name  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]
BOX = BoundingBox((40, 40, 40), (64, 64, 64))
TILING = ["--subvolume_size", "48,48,48", "--overlap", "32,32,32"]
CHUNKS = split_box(BOX, (48, 48, 48), (32, 32, 32))  # 8 chunks of 48^3
COMMON = ["--bounding_box", format_bounding_box(BOX), *TILING, "--compute_dtype", "bfloat16"]


def _request(path: Path, out: Path, seed_policy: str = "PolicyPeaks", seed_args: str = "") -> str:
  """configs/inference_training_sample2.pbtxt with absolute sample paths and output ``out``."""
  text = (REPO / "configs" / "inference_training_sample2.pbtxt").read_text()
  text = text.replace('"sample_data/', f'"{REPO}/sample_data/')
  text = text.replace('"results/fib25/training2"', json.dumps(str(out)))
  text = text.replace('seed_policy: "PolicyPeaks"', f'seed_policy: "{seed_policy}"'
                      + (f"\nseed_policy_args: {json.dumps(seed_args)}" if seed_args else ""))
  path.write_text(text)
  return str(path)


def _chunk(out: Path, box: BoundingBox) -> tuple[np.ndarray, dict]:
  with np.load(storage.segmentation_path(str(out), box.start[::-1]), allow_pickle=True) as data:
    return data["segmentation"], data["origins"].item()


def _assert_same_chunks(out: Path, reference: Path, boxes=CHUNKS) -> None:
  for box in boxes:
    seg, origins = _chunk(out, box)
    ref_seg, ref_origins = _chunk(reference, box)
    np.testing.assert_array_equal(seg, ref_seg, err_msg=f"chunk {box}")
    assert {k: v.start_zyx for k, v in origins.items()} == {
        k: v.start_zyx for k, v in ref_origins.items()}, f"chunk {box}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """``ffn run_inference --subvolume_size`` of the 8 chunks (bfloat16), run here."""
  root = tmp_path_factory.mktemp("reference")
  out = root / "out"
  assert main(["run_inference", "--inference_request", _request(root / "req.pbtxt", out),
               *COMMON]) == 0
  labels = [_chunk(out, box)[0] for box in CHUNKS]
  assert all(len(np.unique(seg)) >= 2 for seg in labels)  # an object (>= 1000 voxels) in each
  return out


def _files(root: Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, message", [
    (["--subvolume_size", "48,48,48", "--overlap", "48,0,0"],
     "overlap must be >= 0 and smaller than the subvolume size"),
    (["--subvolume_size", "48,x,48"], "--subvolume_size: expected integers 'x,y,z'"),
    (["--subvolume_size", "0,48,48"], "subvolume size must be positive"),
    (["--subvolume_size", "48", "--chunks_per_task", "0"], "--chunks_per_task must be >= 1"),
    (["--subvolume_size", "48", "--num_tasks", "0"], "--num_tasks must be >= 1"),
    (["--subvolume_size", "48", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--bounding_box", "start { x:0 y:0 z:0 } size { x:200 y:10 z:10 }"], "outside"),
])
def test_bad_flags_one_line_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            flags: list[str], message: str) -> None:
  request = _request(tmp_path / "req.pbtxt", tmp_path / "out")
  assert main(["batch_inference", "--inference_request", request, "--cluster", "local",
               *flags]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("ffn batch_inference: error: ") and len(err.splitlines()) == 1
  assert message in err
  assert _files(tmp_path) == ["req.pbtxt"]


def test_manifest_mismatch_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
  """A run into the same directory with another tiling or request is refused; nothing changes."""
  from ffn.inference.batch import add_arguments, prepare, write_manifests
  request = _request(tmp_path / "req.pbtxt", tmp_path / "out")
  parser = argparse.ArgumentParser()
  add_arguments(parser)
  run_dir, worker, items, manifest = prepare(parser.parse_args(
      ["--inference_request", request, *COMMON]))
  write_manifests(worker, items, manifest)
  assert run_dir == tmp_path / "out" / "batch"
  before = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path) if (tmp_path / p).is_file()}
  for flags, key in ((["--overlap", "16,16,16"], "'overlap'"),
                     (["--compute_dtype", "float32"], "'compute_dtype'"),
                     (["--bounding_box", format_bounding_box(BoundingBox((40, 40, 40), (64, 64, 80)))],
                      "'bounding_box'")):
    assert main(["batch_inference", "--inference_request", request, *COMMON, *flags,
                 "--cluster", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"this run's {key} differs from the existing run's" in err
    assert str(run_dir / "manifest.json") in err
  _request(tmp_path / "req.pbtxt", tmp_path / "out", seed_policy="PolicyMax")
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--cluster", "local"]) == 2
  assert "this run's 'requests' differs" in capsys.readouterr().err
  after = {p: (tmp_path / p).read_bytes() for p in _files(tmp_path) if (tmp_path / p).is_file()}
  assert set(after) == set(before)
  assert all(after[p] == before[p] for p in before if p != "req.pbtxt")


def test_foreign_results_and_shared_output_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
  out = tmp_path / "out"
  storage.save_subvolume(np.zeros((4, 4, 4), np.uint8), {}, storage.segmentation_path(
      str(out), (0, 0, 0)))
  request = _request(tmp_path / "req.pbtxt", out)
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--cluster", "local"]) == 2
  assert "holds results of another run (no batch/manifest.json)" in capsys.readouterr().err
  assert not (out / "batch").exists()
  assert main(["batch_inference", "--inference_request", request, "--inference_request", request,
               *COMMON]) == 2
  assert "every request needs its own segmentation_output_dir" in capsys.readouterr().err


# ------------------------------------------------------------------------- local cluster

def test_forward_then_reverse_on_each_chunk_local(tmp_path: Path) -> None:
  """Two requests run in order on each chunk: the reverse (PolicyInvertOrigins) request reads
  the forward result of the same chunk; both equal run_inference's (runs without Slurm)."""
  box = BoundingBox((40, 40, 40), (64, 48, 48))  # 2 chunks along x
  flags = ["--bounding_box", format_bounding_box(box), *TILING, "--compute_dtype", "bfloat16"]
  chunks = split_box(box, (48, 48, 48), (32, 32, 32))
  assert len(chunks) == 2
  results = {}
  for name in ("ref", "batch"):
    fwd, rev = tmp_path / name / "fwd", tmp_path / name / "rev"
    requests = [_request(tmp_path / f"{name}-fwd.pbtxt", fwd),
                _request(tmp_path / f"{name}-rev.pbtxt", rev, "PolicyInvertOrigins",
                         json.dumps({"segmentation_dir": str(fwd)}))]
    if name == "ref":
      for request in requests:
        assert main(["run_inference", "--inference_request", request, *flags]) == 0
    else:
      assert main(["batch_inference", "--inference_request", requests[0], "--inference_request",
                   requests[1], *flags, "--cluster", "local", "--num_tasks", "1", "--wait"]) == 0
    results[name] = (fwd, rev)
  for got, want in zip(results["batch"], results["ref"]):
    _assert_same_chunks(got, want, chunks)
  # Both output directories carry the run's manifest.
  fwd, rev = results["batch"]
  assert (fwd / "batch" / "manifest.json").read_bytes() == (rev / "batch" / "manifest.json").read_bytes()
  task = json.loads((fwd / "batch" / "tasks" / "0001_0.json").read_text())
  assert task["state"] == "finished" and sorted(task["seconds"]) == sorted(
      "_".join(str(v) for v in c.start) for c in chunks)


# ----------------------------------------------------------------------------- real Slurm

def _slurm_options(job_name: str) -> list[str]:
  return ["--cluster", "slurm", "--slurm_job_name", job_name, "--slurm_time_min", "20",
          "--slurm_cpus_per_task", "1", "--slurm_mem_gb", "3"]


def _fit(job_name: str) -> None:
  require_fit(SlurmOptions(cluster="slurm", job_name=job_name, time_min=20, cpus_per_task=1,
                           mem_gb=3))


@pytest.mark.slurm
def test_slurm_array_matches_run_inference(tmp_path: Path, reference: Path, slurm_job_name: str,
                                           capsys: pytest.CaptureFixture) -> None:
  _fit(slurm_job_name)
  out = tmp_path / "out"
  request = _request(tmp_path / "req.pbtxt", out)
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--num_tasks", "3",
               "--concurrent_requests", "2", "--batch_size", "2", "--wait",
               *_slurm_options(slurm_job_name)]) == 0
  _assert_same_chunks(out, reference)
  run_dir = out / "batch"
  (record,) = [json.loads(p.read_text()) for p in (run_dir / "submissions").glob("*.json")]
  assert record["cluster"] == "slurm" and len(record["tasks"]) == 3
  array_id = record["job_ids"][0].split("_")[0]
  assert record["job_ids"] == [f"{array_id}_{i}" for i in range(3)]
  assert sorted(len(t) for t in record["tasks"]) == [2, 3, 3]  # equal chunks: LPT splits 3/3/2
  for t in range(3):
    task = json.loads((run_dir / "tasks" / f"0001_{t}.json").read_text())
    assert task["state"] == "finished" and task["job_id"] == record["job_ids"][t]
    assert Path(task["log"]).exists()
  capsys.readouterr()
  assert main(["batch_status", str(run_dir)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (f"{run_dir}: 8 chunks (884.7 kvoxels): 8 done, 0 running, 0 failed, "
                      "0 pending (0 queued in tasks)")
  assert lines[1].startswith("throughput ") and lines[2].startswith("slowest chunks: ")
  # A rerun submits nothing.
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--wait",
               *_slurm_options(slurm_job_name)]) == 0
  assert len(list((run_dir / "submissions").glob("*.json"))) == 1


def _wait_mid_chunk(run_dir: Path, timeout_s: float = 600.0) -> dict:
  """The status of task 0 as soon as it has started its second chunk (a chunk takes >= 1 s)."""
  deadline = time.monotonic() + timeout_s
  path = run_dir / "tasks" / "0001_0.json"
  while time.monotonic() < deadline:
    if path.exists():
      data = json.loads(path.read_text())
      if data["current"] and data["seconds"]:  # one chunk finished, the next one started
        return data
    time.sleep(0.05)
  raise AssertionError(f"task 0 did not reach its second chunk within {timeout_s} s: {path}")


@pytest.mark.slurm
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_task_then_retry_failed_matches(tmp_path: Path, reference: Path, signum: int,
                                               slurm_job_name: str,
                                               capsys: pytest.CaptureFixture) -> None:
  """A task killed mid-chunk leaves its chunks failed (SIGTERM: after saving a checkpoint);
  --retry_failed finishes the run and every chunk equals the uninterrupted run's."""
  _fit(slurm_job_name)
  out = tmp_path / "out"
  request = _request(tmp_path / "req.pbtxt", out)
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--num_tasks", "1",
               *_slurm_options(slurm_job_name)]) == 0
  run_dir = out / "batch"
  data = _wait_mid_chunk(run_dir)
  (current,) = data["current"]
  os.kill(data["pid"], signum)
  deadline = time.monotonic() + 120
  while main(["batch_status", str(run_dir)]) != 1 and time.monotonic() < deadline:
    time.sleep(0.5)
  capsys.readouterr()
  assert main(["batch_status", str(run_dir)]) == 1
  printed = capsys.readouterr().out
  failed = [line for line in printed.splitlines() if line.startswith("failed: task 0001_0 ")]
  assert len(failed) == 1, printed
  expected = ("stopped by SIGTERM, state saved" if signum == signal.SIGTERM
              else f"task died (process {data['pid']} on ")
  assert expected in failed[0] and data["log"] in failed[0]
  x, y, z = (int(v) for v in current.split("_"))
  cpoint = Path(storage.checkpoint_path(str(out), (z, y, x)))
  finished = Path(storage.segmentation_path(str(out), (z, y, x))).exists()
  if signum == signal.SIGTERM:
    # SIGTERM saved the chunk's checkpoint -- unless the chunk finished first (these chunks take
    # 0.3-1.5 s, so the signal can land just after one; the next one had then not started)
    assert cpoint.exists() or finished
  else:
    assert not cpoint.exists()  # SIGKILL: nothing saved
  # Without --retry_failed nothing is submitted; with it the run finishes.
  assert main(["batch_inference", "--inference_request", request, *COMMON,
               *_slurm_options(slurm_job_name)]) == 1
  assert len(list((run_dir / "submissions").glob("*.json"))) == 1
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--retry_failed",
               "--wait", "--num_tasks", "2", *_slurm_options(slurm_job_name)]) == 0
  assert not cpoint.exists()
  _assert_same_chunks(out, reference)


@pytest.mark.slurm
def test_preempted_task_is_requeued_and_resumes(tmp_path: Path, reference: Path,
                                                slurm_job_name: str) -> None:
  """submitit's preemption signal (USR2, what Slurm sends before a time limit or preemption):
  the task saves the chunk's checkpoint, submitit requeues the same job, and the requeued run
  finishes every chunk exactly as the uninterrupted run did, with no new submission."""
  _fit(slurm_job_name)
  out = tmp_path / "out"
  request = _request(tmp_path / "req.pbtxt", out)
  assert main(["batch_inference", "--inference_request", request, *COMMON, "--num_tasks", "1",
               *_slurm_options(slurm_job_name)]) == 0
  run_dir = out / "batch"
  data = _wait_mid_chunk(run_dir)
  (current,) = data["current"]
  subprocess.run(["scancel", "--signal=USR2", data["job_id"]], check=True, timeout=30)
  x, y, z = (int(v) for v in current.split("_"))
  cpoint = Path(storage.checkpoint_path(str(out), (z, y, x)))
  path = run_dir / "tasks" / "0001_0.json"
  deadline = time.monotonic() + 600
  hold = RequeueHold(data["job_id"])  # the requeue happens; its ~2 min hold is not sat out
  while time.monotonic() < deadline:
    task = json.loads(path.read_text())
    if task["state"] == "finished":
      break
    hold.poll()
    time.sleep(0.5)
  assert task["state"] == "finished" and task["attempt"] == 2, task
  assert task["job_id"] == data["job_id"]  # the same job, requeued
  assert current in task["seconds"] and not cpoint.exists()
  log = Path(data["log"]).read_text()
  assert "Requeued job" in log and f"checkpoint saved: {cpoint}" in log
  assert len(list((run_dir / "submissions").glob("*.json"))) == 1
  _assert_same_chunks(out, reference)
