"""Blockwise work over a large region as one job array: plan, manifest, balance, submit, status.

Every stage that runs over a volume too big for one process (batch inference, stitching, ...)
cuts the region into blocks and hands them to the tasks of one submitit job array
(:mod:`slurm.executor`). This module is that shape, once (see docs: large-volume design note).

Items
  :class:`WorkItem` -- one block: ``id`` (``"<x>_<y>_<z>"`` of the write box start, like result
  file names), ``write_box`` (what the block produces), ``read_box`` (the write box plus context,
  clipped to the region's bounds: what it may read) and ``cost`` (voxels of the read box; used to
  balance tasks and for throughput/ETA). :func:`plan` makes them from boxes.

Run directory (chosen by the stage, next to its outputs)::

  <run_dir>/manifest.json                everything that determines the result, and the items
  <run_dir>/submissions/<n>.json         one per submission: cluster, job ids, items per task
  <run_dir>/tasks/<n>_<task>.json        written atomically by each task: state, host, pid, log
                                         path, start, heartbeat, attempt, items in progress,
                                         seconds and finish time per item
  <run_dir>/logs/<job id>/               submitit's logs of each task

API
  ``items = plan(boxes, context_xyz=(0, 0, 0), bounds=None)``
  ``check_manifest(run_dir, manifest, items)`` -- writes ``manifest.json``, or compares it with the
  existing one and raises :class:`~ffn.errors.FFNError` naming the first differing key.
  ``load_manifest(path)`` -> (manifest dict, items) from a run dir or its manifest.json.
  ``groups = balance(items, n_tasks)`` -- largest first into the least-loaded task (LPT).
  ``task_count(n_items, chunks_per_task, max_tasks)`` -- tasks to submit.
  ``run_array(run_dir, worker, items, options, ...)`` -- submits one job array with only the items
  that are not done (and, with ``retry_failed``, the failed ones), waits with progress if asked,
  returns the final :class:`RunStatus`.
  ``compute_status(run_dir, items, is_done)`` -> :class:`RunStatus`; ``status_lines(status)``.

Workers
  A :class:`Worker` subclass is what a task runs; it is pickled to the task (attributes whose name
  starts with ``_`` are runtime state and are not pickled). Override ``is_done(item)`` (read from
  the outputs, never from logs: this is what makes a re-run skip finished blocks), and either
  ``process(item)`` (one block; the default ``run`` loops over the task's items) or
  ``run(items, report)`` (all of a task's blocks at once, e.g. to load a model once and batch;
  call ``report.started(item)`` / ``report.finished(item)``). ``stop()`` is called from a signal
  handler: the worker saves what it can and raises soon after (any exception once stopping).

Task states (``tasks/<n>_<task>.json``): ``running``, ``finished``, ``failed`` (an exception:
message and log path), ``interrupted`` (SIGTERM: state saved, the task ends; ``retry_failed``
resumes it), ``requeued`` (submitit's preemption/time-out signal USR2: state saved, then submitit
requeues the same task). Item states (:func:`compute_status`): ``done`` (``is_done``), ``running``
(in progress in a live task), ``queued`` (assigned to a task that has not reached it yet),
``failed`` (its task failed, was interrupted, died -- no heartbeat, its process is gone, or Slurm's
accounting says the job ended) and ``pending`` (never submitted, or assigned to a ``debug`` task
that never started because the submitting process -- which runs debug tasks itself -- ended: a
rerun submits it again). A task is one process: each
holds one block (plus context) at a time per concurrent slot, never the volume.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import math
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import submitit

from ffn import quiet_tf
from ffn.axes import BoundingBox
from ffn.errors import FFNError
from ffn.io.atomic import write_text_atomic
from ffn.progress import Progress, format_eta

_log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HEARTBEAT_S = 30.0  # how often a task rewrites its status file
STALE_S = 300.0  # a running task whose heartbeat is older is dead (when no better evidence)
_SACCT_ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT")


# ----------------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One block. Boxes are x,y,z (:class:`~ffn.axes.BoundingBox`); ``cost`` is in voxels."""
  id: str
  write_box: BoundingBox
  read_box: BoundingBox
  cost: int

  def to_json(self) -> dict[str, Any]:
    return {"id": self.id, "write": _box_json(self.write_box), "read": _box_json(self.read_box),
            "cost": self.cost}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "WorkItem":
    return cls(data["id"], _box_from_json(data["write"]), _box_from_json(data["read"]),
               int(data["cost"]))


def _box_json(box: BoundingBox) -> dict[str, list[int]]:
  return {"start": [int(v) for v in box.start], "size": [int(v) for v in box.size]}


def _box_from_json(data: dict[str, list[int]]) -> BoundingBox:
  return BoundingBox(data["start"], data["size"])


def item_id(box: BoundingBox) -> str:
  """``"<x>_<y>_<z>"`` of the box's start (the corner in result file names)."""
  return "_".join(str(int(v)) for v in box.start)


def plan(boxes: Sequence[BoundingBox], context_xyz: Sequence[int] = (0, 0, 0),
         bounds: BoundingBox | None = None) -> list[WorkItem]:
  """One item per write box; the read box grows it by ``context_xyz`` voxels on every side,
  clipped to ``bounds`` (the region's edge: reads never leave it). Ids must be unique."""
  items = []
  context = [int(c) for c in context_xyz]
  for box in boxes:
    start = [int(s) - c for s, c in zip(box.start, context)]
    end = [int(e) + c for e, c in zip(box.end, context)]
    if bounds is not None:
      start = [max(s, int(b)) for s, b in zip(start, bounds.start)]
      end = [min(e, int(b)) for e, b in zip(end, bounds.end)]
    read = BoundingBox(start, [e - s for s, e in zip(start, end)])
    items.append(WorkItem(item_id(box), box, read, int(math.prod(int(v) for v in read.size))))
  ids = [item.id for item in items]
  if len(set(ids)) != len(ids):
    raise FFNError("blocks with the same start corner: each block needs its own start")
  return items


def task_count(n_items: int, chunks_per_task: int = 1, max_tasks: int | None = None) -> int:
  """Tasks for ``n_items``: ``ceil(n_items / chunks_per_task)``, at most ``max_tasks`` and never
  more than there are items."""
  if chunks_per_task < 1:
    raise FFNError(f"--chunks_per_task must be >= 1, got {chunks_per_task}")
  if max_tasks is not None and max_tasks < 1:
    raise FFNError(f"--num_tasks must be >= 1, got {max_tasks}")
  n = math.ceil(n_items / chunks_per_task)
  if max_tasks is not None:
    n = min(n, max_tasks)
  return max(0, min(n, n_items))


def balance(items: Sequence[WorkItem], n_tasks: int) -> list[list[WorkItem]]:
  """Largest-first into the least-loaded task (LPT; ties: lower task index, then item id).

  Returns ``n_tasks`` non-empty groups (``n_tasks`` is capped at ``len(items)``), each sorted
  largest first. The largest task's cost is at most 4/3 of the optimum (Graham's bound).
  """
  n_tasks = max(1, min(int(n_tasks), len(items)))
  if not items:
    return []
  heap = [(0, t) for t in range(n_tasks)]
  groups: list[list[WorkItem]] = [[] for _ in range(n_tasks)]
  for item in sorted(items, key=lambda it: (-it.cost, it.id)):
    load, t = heapq.heappop(heap)
    groups[t].append(item)
    heapq.heappush(heap, (load + item.cost, t))
  return groups


# ------------------------------------------------------------------------------- manifest

def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(run_dir: str | os.PathLike, manifest: dict[str, Any],
                   items: Sequence[WorkItem]) -> Path:
  """Writes ``<run_dir>/manifest.json`` (``manifest`` plus the items), or checks that an existing
  one has the same content; returns its path.

  ``manifest``: JSON-able values of everything that determines the result (request text, box,
  tiling, model checkpoint, toolkit version...). A difference raises :class:`FFNError` naming the
  first differing key (in ``manifest``'s order, ``items`` last), before anything is written.
  """
  path = Path(run_dir) / MANIFEST
  new = json.loads(json.dumps({**manifest, "items": [item.to_json() for item in items]}))
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise FFNError(f"{path}: unreadable run manifest ({e})") from None
    for key in list(new) + [k for k in old if k not in new]:
      if old.get(key) != new.get(key):
        what = ("the blocks differ" if key == "items" else
                f"was {_short(old.get(key))}, this run has {_short(new.get(key))}")
        raise FFNError(f"{path}: this run's {key!r} differs from the existing run's ({what}); "
                       "use another output directory, or the same settings to resume")
    return path
  write_text_atomic(path, json.dumps(new, indent=1) + "\n")
  return path


def load_manifest(path: str | os.PathLike) -> tuple[dict[str, Any], list[WorkItem]]:
  """(manifest without items, items) from a run directory or its ``manifest.json``."""
  path = Path(path)
  if path.is_dir():
    path = path / MANIFEST
  try:
    data = json.loads(path.read_text())
    items = [WorkItem.from_json(item) for item in data.pop("items")]
  except FileNotFoundError:
    raise FFNError(f"{path}: no run manifest here") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FFNError(f"{path}: unreadable run manifest ({e})") from None
  return data, items


# --------------------------------------------------------------------------------- worker

class TaskInterrupted(Exception):
  """Raised by a worker that stopped on request (its state is saved)."""


class Worker:
  """What each task runs (see the module docstring). Subclass it; it is pickled to the task."""

  def is_done(self, item: WorkItem) -> bool:
    """True when the item's outputs are complete (read from the outputs)."""
    raise NotImplementedError

  def process(self, item: WorkItem) -> None:
    """Produces one item's outputs (atomically)."""
    raise NotImplementedError

  def run(self, items: Sequence[WorkItem], report: "TaskReport") -> None:
    """Processes ``items`` in order, skipping done ones; raises :class:`TaskInterrupted` once
    :meth:`stop` was called."""
    for item in items:
      if self._stopping:
        raise TaskInterrupted("stopped before the next block")
      if self.is_done(item):
        continue
      report.started(item)
      self.process(item)
      report.finished(item)

  _stopping = False

  def stop(self) -> None:
    """Asks :meth:`run` to save its state and stop soon (called from a signal handler)."""
    self._stopping = True

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class TaskReport:
  """The status file of one task (``tasks/<submission>_<task>.json``), rewritten atomically on
  every change and every ``heartbeat_s`` seconds."""

  def __init__(self, path: Path, fields: dict[str, Any], heartbeat_s: float = HEARTBEAT_S):
    """A requeued task (same file) keeps the seconds of items done by its earlier runs and
    counts its runs in ``attempt``."""
    self.path = path
    previous = _read_json(path) or {}
    self.data = {**fields, "state": "running", "host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.time(), "heartbeat": time.time(), "current": {},
                 "seconds": dict(previous.get("seconds", {})),
                 "finished": dict(previous.get("finished", {})),
                 "attempt": int(previous.get("attempt", 0)) + 1}
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._heartbeat_s = heartbeat_s
    self._thread = threading.Thread(target=self._beat, name="ffn-heartbeat", daemon=True)
    self._write()
    self._thread.start()

  def _write(self) -> None:
    self.data["heartbeat"] = time.time()
    write_text_atomic(self.path, json.dumps(self.data, indent=1) + "\n")

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      with self._lock:
        if self.data["state"] == "running":
          self._write()

  def started(self, item: WorkItem) -> None:
    with self._lock:
      self.data["current"][item.id] = time.time()
      self._write()

  def finished(self, item: WorkItem, seconds: float | None = None) -> None:
    """The item's work in this task ended; ``seconds``: its cost if not the time since
    :meth:`started` (e.g. summed over several passes)."""
    with self._lock:
      began = self.data["current"].pop(item.id, None)
      if seconds is None and began is not None:
        seconds = time.time() - began
      if seconds is not None:
        self.data["seconds"][item.id] = round(seconds, 3)
      self.data["finished"][item.id] = time.time()
      self._write()

  def end(self, state: str, error: str | None = None) -> None:
    """Final state (``finished``, ``failed``, ``interrupted``, ``requeued``); stops the heartbeat."""
    self._stop.set()
    with self._lock:
      self.data.update(state=state, ended=time.time())
      if error:
        self.data["error"] = error
      self._write()


def _log_path() -> str | None:
  """This task's stderr log (submitit's), when running under submitit."""
  try:
    return str(submitit.JobEnvironment().paths.stderr)
  except (KeyError, RuntimeError):
    return None


def _job_id() -> str | None:
  try:
    return str(submitit.JobEnvironment().job_id)
  except (KeyError, RuntimeError):
    return None


def _one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class ArrayTask(submitit.helpers.Checkpointable):
  """The callable of every task of an array: ``task(submission, index, item_dicts)``.

  Runs the worker in a thread (so that signals reach this process's main thread at once),
  writes the task's status file, and turns signals into saved state: SIGTERM -> worker.stop(),
  state ``interrupted``, the task fails; submitit's USR2 (preemption/time limit) ->
  :meth:`checkpoint`: worker.stop(), wait, state ``requeued``, submitit requeues the task.
  """

  def __init__(self, run_dir: str, worker: Worker, heartbeat_s: float = HEARTBEAT_S):
    self.run_dir = str(run_dir)
    self.worker = worker
    self.heartbeat_s = heartbeat_s
    self._thread: threading.Thread | None = None
    self._report: TaskReport | None = None
    self._signal: str | None = None
    self._error: BaseException | None = None

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._thread = self._report = self._signal = self._error = None

  def __call__(self, submission: int, index: int, item_dicts: Sequence[dict[str, Any]]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_tf.install()  # job logs without TensorFlow's start-up noise, as on the command line
    items = [WorkItem.from_json(d) for d in item_dicts]
    path = Path(self.run_dir) / "tasks" / f"{submission:04d}_{index}.json"
    self._report = TaskReport(path, {"submission": submission, "task": index, "job_id": _job_id(),
                                     "log": _log_path(), "items": [it.id for it in items]},
                              self.heartbeat_s)
    _log.info("task %d of submission %d: %d blocks, %d voxels", index, submission, len(items),
              sum(it.cost for it in items))

    def on_sigterm(signum, frame):  # noqa: ARG001
      _log.warning("SIGTERM: saving state and stopping")
      self._signal = "SIGTERM"
      self.worker.stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    self._thread = threading.Thread(target=self._work, args=(items,), name="ffn-worker")
    self._thread.start()
    try:
      while self._thread.is_alive():
        self._thread.join(0.5)
    finally:
      signal.signal(signal.SIGTERM, previous)
    if self._error is not None:
      if self._signal is not None:
        self._report.end("interrupted", f"stopped by {self._signal}, state saved")
        raise TaskInterrupted(f"stopped by {self._signal}; state saved, run again to resume")
      self._report.end("failed", _one_line(self._error))
      raise self._error
    self._report.end("finished")
    return len(items)

  def _work(self, items: list[WorkItem]) -> None:
    try:
      self.worker.run(items, self._report)
    except BaseException as e:  # noqa: BLE001 - re-raised by __call__ in the main thread
      self._error = e

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """submitit's preemption/time-out hook: saves the worker's state, then requeues the task."""
    _log.warning("preempted or at the time limit: saving state, then requeued")
    self._signal = "USR2"
    self.worker.stop()
    if self._thread is not None:
      self._thread.join()
    if self._report is not None:
      self._report.end("requeued", "preempted or timed out; state saved, requeued")
    return super().checkpoint(*args, **kwargs)


# --------------------------------------------------------------------------------- status

@dataclasses.dataclass
class ItemStatus:
  state: str  # done | running | queued | failed | pending
  task: str | None = None  # "<submission>_<task>"
  job_id: str | None = None
  log: str | None = None
  reason: str | None = None
  seconds: float | None = None  # wall time of the item's last completed processing


@dataclasses.dataclass
class RunStatus:
  """Where a run stands. ``voxels_per_s``: voxels finished by the latest submission's tasks (in
  their latest runs) per second since the first of those runs started; ``eta_s``: not-done voxels
  at that rate (None: unknown)."""
  run_dir: str
  items: list[WorkItem]
  states: dict[str, ItemStatus]
  voxels_per_s: float | None = None
  eta_s: float | None = None

  def count(self, state: str) -> int:
    return sum(s.state == state for s in self.states.values())

  @property
  def active(self) -> bool:
    """Some item is running or queued in a live task."""
    return any(s.state in ("running", "queued") for s in self.states.values())

  def failed_tasks(self) -> dict[str, list[str]]:
    """task key -> ids of its failed items."""
    out: dict[str, list[str]] = {}
    for item in self.items:
      s = self.states[item.id]
      if s.state == "failed":
        out.setdefault(s.task or "?", []).append(item.id)
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _pid_alive(host: str | None, pid: int | None) -> bool | None:
  """Whether the process lives (None: it runs on another host, unknown from here)."""
  if host != socket.gethostname() or pid is None:
    return None
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _sacct_states(array_ids: Iterable[str]) -> dict[str, str]:
  """Slurm accounting state of each array task (``<array>_<i>`` -> ``FAILED``...), best effort."""
  ids = sorted(set(array_ids))
  if not ids:
    return {}
  try:
    out = subprocess.run(["sacct", "--noheader", "--parsable2", "-X", "-j", ",".join(ids),
                          "--format=JobID,State"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
  except (OSError, subprocess.TimeoutExpired):
    return {}
  states = {}
  for line in out.splitlines():
    parts = line.strip().split("|")
    if len(parts) >= 2:
      states[parts[0]] = parts[1].split()[0] if parts[1] else ""
  return states


def compute_status(run_dir: str | os.PathLike, items: Sequence[WorkItem],
                   is_done: Callable[[WorkItem], bool], ended_jobs: Iterable[str] = (),
                   now: float | None = None, stale_s: float = STALE_S) -> RunStatus:
  """Item states from the outputs (``is_done``), the submission records and the task status
  files (see the module docstring); Slurm's accounting is asked only about tasks that have no
  status file or claim to run. ``ended_jobs``: job ids known (e.g. to the submitter) to have
  ended."""
  run_dir = Path(run_dir)
  now = time.time() if now is None else now
  ended = set(ended_jobs)
  submissions = sorted((run_dir / "submissions").glob("*.json"))
  records = [r for r in (_read_json(p) for p in submissions) if r is not None]
  tasks: dict[str, dict[str, Any]] = {}
  for path in sorted((run_dir / "tasks").glob("*.json")):
    data = _read_json(path)
    if data is not None:
      tasks[path.stem] = data
  # The latest assignment of every item.
  assigned: dict[str, tuple[dict[str, Any], int]] = {}
  for record in records:
    for t, ids in enumerate(record["tasks"]):
      for i in ids:
        assigned[i] = (record, t)
  seconds: dict[str, float] = {}
  for data in tasks.values():
    seconds.update(data.get("seconds", {}))
  slurm_ids = []
  for record in records:
    if record.get("cluster") == "slurm" and record.get("job_ids"):
      for t, job_id in enumerate(record["job_ids"]):
        data = tasks.get(f"{record['submission']:04d}_{t}")
        if data is None or data.get("state") == "running":
          slurm_ids.append(str(job_id).split("_")[0])
  sacct = _sacct_states(slurm_ids)

  def task_state(record: dict[str, Any], t: int) -> tuple[str, str | None, str | None, str | None]:
    """(state, job id, log, reason) of task t of a submission."""
    key = f"{record['submission']:04d}_{t}"
    job_ids = record.get("job_ids") or []
    job_id = str(job_ids[t]) if t < len(job_ids) else None
    log = (str(Path(record["log_root"]) / job_id / f"{job_id}_0_log.err")
           if job_id and record.get("log_root") else None)
    data = tasks.get(key)
    accounted = sacct.get(job_id or "", "")
    job_ended = (job_id in ended) or accounted in _SACCT_ENDED
    if data is None:
      if job_ended:
        return "failed", job_id, log, f"job ended ({accounted or 'no result'}) before the task started"
      if _pid_alive(record.get("host"), record.get("pid")) is False:
        if record.get("cluster") == "debug":  # its tasks run in the submitter: none will start
          return "pending", job_id, log, "never started (the submitting debug process ended)"
        if not job_ids:
          return "failed", job_id, log, "never started (the submitting process ended)"
      return "queued", job_id, log, None
    log = data.get("log") or log
    state = data.get("state")
    if state == "running":
      alive = _pid_alive(data.get("host"), data.get("pid"))
      if alive is False or (alive is None and (job_ended or now - data["heartbeat"] > stale_s)):
        return "failed", job_id, log, (f"task died (process {data.get('pid')} on "
                                       f"{data.get('host')} is gone; last heartbeat "
                                       f"{now - data['heartbeat']:.0f} s ago)")
      return "running", job_id, log, None
    if state == "requeued":
      return "queued", job_id, log, None
    if state == "finished":
      return "failed", job_id, log, "task finished without this block's output"
    return "failed", job_id, log, data.get("error") or state

  cache: dict[tuple[int, int], tuple[str, str | None, str | None, str | None]] = {}
  states: dict[str, ItemStatus] = {}
  for item in items:
    if is_done(item):
      states[item.id] = ItemStatus("done", seconds=seconds.get(item.id))
      continue
    if item.id not in assigned:
      states[item.id] = ItemStatus("pending")
      continue
    record, t = assigned[item.id]
    key = (record["submission"], t)
    if key not in cache:
      cache[key] = task_state(record, t)
    state, job_id, log, reason = cache[key]
    if state == "running":
      current = tasks[f"{record['submission']:04d}_{t}"].get("current", {})
      state = "running" if item.id in current else "queued"
    states[item.id] = ItemStatus(state, f"{record['submission']:04d}_{t}", job_id, log, reason)
  status = RunStatus(str(run_dir), list(items), states)
  if records:
    latest = records[-1]["submission"]
    mine = [d for d in tasks.values() if d.get("submission") == latest]
    if mine:
      costs = {item.id: item.cost for item in items}
      first = min(d["started"] for d in mine)
      done_voxels = sum(costs.get(i, 0) for d in mine for i, t in d.get("finished", {}).items()
                        if t >= first and states.get(i, ItemStatus("pending")).state == "done")
      last = max(d.get("ended", now if d.get("state") == "running" else d["heartbeat"])
                 for d in mine)
      if done_voxels and last > first:
        status.voxels_per_s = done_voxels / (last - first)
        left = sum(it.cost for it in items if states[it.id].state != "done")
        status.eta_s = left / status.voxels_per_s
  return status


def _voxels(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}voxels"
  return f"{n:.0f} voxels"


def status_lines(status: RunStatus, slowest: int = 5, noun: str = "blocks") -> list[str]:
  """Human-readable summary: counts, throughput and ETA, the slowest blocks, failed tasks;
  ``noun`` names the blocks (e.g. ``chunks``)."""
  total = sum(item.cost for item in status.items)
  counts = {s: status.count(s) for s in ("done", "running", "queued", "failed", "pending")}
  lines = [f"{status.run_dir}: {len(status.items)} {noun} ({_voxels(total)}): {counts['done']} done, "
           f"{counts['running']} running, {counts['failed']} failed, "
           f"{counts['pending'] + counts['queued']} pending ({counts['queued']} queued in tasks)"]
  if status.voxels_per_s:
    eta = "" if not status.active else f", ETA {format_eta(status.eta_s or 0.0)}"
    lines.append(f"throughput {_voxels(status.voxels_per_s)}/s (latest submission){eta}")
  timed = sorted(((s.seconds, i) for i, s in status.states.items() if s.seconds is not None),
                 reverse=True)
  if timed:
    lines.append(f"slowest {noun}: " + ", ".join(f"{i} {sec:.1f} s" for sec, i in timed[:slowest]))
  for task, ids in status.failed_tasks().items():
    s = status.states[ids[0]]
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    lines.append(f"failed: task {task} (job {s.job_id or '?'}): {s.reason}; log: {s.log or '?'}; "
                 f"{noun}: {shown}")
  return lines


# ----------------------------------------------------------------------------------- run

def run_array(run_dir: str | os.PathLike, worker: Worker, items: Sequence[WorkItem], options,
              chunks_per_task: int = 1, max_tasks: int | None = None, retry_failed: bool = False,
              wait: bool = False, poll_s: float = 5.0, heartbeat_s: float = HEARTBEAT_S) -> RunStatus:
  """Submits the items that are not done as one job array and returns the run's status.

  Items done (``worker.is_done``) or running/queued in a live task are not submitted; failed ones
  only with ``retry_failed``. ``options``: :class:`slurm.executor.SlurmOptions` (one process per
  task: ``nodes`` and ``tasks_per_node`` must be 1). Logs go to ``<run_dir>/logs/<job id>/``
  unless ``options.log_dir`` says otherwise. With ``wait`` (always on the ``debug`` cluster) it
  returns once no task is running or queued, logging progress (blocks, voxels/s, ETA).
  """
  from slurm.executor import make_executor, submit_array
  if options.nodes != 1 or options.tasks_per_node != 1:
    raise FFNError("--slurm_nodes and --slurm_tasks_per_node must be 1: each array task is one "
                   "process (use more tasks instead)")
  run_dir = Path(run_dir).absolute()
  status = compute_status(run_dir, items, worker.is_done)
  failed = [item for item in items if status.states[item.id].state == "failed"]
  todo = [item for item in items if status.states[item.id].state == "pending"]
  if retry_failed:
    todo += failed
  elif failed:
    _log.warning("%d blocks failed earlier and are not submitted again (rerun with "
                 "--retry_failed):", len(failed))
    for line in status_lines(status)[1:]:
      if line.startswith("failed:"):
        _log.warning("  %s", line)
  jobs: list[submitit.Job] = []
  if todo:
    groups = balance(todo, task_count(len(todo), chunks_per_task, max_tasks))
    executor = make_executor(options, run_dir)
    numbers = [int(p.stem) for p in (run_dir / "submissions").glob("*.json") if p.stem.isdigit()]
    number = max(numbers, default=0) + 1
    record = {"submission": number, "time": time.time(), "cluster": executor.cluster,
              "host": socket.gethostname(), "pid": os.getpid(), "log_root": str(executor.log_root),
              "tasks": [[item.id for item in group] for group in groups], "job_ids": None}
    record_path = run_dir / "submissions" / f"{number:04d}.json"
    write_text_atomic(record_path, json.dumps(record) + "\n")
    _log.info("submission %d: %d blocks in %d tasks (largest task %s, smallest %s)", number,
              len(todo), len(groups), _voxels(sum(i.cost for i in groups[0])),
              _voxels(min(sum(i.cost for i in g) for g in groups)))
    task = ArrayTask(str(run_dir), worker, heartbeat_s)
    try:
      jobs = submit_array(executor, task, [(number, t, [item.to_json() for item in group])
                                           for t, group in enumerate(groups)])
    except submitit.core.utils.FailedJobError as e:
      record_path.unlink()
      lines = [line for line in str(e).strip().splitlines() if line.strip()]
      raise FFNError(f"the cluster refused the job array: {lines[-1] if lines else e}") from None
    record["job_ids"] = [str(job.job_id) for job in jobs]
    write_text_atomic(record_path, json.dumps(record) + "\n")
    if executor.cluster == "debug":
      for job in jobs:
        job.exception()  # runs the task here; its failure is in its status file
  else:
    _log.info("nothing to submit: %d of %d blocks done, %d running or queued", status.count("done"),
              len(items), status.count("running") + status.count("queued"))
  status = compute_status(run_dir, items, worker.is_done)
  if wait and status.active:
    status = wait_for(run_dir, items, worker.is_done, jobs, poll_s)
  return status


def wait_for(run_dir: str | os.PathLike, items: Sequence[WorkItem],
             is_done: Callable[[WorkItem], bool], jobs: Sequence[submitit.Job] = (),
             poll_s: float = 5.0) -> RunStatus:
  """Polls the run's status until no item is running or queued; progress with voxels/s and ETA.
  ``jobs``: this process's submitit jobs (those found ended count as ended without sacct)."""
  total = sum(item.cost for item in items)
  status = compute_status(run_dir, items, is_done)

  def estimate() -> tuple[float | None, str]:
    return status.eta_s, f"{status.count('running')} running, {status.count('failed')} failed"

  done_voxels = sum(it.cost for it in items if status.states[it.id].state == "done")
  with Progress(total, "blocks (voxels)", unit="voxel", initial=done_voxels, estimate=estimate,
                log_every_s=30.0) as progress:
    while status.active:
      time.sleep(poll_s)
      ended = [str(job.job_id) for job in jobs if job.done()]
      status = compute_status(run_dir, items, is_done, ended_jobs=ended)
      now_done = sum(it.cost for it in items if status.states[it.id].state == "done")
      if now_done > done_voxels:
        progress.update(now_done - done_voxels)
        done_voxels = now_done
  return status
