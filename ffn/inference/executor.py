"""Batching network calls of several canvases into one (google/ffn's threading batch executor).

One flood fill makes one small network call per step, which leaves an accelerator mostly idle.
Segmenting several subvolumes at once, each canvas in its own thread, lets one executor thread
stack their pending field-of-view inputs into a single batch:

* every canvas gets an :class:`ExecutorClient`, a drop-in ``predict`` callable that submits one
  input ``[1, z, y, x, 2]`` and blocks until its logits come back;
* a client counts as *active* from its first call until :meth:`ExecutorClient.close`;
* the executor runs a batch as soon as ``min(active clients, batch_size)`` inputs are waiting,
  or ``max_wait_s`` after it could first have run one (the later of: the oldest waiting input
  arrived, the previous batch finished), so a canvas that is busy saving a checkpoint or
  finishing an object does not stall the others for long. Measuring from the end of the
  previous batch matters: inputs that arrived while it ran are not "late", and waiting a moment
  for the canvases that just got their results lets the batches fill up (measured on the fib25
  model in bfloat16: with 4 canvases and batch 4, mean batch 1.7 when counted from arrival, 3.4
  this way).

Differences from google/ffn, on purpose: a client registers at its first network call rather
than when its canvas is built (so a canvas still loading its image or computing seed points does
not hold the others back), and the ``max_wait_s`` bound above. Each input is evaluated on its
own: the network has no cross-sample terms, and on CPU (oneDNN) a sample's logits are bitwise
identical whatever batch it runs in, so batching does not change any segmentation there.

:func:`segment_boxes` runs a :class:`~ffn.inference.runner.Runner` over many boxes this way.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ffn.inference.canvas import InferenceInterrupted
from ffn.inference.counters import Counters, timer_counter
from ffn.progress import Progress, track

if TYPE_CHECKING:
  from ffn.axes import BoundingBox
  from ffn.inference.runner import Runner

_log = logging.getLogger(__name__)


class ExecutorError(RuntimeError):
  """The network call of a batch failed; every client waiting on that batch gets this."""


class _Request:
  __slots__ = ("x", "result", "error", "done", "submitted")

  def __init__(self, x: np.ndarray):
    self.x = x
    self.result: np.ndarray | None = None
    self.error: BaseException | None = None
    self.done = threading.Event()
    self.submitted = time.monotonic()


class BatchExecutor:
  """Owns the network; evaluates inputs from many clients in batches of up to ``batch_size``.

  Use as a context manager (starts and stops the executor thread). ``predict`` maps float32
  ``[b, z, y, x, 2]`` to logits ``[b, z, y, x, 1]``; it is only ever called from the executor
  thread. ``counters`` gets ``executor-batches``, ``executor-inputs`` and
  ``executor-inference-time-ms``.
  """

  def __init__(self, predict: Callable[[np.ndarray], np.ndarray], batch_size: int = 1,
               max_wait_s: float = 0.02, counters: Counters | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.predict = predict
    self.batch_size = int(batch_size)
    self.max_wait_s = float(max_wait_s)
    self.counters = counters if counters is not None else Counters()
    self._cond = threading.Condition()
    self._pending: list[_Request] = []
    self._active = 0
    self._free_since = time.monotonic()  # when the executor thread last became idle
    self._closing = False
    self._thread: threading.Thread | None = None

  # -- lifecycle ---------------------------------------------------------------------------------

  def start(self) -> "BatchExecutor":
    if self._thread is None:
      self._closing = False
      self._thread = threading.Thread(target=self._loop, name="ffn-batch-executor", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the executor thread once the inputs already submitted are evaluated."""
    if self._thread is None:
      return
    with self._cond:
      self._closing = True
      self._cond.notify_all()
    self._thread.join()
    self._thread = None

  def __enter__(self) -> "BatchExecutor":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def client(self) -> "ExecutorClient":
    return ExecutorClient(self)

  # -- client side -------------------------------------------------------------------------------

  def _register(self) -> None:
    with self._cond:
      self._active += 1

  def _deregister(self) -> None:
    with self._cond:
      self._active -= 1
      self._cond.notify_all()  # fewer clients may now be enough to fill a batch

  def _submit(self, x: np.ndarray) -> np.ndarray:
    request = _Request(x)
    with self._cond:
      if self._thread is None or self._closing:
        raise ExecutorError("the batch executor is not running")
      self._pending.append(request)
      self._cond.notify_all()
    request.done.wait()
    if request.error is not None:
      raise ExecutorError(f"network call failed: {request.error}") from request.error
    assert request.result is not None
    return request.result

  # -- executor thread ---------------------------------------------------------------------------

  def _ready(self) -> bool:
    if not self._pending:
      return False
    if self._closing or len(self._pending) >= min(max(self._active, 1), self.batch_size):
      return True
    return time.monotonic() >= self._deadline()

  def _deadline(self) -> float:
    return max(self._pending[0].submitted, self._free_since) + self.max_wait_s

  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._ready():
          if self._closing and not self._pending:
            return
          timeout = None
          if self._pending:
            timeout = max(self._deadline() - time.monotonic(), 1e-4)
          self._cond.wait(timeout)
        batch = self._pending[:self.batch_size]
        del self._pending[:self.batch_size]
      self._run_batch(batch)
      with self._cond:
        self._free_since = time.monotonic()

  def _run_batch(self, batch: Sequence[_Request]) -> None:
    try:
      x = np.concatenate([r.x for r in batch], axis=0)
      with timer_counter(self.counters, "executor-inference"):
        logits = np.asarray(self.predict(x), dtype=np.float32)
      if logits.shape[0] != len(batch):
        raise ValueError(f"predict returned batch {logits.shape[0]} for {len(batch)} inputs")
    except Exception as e:  # noqa: BLE001 - handed to every waiting client, which re-raises
      _log.exception("batch of %d inputs failed", len(batch))
      for request in batch:
        request.error = e
        request.done.set()
      return
    self.counters.increment("executor-batches")
    self.counters.increment("executor-inputs", len(batch))
    for i, request in enumerate(batch):
      request.result = logits[i:i + 1]
      request.done.set()


class ExecutorClient:
  """A ``predict`` callable for one canvas that routes its calls through a :class:`BatchExecutor`.

  Call :meth:`close` (or use it as a context manager) when the canvas is finished, so the executor
  stops waiting for it.
  """

  def __init__(self, executor: BatchExecutor):
    self._executor = executor
    self._registered = False

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 5 or x.shape[0] != 1:
      raise ValueError(f"executor clients take one input [1, z, y, x, c], got shape {x.shape}")
    if not self._registered:
      self._executor._register()
      self._registered = True
    return self._executor._submit(x)

  def close(self) -> None:
    if self._registered:
      self._registered = False
      self._executor._deregister()

  def __enter__(self) -> "ExecutorClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def segment_boxes(runner: "Runner", boxes: Sequence["BoundingBox"], batch_size: int = 1,
                  concurrent_requests: int = 1, max_wait_s: float = 0.02) -> list[str]:
  """Segments ``boxes`` with up to ``concurrent_requests`` canvases at once; returns result paths.

  Boxes whose result exists are skipped. Network calls of the running canvases are batched (up to
  ``batch_size``). Each box is saved, checkpointed and resumed on its own, exactly as
  :meth:`Runner.run` does. A failure (or a stop request) stops every running canvas at its next
  step (each saves its checkpoint) and no further box starts; then the failure is re-raised
  (:class:`~ffn.inference.canvas.InferenceInterrupted` for a stop request).
  """
  paths = [runner.paths(box)[0] for box in boxes]
  todo = [box for box in boxes if not runner.is_done(box)]
  if not todo:
    return paths
  runner.load_model()
  concurrent_requests = max(1, min(int(concurrent_requests), len(todo)))
  if concurrent_requests == 1 and batch_size == 1:
    if len(todo) == 1:
      runner.run(todo[0])
    else:
      for box in track(todo, "subvolumes", unit="subvolume"):
        runner.run(box)
    return paths
  _log.info("segmenting %d subvolumes, %d at a time, batches of up to %d", len(todo),
            concurrent_requests, batch_size)
  executor_counters = Counters()
  with BatchExecutor(runner.predict, batch_size, max_wait_s, executor_counters) as executor:

    def one(box: "BoundingBox") -> str:
      if runner.stop_requested:
        raise _Skipped()
      try:
        with executor.client() as client:
          return runner.run(box, predict=client)
      except BaseException:
        runner.request_stop()  # at once: no further box may start, running ones checkpoint
        raise

    errors: list[BaseException] = []
    with futures.ThreadPoolExecutor(concurrent_requests, thread_name_prefix="ffn-canvas") as pool, \
        Progress(len(todo), "subvolumes", unit="subvolume", log_every_s=60.0) as progress:
      jobs = [pool.submit(one, box) for box in todo]
      for job in futures.as_completed(jobs):
        try:
          job.result()
          progress.update()
        except _Skipped:
          continue
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every canvas stopped
          errors.append(e)
  runner.counters.add(executor_counters)
  if errors:
    # The cause, not the InferenceInterrupted of the canvases it stopped (if it was not a stop).
    raise next((e for e in errors if not isinstance(e, InferenceInterrupted)), errors[0])
  calls = max(executor_counters["executor-batches"], 1)
  _log.info("executor: %d network calls for %d inputs (mean batch %.2f)", calls,
            executor_counters["executor-inputs"], executor_counters["executor-inputs"] / calls)
  return paths


class _Skipped(Exception):
  """A box not started because the run is stopping."""
