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


# A writer that rewrites four outputs for ever, alternating two versions (A, then B, then A...):
# an npz (storage), a dataset of a two-dataset HDF5 file (write_h5), a PNG stack (A has 12 slices,
# B 8) and a two-layer precomputed export. It prints "ready" once version A of all four exists.
_LOOP_WRITER = """
import sys
import numpy as np
from ffn.inference import export, storage
from ffn.io import volumes
out = sys.argv[1]
def version(v):
  rng = np.random.default_rng(v)
  seg = rng.integers(1, 1000, (12 if v == 0 else 8, 48, 48)).astype(np.uint32)
  img = rng.integers(0, 255, seg.shape).astype(np.uint8)
  return seg, img
versions = [version(0), version(1)]
i = 0
while True:
  seg, img = versions[i % 2]
  storage.save_npz_atomic(out + "/result.npz", segmentation=seg)
  volumes.write_h5(out + "/vol.h5", "seg", seg)
  export.write_png_stack(seg, out + "/png")
  export.write_precomputed(out + "/ng", seg, img, (0, 0, 0), (8, 8, 8))
  if i == 0:
    print("ready", flush=True)
  i += 1
"""


def _versions():
  out = []
  for v in (0, 1):
    rng = np.random.default_rng(v)
    seg = rng.integers(1, 1000, (12 if v == 0 else 8, 48, 48)).astype(np.uint32)
    out.append((seg, rng.integers(0, 255, seg.shape).astype(np.uint8)))
  return out


def _read_layer(layer: Path) -> np.ndarray:
  import json
  info = json.loads((layer / "info").read_text())
  scale = info["scales"][0]
  nx, ny, nz = scale["size"]
  dtype = {"uint64": "<u8", "uint8": "<u1"}[info["data_type"]]
  out = np.zeros((nz, ny, nx), dtype)
  names = sorted(os.listdir(layer / scale["key"]))
  for name in names:
    (x0, x1), (y0, y1), (z0, z1) = (map(int, r.split("-")) for r in name.split("_"))
    block = np.frombuffer((layer / scale["key"] / name).read_bytes(), dtype)
    out[z0:z1, y0:y1, x0:x1] = block.reshape(z1 - z0, y1 - y0, x1 - x0)
  assert len(names) == 1  # 48^2 x 12 or 8 voxels: one 64^3 chunk
  return out


def _which_version(out: Path, versions) -> dict[str, int]:
  """For each of the four outputs, which version (0 or 1) it holds; AssertionError for a mix."""
  import h5py
  from PIL import Image
  found = {}
  with np.load(out / "result.npz") as data:
    seg = data["segmentation"]
  found["npz"] = [v for v, (s, _) in enumerate(versions) if np.array_equal(seg, s)]
  with h5py.File(out / "vol.h5", "r") as f:
    assert sorted(f) == ["other", "seg"]
    assert np.array_equal(f["other"][()], np.arange(5))
    seg = f["seg"][()]
  found["h5"] = [v for v, (s, _) in enumerate(versions) if np.array_equal(seg, s)]
  names = sorted(os.listdir(out / "png"))
  stack = np.stack([np.asarray(Image.open(out / "png" / n)) for n in names])
  found["png"] = [v for v, (s, _) in enumerate(versions)
                  if names == [f"seg_{z:05d}.png" for z in range(len(s))] and np.array_equal(stack, s)]
  assert sorted(os.listdir(out / "ng")) == ["image", "segmentation"]
  seg, img = _read_layer(out / "ng" / "segmentation"), _read_layer(out / "ng" / "image")
  found["precomputed"] = [v for v, (s, i) in enumerate(versions)
                          if np.array_equal(seg, s) and np.array_equal(img, i)]
  for name, match in found.items():
    assert len(match) == 1, f"{name}: neither the old nor the new version (a mix)"
  return {name: match[0] for name, match in found.items()}


def test_sigkilled_writers_leave_old_or_new_never_a_mix(tmp_path):
  """Six runs of a writer rewriting four outputs in a loop, each SIGKILLed at a random moment:
  every output then holds one complete version. The old code left a PNG stack with stale slices
  of the longer export and could leave a precomputed export without a layer, or with layers of
  two exports."""
  from ffn.io import volumes
  versions = _versions()
  out = tmp_path / "out"
  out.mkdir()
  volumes.write_h5(str(out / "vol.h5"), "other", np.arange(5))
  rng = np.random.default_rng(15)
  seen: set = set()
  for run in range(6):
    proc = subprocess.Popen([sys.executable, "-c", _LOOP_WRITER, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
      assert proc.stdout.readline().strip() == "ready"
      time.sleep(float(rng.uniform(0.05, 1.0)))
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait(30)
    seen.update(_which_version(out, versions).items())
  assert {v for _, v in seen} == {0, 1}  # the runs did catch both versions
  # The first atomic write of a new process into the folder removes what the killed ones left.
  subprocess.run([sys.executable, "-c", "import sys; from ffn.io.atomic import write_text_atomic; "
                  "write_text_atomic(sys.argv[1], 'done')", str(out / "done.txt")], cwd=ROOT,
                 timeout=120, check=True)
  assert [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".ffn-lock")] == []


_CONCURRENT_H5 = """
import sys
import numpy as np
from ffn.io import volumes
path, me = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
for k in range(8):
  volumes.write_h5(path, f"p{me}_{k}", np.full((20, 20, 20), 10 * me + k, np.int64))
"""


def test_concurrent_write_h5_keeps_every_writers_datasets(tmp_path):
  """Two processes add 8 datasets each to one HDF5 file at the same time: all 16 are there. The
  old copy-modify-rename let one writer's rename drop the other's new datasets."""
  import h5py
  path = tmp_path / "shared.h5"
  procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_H5, str(path), str(me)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
           for me in (0, 1)]
  for proc in procs:
    assert proc.stdout.readline().strip() == "ready"
  for proc in procs:  # both start writing at once
    proc.stdin.write("go\n")
    proc.stdin.flush()
  for proc in procs:
    assert proc.wait(120) == 0
  with h5py.File(path, "r") as f:
    assert sorted(f) == sorted(f"p{me}_{k}" for me in (0, 1) for k in range(8))
    assert all(int(f[f"p{me}_{k}"][0, 0, 0]) == 10 * me + k for me in (0, 1) for k in range(8))


def test_atomic_dir_without_rename_exchange_still_replaces_the_folder(tmp_path, monkeypatch):
  """Where the file system cannot exchange (NFS; simulated: this one can), the old folder is
  renamed aside, the new one put in place and the old one removed."""
  target = tmp_path / "layer"
  with atomic.atomic_dir(target) as d:
    (d / "old").write_text("old")
  monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
  with atomic.atomic_dir(target) as d:
    (d / "new").write_text("new")
  assert [p.name for p in target.iterdir()] == ["new"]
  assert [p.name for p in tmp_path.iterdir()] == ["layer"]
