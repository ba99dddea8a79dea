"""Atomic writes under threads, concurrent writers and SIGKILL (ffn/io/atomic.py and its users)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ffn.io import atomic

ROOT = Path(__file__).resolve().parents[1]
ATOMIC_FILE = os.path.realpath(atomic.__file__)


def _temps(directory: Path) -> list[Path]:
  return sorted(p for p in directory.rglob("*") if p.name.endswith(".tmp"))


def test_atomic_writes_never_change_the_process_umask(tmp_path):
  """At every line the writer thread executes in ffn/io/atomic.py, a second thread creates a file
  (mode 0666 requested) and a directory: both must get the process umask's permissions. The
  old code set the umask to 0 for a moment on every write (files 0666 in that window)."""
  old_umask = os.umask(0o027)
  turn, done = threading.Event(), threading.Event()
  modes: list[tuple[int, int]] = []
  finished = False

  def creator():
    i = 0
    while True:
      turn.wait()
      turn.clear()
      if finished:
        return
      path = tmp_path / "other" / f"f{i}"
      os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
      os.mkdir(tmp_path / "other" / f"d{i}", 0o777)
      modes.append((stat.S_IMODE(os.stat(path).st_mode),
                    stat.S_IMODE(os.stat(tmp_path / "other" / f"d{i}").st_mode)))
      i += 1
      done.set()

  def local_trace(frame, event, arg):
    if event == "line":
      turn.set()
      assert done.wait(10), "creator thread did not answer"
      done.clear()
    return local_trace

  def global_trace(frame, event, arg):
    if os.path.realpath(frame.f_code.co_filename) == ATOMIC_FILE:
      return local_trace
    return None

  (tmp_path / "other").mkdir()
  thread = threading.Thread(target=creator)
  thread.start()
  try:
    sys.settrace(global_trace)
    try:
      atomic.write_text_atomic(tmp_path / "out" / "a.txt", "a\n")
      with atomic.atomic_dir(tmp_path / "out" / "folder") as d:
        (d / "x").write_text("x")
    finally:
      sys.settrace(None)
  finally:
    finished = True
    turn.set()
    thread.join(10)
    os.umask(old_umask)
  assert len(modes) > 10  # the trace did run at the writer's lines
  assert set(modes) == {(0o640, 0o750)}
  assert stat.S_IMODE(os.stat(tmp_path / "out" / "a.txt").st_mode) == 0o640
  assert stat.S_IMODE(os.stat(tmp_path / "out" / "folder").st_mode) == 0o750


def test_atomic_writes_from_many_threads_get_umask_permissions(tmp_path):
  """Writers in 4 threads at once: every result has 0666 & ~umask and no temporary remains."""
  old_umask = os.umask(0o022)
  try:
    def work(t):
      for i in range(25):
        atomic.write_bytes_atomic(tmp_path / f"t{t}_{i}.bin", bytes([t, i]))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
      th.start()
    for th in threads:
      th.join()
  finally:
    os.umask(old_umask)
  files = sorted(tmp_path.iterdir())
  assert len(files) == 100
  assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
  assert (tmp_path / "t3_7.bin").read_bytes() == bytes([3, 7])


_HOLD_WRITER = """
import sys, time
from ffn.io.atomic import atomic_path, atomic_dir
kind, target = sys.argv[1], sys.argv[2]
ctx = atomic_path(target, suffix=".h5") if kind == "file" else atomic_dir(target)
with ctx as tmp:
  if kind == "file":
    open(tmp, "wb").write(b"half")
  else:
    open(tmp / "part", "wb").write(b"half")
  print("inside", flush=True)
  time.sleep(600)
"""


def _start_holder(kind: str, target: Path) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLD_WRITER, kind, str(target)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "inside"
  return proc


def test_temporaries_of_killed_writers_are_cleaned_live_ones_kept(tmp_path):
  """A writer SIGKILLed inside its atomic write leaves a temporary (file or folder); the next
  atomic write of another process into that directory removes it, but never the temporary of a
  writer that is still alive. The old code never removed any."""
  killed = [_start_holder("file", tmp_path / "a.h5"), _start_holder("dir", tmp_path / "layer")]
  live = _start_holder("file", tmp_path / "b.h5")
  try:
    for proc in killed:
      proc.send_signal(signal.SIGKILL)
      proc.wait(30)
    assert len(_temps(tmp_path)) == 3
    cleaner = subprocess.run(
        [sys.executable, "-c", "import sys; from ffn.io.atomic import write_text_atomic; "
         "write_text_atomic(sys.argv[1], 'c')", str(tmp_path / "c.txt")], cwd=ROOT, timeout=120)
    assert cleaner.returncode == 0
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].name.startswith(".b.h5.")  # the live writer's
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["c.txt"]
  finally:
    live.kill()
    live.wait(30)


def test_foreign_host_temporaries_removed_only_when_old(tmp_path):
  """Temporaries named for another host are removed once untouched for STALE_FOREIGN_S."""
  old = tmp_path / ".x.h5.~otherhost~4026531836~123~0123abcd.h5.tmp"
  fresh = tmp_path / ".y.h5.~otherhost~4026531836~124~0123abce.h5.tmp"
  old_dir = tmp_path / ".seg.~otherhost~4026531836~125~0123abcf.tmp"
  for p in (old, fresh):
    p.write_bytes(b"x")
  old_dir.mkdir()
  (old_dir / "chunk").write_bytes(b"x")
  past = time.time() - atomic.STALE_FOREIGN_S - 60
  for p in (old, old_dir / "chunk", old_dir):
    os.utime(p, (past, past))
  removed = atomic.clean_stale_temps(tmp_path)
  assert sorted(removed) == sorted([old, old_dir])
  assert fresh.exists() and not old.exists() and not old_dir.exists()
