"""Batched network calls across canvases (ffn/inference/executor.py) and box splitting."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ffn.axes import BoundingBox, split_box
from ffn.errors import FFNError
from ffn.inference import storage
from ffn.inference.canvas import InferenceInterrupted
from ffn.inference.executor import BatchExecutor, ExecutorError, segment_boxes

from test_inference_canvas import _runner as _canvas_runner, oracle


def batched_oracle(x: np.ndarray) -> np.ndarray:
  """The canvas test oracle applied to every sample of a batch."""
  return np.concatenate([oracle(x[i:i + 1]) for i in range(x.shape[0])], axis=0)


# -- split_box -------------------------------------------------------------------------------------

def test_split_box_covers_the_box_with_full_size_overlapping_subvolumes():
  box = BoundingBox((10, 0, 5), (100, 50, 30))
  subs = split_box(box, (40, 40, 40), (8, 8, 8))
  assert [s.start.tolist() for s in subs[:3]] == [[10, 0, 5], [42, 0, 5], [70, 0, 5]]
  assert {s.start[1] for s in subs} == {0, 10}
  covered = np.zeros(box.shape_zyx(), int)
  for s in subs:
    assert np.all(s.start >= box.start) and np.all(s.end <= box.end)
    assert s.size.tolist() == [40, 40, 30]  # z is shorter than 40: one subvolume of 30
    rel = BoundingBox(s.start - box.start, s.size)
    covered[rel.to_slices()] += 1
  assert covered.min() >= 1
  # neighbours overlap by at least the requested overlap
  assert subs[1].start[0] - subs[0].start[0] == 32


def test_split_box_rejects_bad_overlap():
  with pytest.raises(FFNError, match="overlap"):
    split_box(BoundingBox((0, 0, 0), (50, 50, 50)), (20, 20, 20), (20, 0, 0))


# -- BatchExecutor ---------------------------------------------------------------------------------

def test_executor_batches_calls_of_concurrent_clients_and_routes_results_back():
  batch_sizes = []

  def predict(x):
    batch_sizes.append(x.shape[0])
    return x[..., :1] * 2.0

  n_clients, n_calls = 4, 20
  errors: list = []
  with BatchExecutor(predict, batch_size=4, max_wait_s=1.0) as executor:

    start_line = threading.Barrier(n_clients)

    def work(k: int) -> None:
      with executor.client() as client:
        client(np.zeros((1, 3, 3, 3, 2), np.float32))  # the first call registers the client
        start_line.wait()  # then all step together, as the canvases of one run do
        for step in range(n_calls):
          x = np.full((1, 3, 3, 3, 2), 1000 * k + step, np.float32)
          out = client(x)
          if out.shape != (1, 3, 3, 3, 1) or not np.all(out == 2 * (1000 * k + step)):
            errors.append((k, step, out.ravel()[0]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_clients)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert not errors
  assert sum(batch_sizes) == n_clients * (n_calls + 1)
  # once all four are registered every batch waits (up to max_wait_s) for all four inputs
  assert len(batch_sizes) <= n_calls + n_clients
  assert batch_sizes[-n_calls:] == [4] * n_calls
  assert executor.counters["executor-inputs"] == n_clients * (n_calls + 1)


def test_executor_does_not_wait_for_a_client_that_has_finished():
  import time
  calls = []
  with BatchExecutor(lambda x: calls.append(x.shape[0]) or x[..., :1], batch_size=8,
                     max_wait_s=30.0) as executor:
    with executor.client() as early:
      early(np.zeros((1, 2, 2, 2, 2), np.float32))
    start = time.monotonic()
    with executor.client() as late:  # alone now: its calls must not wait 30 s for a full batch
      for _ in range(3):
        late(np.zeros((1, 2, 2, 2, 2), np.float32))
    waited = time.monotonic() - start
  assert calls == [1, 1, 1, 1]
  assert waited < 5.0  # a leaked registration would make each call wait max_wait_s


def test_executor_error_reaches_the_waiting_client():
  def broken(x):
    raise RuntimeError("device lost")

  with BatchExecutor(broken, batch_size=2) as executor, executor.client() as client:
    with pytest.raises(ExecutorError, match="device lost"):
      client(np.zeros((1, 2, 2, 2, 2), np.float32))


# -- segment_boxes ---------------------------------------------------------------------------------

def _load_all(out_dir: str) -> dict:
  return {corner: storage.load_segmentation_file(storage.segmentation_path(out_dir, corner))
          for corner in storage.existing_corners(out_dir)}


def _runner(directory):
  directory.mkdir(parents=True, exist_ok=True)
  return _canvas_runner(directory)


BOXES = split_box(BoundingBox((0, 0, 0), (30, 30, 30)), (20, 20, 20), (6, 6, 6))


def test_batched_subvolumes_give_the_same_results_as_one_at_a_time(tmp_path):
  assert len(BOXES) == 8
  sequential = _runner(tmp_path / "seq")
  sequential.predict = batched_oracle
  segment_boxes(sequential, BOXES)
  batched = _runner(tmp_path / "batch")
  batched.predict = batched_oracle
  paths = segment_boxes(batched, BOXES, batch_size=3, concurrent_requests=4)
  assert len(paths) == 8
  a, b = _load_all(str(tmp_path / "seq" / "out")), _load_all(str(tmp_path / "batch" / "out"))
  assert sorted(a) == sorted(b) and len(a) == 8
  for corner in a:
    np.testing.assert_array_equal(a[corner][0], b[corner][0])
    assert {k: v[:2] for k, v in a[corner][1].items()} == {k: v[:2] for k, v in b[corner][1].items()}
  assert sum(len(origins) for _, origins in a.values()) >= 4  # the blobs are found in several
  assert batched.counters["executor-inputs"] == batched.counters["inference-calls"]
  assert batched.counters["executor-batches"] < batched.counters["executor-inputs"]
  # a second run finds every result and does nothing
  again = _runner(tmp_path / "batch")
  again.predict = None  # would fail if any network call were attempted
  assert segment_boxes(again, BOXES, batch_size=3, concurrent_requests=4) == [
      again.paths(b)[0] for b in BOXES]


def test_stop_during_batched_run_checkpoints_every_canvas_and_resumes_identically(tmp_path):
  reference = _runner(tmp_path / "ref")
  reference.predict = batched_oracle
  segment_boxes(reference, BOXES)

  runner = _runner(tmp_path / "run")
  state = {"calls": 0}

  def stopping(x):
    state["calls"] += x.shape[0]
    if state["calls"] >= 30:
      runner.request_stop()
    return batched_oracle(x)

  runner.predict = stopping
  with pytest.raises(InferenceInterrupted):
    segment_boxes(runner, BOXES, batch_size=2, concurrent_requests=3)
  out = str(tmp_path / "run" / "out")
  import glob
  assert glob.glob(f"{out}/**/*.cpoint", recursive=True)  # in-flight canvases saved their state
  resumed = _runner(tmp_path / "run")
  resumed.predict = batched_oracle
  segment_boxes(resumed, BOXES, batch_size=2, concurrent_requests=3)
  assert not glob.glob(f"{out}/**/*.cpoint", recursive=True)
  a, b = _load_all(str(tmp_path / "ref" / "out")), _load_all(out)
  assert sorted(a) == sorted(b)
  for corner in a:
    np.testing.assert_array_equal(a[corner][0], b[corner][0])


def test_a_failing_subvolume_stops_the_run_and_a_rerun_completes(tmp_path):
  """One box fails (here: its canvas cannot be built): the error surfaces, running canvases
  checkpoint and stop, nothing is half written, and a rerun finishes every box."""
  reference = _runner(tmp_path / "ref")
  reference.predict = batched_oracle
  segment_boxes(reference, BOXES)

  runner = _runner(tmp_path / "run")
  runner.predict = batched_oracle
  build = runner.make_canvas

  def make_canvas(box, **kwargs):
    if box == BOXES[3]:
      raise FFNError("mask volume does not cover the segmented box")
    return build(box, **kwargs)

  runner.make_canvas = make_canvas
  with pytest.raises(FFNError, match="does not cover"):
    segment_boxes(runner, BOXES, batch_size=2, concurrent_requests=3)
  out = str(tmp_path / "run" / "out")
  assert not runner.is_done(BOXES[3])
  assert not any(runner.is_done(b) for b in BOXES[4:])  # not started after the failure
  rerun = _runner(tmp_path / "run")
  rerun.predict = batched_oracle
  segment_boxes(rerun, BOXES, batch_size=2, concurrent_requests=3)
  a, b = _load_all(str(tmp_path / "ref" / "out")), _load_all(out)
  assert sorted(a) == sorted(b) and len(b) == 8
  for corner in a:
    np.testing.assert_array_equal(a[corner][0], b[corner][0])

def test_cli_batched_subvolumes_with_the_real_model_match_sequential_runs(sample_fib25, tmp_path):
  """run_inference --subvolume_size with two canvases batched == each box run on its own."""
  import subprocess
  import sys

  from conftest import REPO_ROOT
  from ffn.inference.request import parse_request
  from ffn.inference.runner import Runner
  from test_inference_model import request_text
  req = tmp_path / "req.pbtxt"
  req.write_text(request_text(sample_fib25, tmp_path / "batched"))
  box = "start { x: 25 y: 25 z: 25 } size { x: 64 y: 40 z: 40 }"
  proc = subprocess.run([sys.executable, "run_inference.py", f"--inference_request={req}",
                         f"--bounding_box={box}", "--subvolume_size=40,40,40", "--overlap=16,0,0",
                         "--concurrent_requests=2", "--batch_size=2"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "mean batch" in proc.stderr
  batched = _load_all(str(tmp_path / "batched"))
  assert sorted(batched) == [(25, 25, 25), (25, 25, 49)]  # z,y,x corners: x = 25 and 49

  runner = Runner(parse_request(request_text(sample_fib25, tmp_path / "sequential")))
  for sub in split_box(BoundingBox((25, 25, 25), (64, 40, 40)), (40, 40, 40), (16, 0, 0)):
    runner.run(sub)
  sequential = _load_all(str(tmp_path / "sequential"))
  for corner, (seg, origins) in sequential.items():
    np.testing.assert_array_equal(batched[corner][0], seg)
    assert {k: v[:2] for k, v in batched[corner][1].items()} == {k: v[:2] for k, v in origins.items()}
  assert any(origins for _, origins in sequential.values())


@pytest.mark.slow
def test_cli_sigterm_with_concurrent_subvolumes_then_resume(sample_fib25, tmp_path):
  """SIGTERM to a run of two concurrent subvolumes: both checkpoint, exit 143; the rerun matches."""
  import glob
  import signal
  import subprocess
  import sys
  import time

  from conftest import REPO_ROOT
  from test_inference_model import request_text
  box = "start { x: 25 y: 25 z: 25 } size { x: 100 y: 56 z: 56 }"
  flags = ["--subvolume_size=56,56,56", "--overlap=12,0,0", "--concurrent_requests=2",
           "--batch_size=2"]

  def cli(name: str, interval: int) -> subprocess.Popen:
    req = tmp_path / f"{name}.pbtxt"
    req.write_text(request_text(sample_fib25, tmp_path / name, interval=interval))
    return subprocess.Popen([sys.executable, "run_inference.py", f"--inference_request={req}",
                             f"--bounding_box={box}", *flags], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  proc = cli("killed", interval=1)
  deadline = time.time() + 300
  while (len(glob.glob(f"{tmp_path}/killed/**/*.cpoint", recursive=True)) < 2
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before both subvolumes had a checkpoint"
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 143, out
  assert len(glob.glob(f"{tmp_path}/killed/**/*.cpoint", recursive=True)) == 2
  assert not glob.glob(f"{tmp_path}/killed/**/*.npz", recursive=True)

  out, _ = cli("killed", interval=1).communicate(timeout=600)
  assert "restored checkpoint" in out
  out_ref, _ = cli("reference", interval=0).communicate(timeout=600)
  killed, reference = _load_all(str(tmp_path / "killed")), _load_all(str(tmp_path / "reference"))
  assert len(reference) == 2 and sorted(killed) == sorted(reference), out + out_ref
  for corner, (seg, _) in reference.items():
    np.testing.assert_array_equal(killed[corner][0], seg)
  assert not glob.glob(f"{tmp_path}/killed/**/*.cpoint", recursive=True)
