"""Tests of ffn.blockwise: plan, LPT balance, manifest checks, resume, status and signals.

The array runs use submitit's local cluster (each task a subprocess of this machine) with a toy
worker defined here; the tasks import it from this file (``PYTHONPATH`` gets ``tests/``).
Real Slurm arrays are exercised by tests/test_batch_inference.py.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffn.axes import BoundingBox, split_box
from ffn.blockwise import (WorkItem, Worker, balance, check_manifest, compute_status,
                           load_manifest, plan, run_array, status_lines, task_count)
from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic
from slurm.executor import SlurmOptions

TESTS_DIR = Path(__file__).resolve().parent


def _item(name: str, cost: int) -> WorkItem:
  box = BoundingBox((0, 0, 0), (1, 1, 1))
  return WorkItem(name, box, box, cost)


def test_plan_ids_context_and_cost() -> None:
  region = BoundingBox((10, 20, 30), (40, 30, 20))
  boxes = split_box(region, (24, 30, 20), (8, 0, 0))
  items = plan(boxes, context_xyz=(4, 2, 1), bounds=region)
  assert [item.id for item in items] == ["10_20_30", "26_20_30"]
  first, second = items
  assert first.write_box == boxes[0]
  # Context grows the box on every side, clipped to the region: x 10..34 -> 10..38, y and z stay.
  assert first.read_box == BoundingBox((10, 20, 30), (28, 30, 20))
  assert second.read_box == BoundingBox((22, 20, 30), (28, 30, 20))
  assert first.cost == 28 * 30 * 20
  with pytest.raises(FFNError, match="same start corner"):
    plan([boxes[0], boxes[0]])


def _optimum(costs: list[int], n: int) -> int:
  """Smallest possible largest task cost, by trying every assignment (an independent oracle)."""
  best = sum(costs)
  for assignment in itertools.product(range(n), repeat=len(costs)):
    loads = [0] * n
    for cost, t in zip(costs, assignment):
      loads[t] += cost
    best = min(best, max(loads))
  return best


@pytest.mark.parametrize("costs, n", [
    ([8, 1, 1, 1, 1, 1, 1, 1, 1], 2),  # rank::n puts 8+1+1+1+1 = 12 on task 0; optimum 8
    ([5, 5, 4, 4, 3, 3, 3], 3),
    ([7, 6, 5, 4, 3, 2, 1, 9], 4),
    ([2, 2, 2], 5),
])
def test_balance_is_lpt_within_graham_bound(costs: list[int], n: int) -> None:
  items = [_item(f"b{i}", c) for i, c in enumerate(costs)]
  groups = balance(items, n)
  assert len(groups) == min(n, len(costs)) and all(groups)
  assert sorted(it.id for g in groups for it in g) == sorted(it.id for it in items)
  for group in groups:
    assert [it.cost for it in group] == sorted((it.cost for it in group), reverse=True)
  makespan = max(sum(it.cost for it in g) for g in groups)
  optimum = _optimum(costs, min(n, len(costs)))
  assert makespan * 3 <= optimum * 4  # Graham: LPT <= (4/3 - 1/(3n)) OPT
  if costs[0] == 8:
    assert makespan == optimum == 8
    rank_split = max(sum(costs[t::n]) for t in range(n))
    assert rank_split == 12


def test_balance_greedy_order() -> None:
  """LPT: largest first, each into the currently least-loaded task (ties: lower index)."""
  items = [_item(n, c) for n, c in [("a", 5), ("b", 4), ("c", 3), ("d", 3), ("e", 2)]]
  assert [[it.id for it in g] for g in balance(items, 2)] == [["a", "d"], ["b", "c", "e"]]


def test_task_count() -> None:
  assert task_count(8, 1) == 8
  assert task_count(8, 3) == 3
  assert task_count(8, 3, max_tasks=2) == 2
  assert task_count(2, 1, max_tasks=10) == 2
  assert task_count(0, 1) == 0
  with pytest.raises(FFNError, match="--chunks_per_task must be >= 1"):
    task_count(8, 0)


def test_manifest_written_then_mismatch_refused(tmp_path: Path) -> None:
  items = plan(split_box(BoundingBox((0, 0, 0), (20, 10, 10)), (10, 10, 10)))
  manifest = {"request": "a", "tiling": [10, 10, 10], "version": "1"}
  path = check_manifest(tmp_path / "run", manifest, items)
  written = path.read_bytes()
  assert load_manifest(tmp_path / "run") == (manifest, items)
  assert load_manifest(path) == (manifest, items)
  assert check_manifest(tmp_path / "run", dict(manifest), items) == path  # same: accepted
  with pytest.raises(FFNError, match=r"this run's 'tiling' differs .*\[10, 10, 10\].*\[8, 8, 8\]"):
    check_manifest(tmp_path / "run", {**manifest, "tiling": [8, 8, 8]}, items)
  with pytest.raises(FFNError, match="'items' differs .*the blocks differ"):
    check_manifest(tmp_path / "run", manifest, items[:1])
  with pytest.raises(FFNError, match="'extra' differs"):
    check_manifest(tmp_path / "run", {**manifest, "extra": 1}, items)
  assert path.read_bytes() == written
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["manifest.json"]
  with pytest.raises(FFNError, match="no run manifest here"):
    load_manifest(tmp_path / "elsewhere")


# ------------------------------------------------------------------- arrays on the local cluster

class ToyWorker(Worker):
  """Writes ``<out>/<id>.txt`` holding the item's cost. ``fail``: ids that raise while the file
  ``<out>/fail-<id>`` exists; ``sigterm``: ids during which the task sends itself SIGTERM."""

  def __init__(self, out: str, fail: tuple[str, ...] = (), sigterm: tuple[str, ...] = (),
               seconds: float = 0.0):
    self.out, self.fail, self.sigterm, self.seconds = out, fail, sigterm, seconds

  def is_done(self, item: WorkItem) -> bool:
    return os.path.exists(os.path.join(self.out, f"{item.id}.txt"))

  def process(self, item: WorkItem) -> None:
    if item.id in self.fail and os.path.exists(os.path.join(self.out, f"fail-{item.id}")):
      raise ValueError(f"block {item.id} is broken")
    if item.id in self.sigterm and os.path.exists(os.path.join(self.out, f"sigterm-{item.id}")):
      os.remove(os.path.join(self.out, f"sigterm-{item.id}"))
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.5)  # the handler runs in the main thread; stop is seen before the next block
    time.sleep(self.seconds)
    write_text_atomic(os.path.join(self.out, f"{item.id}.txt"), str(item.cost))


@pytest.fixture()
def local_jobs(monkeypatch: pytest.MonkeyPatch) -> SlurmOptions:
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
  return SlurmOptions(cluster="local", time_min=5, array_parallelism=2)


def _items() -> list[WorkItem]:
  return plan(split_box(BoundingBox((0, 0, 0), (30, 20, 10)), (10, 10, 10)))  # 6 blocks


def _submissions(run: Path) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted((run / "submissions").glob("*.json"))]


def test_run_array_done_items_not_resubmitted(tmp_path: Path, local_jobs: SlurmOptions) -> None:
  out, run = tmp_path / "out", tmp_path / "run"
  out.mkdir()
  items = _items()
  worker = ToyWorker(str(out))
  write_text_atomic(out / f"{items[2].id}.txt", "already")  # done before the run
  status = run_array(run, worker, items, local_jobs, chunks_per_task=2, wait=True, poll_s=0.2)
  assert status.count("done") == 6 and not status.active
  (record,) = _submissions(run)
  assert sorted(i for task in record["tasks"] for i in task) == sorted(
      it.id for it in items if it.id != items[2].id)
  assert len(record["tasks"]) == 3 and len(record["job_ids"]) == 3
  assert (out / f"{items[2].id}.txt").read_text() == "already"
  for task in range(3):
    data = json.loads((run / "tasks" / f"0001_{task}.json").read_text())
    assert data["state"] == "finished" and data["current"] == {}
    assert sorted(data["seconds"]) == sorted(record["tasks"][task])
    assert Path(data["log"]).exists()
  # Everything done: a second run submits nothing.
  status = run_array(run, worker, items, local_jobs, wait=True, poll_s=0.2)
  assert status.count("done") == 6 and len(_submissions(run)) == 1
  lines = status_lines(status)
  assert lines[0].endswith("6 blocks (6.0 kvoxels): 6 done, 0 running, 0 failed, 0 pending "
                           "(0 queued in tasks)")
  assert lines[1].startswith("throughput ") and lines[2].startswith("slowest blocks: ")


def test_failed_items_listed_and_retried(tmp_path: Path, local_jobs: SlurmOptions) -> None:
  out, run = tmp_path / "out", tmp_path / "run"
  out.mkdir()
  items = _items()
  broken = items[4].id
  (out / f"fail-{broken}").touch()
  worker = ToyWorker(str(out), fail=(broken,))
  status = run_array(run, worker, items, local_jobs, max_tasks=2, wait=True, poll_s=0.2)
  assert status.count("failed") >= 1 and not status.active
  failed = status.failed_tasks()
  (task,) = failed
  assert broken in failed[task]
  state = status.states[broken]
  assert state.reason == f"ValueError: block {broken} is broken"
  assert state.log and Path(state.log).exists() and f"block {broken} is broken" in Path(
      state.log).read_text()
  line = [line for line in status_lines(status) if line.startswith("failed:")][0]
  assert f"ValueError: block {broken} is broken; log: {state.log}; blocks: " in line
  # Without --retry_failed nothing is submitted again.
  status = run_array(run, worker, items, local_jobs, wait=True, poll_s=0.2)
  assert len(_submissions(run)) == 1 and status.states[broken].state == "failed"
  (out / f"fail-{broken}").unlink()
  status = run_array(run, worker, items, local_jobs, retry_failed=True, wait=True, poll_s=0.2)
  assert status.count("done") == 6
  retry = _submissions(run)[1]
  assert sorted(i for t in retry["tasks"] for i in t) == sorted(failed[task])


def test_sigterm_interrupts_then_retry_completes(tmp_path: Path, local_jobs: SlurmOptions) -> None:
  out, run = tmp_path / "out", tmp_path / "run"
  out.mkdir()
  items = _items()
  target = items[0].id
  (out / f"sigterm-{target}").touch()
  worker = ToyWorker(str(out), sigterm=(target,))
  status = run_array(run, worker, items, local_jobs, max_tasks=1, wait=True, poll_s=0.2)
  data = json.loads((run / "tasks" / "0001_0.json").read_text())
  assert data["state"] == "interrupted" and data["error"] == "stopped by SIGTERM, state saved"
  # The block in progress finished (the toy worker saves it); the ones after it did not start.
  assert status.states[target].state == "done"
  assert status.count("failed") == 5
  assert all(s.reason == "stopped by SIGTERM, state saved" for s in status.states.values()
             if s.state == "failed")
  status = run_array(run, worker, items, local_jobs, retry_failed=True, wait=True, poll_s=0.2)
  assert status.count("done") == 6


def test_dead_task_is_failed_not_running(tmp_path: Path) -> None:
  """A task whose status says running but whose process is gone (SIGKILL) counts as failed."""
  run = tmp_path / "run"
  items = _items()[:2]
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  record = {"submission": 1, "cluster": "local", "host": os.uname().nodename, "pid": proc.pid,
            "log_root": str(run / "logs"), "tasks": [[items[0].id], [items[1].id]],
            "job_ids": ["11", "12"]}
  write_text_atomic(run / "submissions" / "0001.json", json.dumps(record))
  now = time.time()
  for t, pid in ((0, proc.pid), (1, os.getpid())):
    write_text_atomic(run / "tasks" / f"0001_{t}.json", json.dumps({
        "submission": 1, "task": t, "state": "running", "host": os.uname().nodename, "pid": pid,
        "started": now, "heartbeat": now, "current": {items[t].id: now}, "seconds": {},
        "log": f"/logs/{t}.err"}))
  status = compute_status(run, items, lambda item: False)
  assert status.states[items[0].id].state == "failed"
  assert status.states[items[0].id].reason.startswith(f"task died (process {proc.pid} on ")
  assert status.states[items[0].id].log == "/logs/0.err"
  assert status.states[items[1].id].state == "running"  # this process lives
  assert status.active
