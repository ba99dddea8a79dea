"""Stitching: throughput and peak memory per task at two volume sizes; stitch vs first-writer-wins.

  .venv/bin/python benchmarks/bench_stitch.py                  # both parts, defaults below
  .venv/bin/python benchmarks/bench_stitch.py --sizes 256 --skip_groundtruth

Part 1 (``--sizes``, default 256,512): a synthetic label volume of size^3 voxels -- sheared slabs
intersected into ~40^3-voxel convex objects, ids from the voxel's slab indices, some background --
is written as google-layout chunk results of ``--chunk`` ^3 voxels with ``--overlap``
(``split_box``), every chunk renumbered at random, without ever holding the volume (each chunk is
computed on its own). Then ``ffn stitch --cluster local`` (every array task its own process,
``--num_tasks`` per phase, Zarr output in 64^3 storage chunks written in 64^3 blocks,
``--min_overlap 1``) runs as a subprocess and is timed.
Reported: voxels/s of the whole command (from start to the output in place) and per phase, and
per phase the largest growth of a task's resident memory over its idle baseline (``VmHWM`` after
``VmRSS`` at the task's start; see ``ffn.stitch.stitch``) against one chunk's label array
(chunk^3 x 8 bytes, uint64): the requirement is < 4x at every size, i.e. not growing with the
volume. The stitched volume is checked against the synthetic partition block by block (every
object is convex, so with ``--min_overlap 1`` stitching must recover it exactly).

Part 2 (unless ``--skip_groundtruth``): the shipped ground truth (150^3) in chunks of 64^3 with
overlap 16 and 32, random ids per chunk, combined by first-writer-wins (the SLURM fork's rule:
chunks pasted in file order where nothing was written yet, each chunk's ids offset to be unique,
no merging) and by ``ffn stitch`` (default rule and ``--min_overlap 1``): objects, ground-truth
bodies that get more than one id, VI split/merge and adapted Rand error against the ground truth.

Prints a JSON line per result and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffn.axes import BoundingBox, split_box  # noqa: E402
from ffn.inference import storage  # noqa: E402
from ffn.metrics.scores import evaluate  # noqa: E402


def synthetic_labels(corner_zyx, shape_zyx) -> np.ndarray:
  """Global synthetic ids (int64, 0 = background) of a box: the index triple of three sheared
  slab families, ~37-43 voxels apart; every fifth triple is background."""
  z, y, x = (np.arange(c, c + n, dtype=np.float64) for c, n in zip(corner_zyx, shape_zyx))
  z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
  a = np.floor((x + 0.37 * y + 0.11 * z) / 37.0).astype(np.int64)
  b = np.floor((y + 0.23 * z + 0.05 * x) / 41.0).astype(np.int64)
  c = np.floor((z + 0.13 * x) / 43.0).astype(np.int64)
  ids = 1 + a + 100 * b + 10000 * c
  return np.where(ids % 5 == 0, 0, ids)


def renumber_randomly(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  ids, inverse = np.unique(labels, return_inverse=True)
  new = rng.choice(np.arange(1, 1 << 24), size=ids.size, replace=False)
  new[ids == 0] = 0
  return new[inverse.reshape(labels.shape)]


def write_synthetic_chunks(directory: Path, size: int, chunk: int, overlap: int) -> set[int]:
  """Chunk results of the synthetic volume; returns the set of its non-zero global ids."""
  rng = np.random.default_rng(size)
  present: set[int] = set()
  for box in split_box(BoundingBox((0, 0, 0), (size,) * 3), (chunk,) * 3, (overlap,) * 3):
    corner, shape = tuple(box.start[::-1].tolist()), tuple(box.size[::-1].tolist())
    labels = synthetic_labels(corner, shape)
    present.update(int(v) for v in np.unique(labels) if v)
    storage.save_subvolume(renumber_randomly(labels, rng), {},
                           storage.segmentation_path(str(directory), corner))
  return present


def run_stitch(seg_dir: Path, output: str, work_dir: Path, extra: list[str]) -> tuple[float, dict]:
  """Runs ``ffn stitch`` as a subprocess; returns (wall seconds, its summary)."""
  t0 = time.monotonic()
  result = subprocess.run([sys.executable, "-m", "ffn.cli", "stitch", "--segmentation_dir",
                           str(seg_dir), "--output", output, "--work_dir", str(work_dir), *extra],
                          cwd=REPO, capture_output=True, text=True)
  wall = time.monotonic() - t0
  if result.returncode != 0:
    raise SystemExit(f"ffn stitch failed ({result.returncode}): {result.stderr[-3000:]}")
  return wall, json.loads((work_dir / "summary.json").read_text())


def check_synthetic(output: str, size: int, chunk: int, expected_ids: set[int]) -> None:
  """The stitched Zarr equals the synthetic partition up to renaming (checked block by block)."""
  from ffn.io.tensorstore_volumes import read_labels
  pairs: set[tuple[int, int]] = set()
  for z in range(0, size, chunk):
    for y in range(0, size, chunk):
      for x in range(0, size, chunk):
        shape = [min(chunk, size - v) for v in (z, y, x)]
        got, _ = read_labels(output, (z, y, x), shape)
        want = synthetic_labels((z, y, x), shape)
        if not np.array_equal(got == 0, want == 0):
          raise SystemExit(f"background differs in the block at {(x, y, z)} (x,y,z)")
        code = np.unique(np.stack([got.ravel().astype(np.int64), want.ravel()]), axis=1)
        pairs.update((int(a), int(b)) for a, b in code.T if b)
  stitched = {a for a, _ in pairs}
  truth = {b for _, b in pairs}
  if not (len(pairs) == len(stitched) == len(truth) == len(expected_ids)):
    raise SystemExit(f"stitched partition differs: {len(pairs)} pairs, {len(stitched)} stitched "
                     f"ids, {len(truth)} synthetic ids of {len(expected_ids)}")


def bench_sizes(args, tmp: Path) -> list[dict]:
  rows = []
  chunk_bytes = args.chunk ** 3 * 8
  for size in args.sizes:
    seg = tmp / f"seg{size}"
    t0 = time.monotonic()
    ids = write_synthetic_chunks(seg, size, args.chunk, args.overlap)
    made = time.monotonic() - t0
    output = f"zarr://{tmp / f'stitched{size}.zarr'}"
    wall, summary = run_stitch(seg, output, tmp / f"work{size}", [
        "--cluster", "local", "--num_tasks", str(args.num_tasks), "--min_overlap", "1",
        "--chunk_size", "64,64,64", "--block_size", "64,64,64"])
    check_synthetic(output, size, args.chunk, ids)
    row = {"size": size, "chunks": summary["chunks"], "objects": summary["objects"],
           "make_chunks_s": round(made, 1), "wall_s": round(wall, 2),
           "voxels_per_s": size ** 3 / wall, "seconds": summary["seconds"],
           "chunk_label_array_mib": chunk_bytes / 2 ** 20}
    for phase, mem in summary["memory"].items():
      row[f"{phase}_growth_mib"] = round(mem["max_growth_kib"] / 1024, 1)
      row[f"{phase}_growth_x_chunk"] = round(mem["max_growth_kib"] * 1024 / chunk_bytes, 2)
      row[f"{phase}_peak_mib"] = round(mem["max_peak_rss_kib"] / 1024, 1)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def first_writer_wins(seg_dir: Path, boxes, offset_zyx, shape_zyx) -> np.ndarray:
  """The SLURM fork's combination: chunks in file order, each pasted where the output is still
  0, its ids shifted past every earlier chunk's (no merging across chunks)."""
  out = np.zeros(shape_zyx, np.uint64)
  shift = 0
  for corner, shape in sorted(boxes):
    labels, _ = storage.load_segmentation_file(storage.segmentation_path(str(seg_dir), corner))
    sl = tuple(slice(c - o, c - o + n) for c, o, n in zip(corner, offset_zyx, shape))
    region = out[sl]
    empty = (region == 0) & (labels != 0)
    region[empty] = labels[empty] + np.uint64(shift)
    shift += int(labels.max())
  return out


def bodies_split(seg: np.ndarray, gt: np.ndarray) -> int:
  """Ground-truth bodies whose voxels carry more than one non-zero id."""
  pairs = np.unique(np.stack([gt.ravel(), seg.ravel().astype(np.int64)]), axis=1)
  pairs = pairs[:, (pairs[0] != 0) & (pairs[1] != 0)]
  _, counts = np.unique(pairs[0], return_counts=True)
  return int((counts > 1).sum())


def bench_groundtruth(tmp: Path) -> list[dict]:
  with h5py.File(REPO / "sample_data" / "fib25" / "training_sample2_crop.h5", "r") as f:
    gt = f["stack"][...]
  offset = (50, 50, 50)
  rows = []
  base = {"segments": int(np.unique(gt).size), "bodies_split": bodies_split(gt, gt)}
  rows.append({"method": "ground truth", "overlap": None, **base})
  print(json.dumps(rows[-1]), flush=True)
  for overlap in (16, 32):
    seg = tmp / f"gt{overlap}"
    region = BoundingBox(offset[::-1], gt.shape[::-1])
    boxes = [(tuple(b.start[::-1].tolist()), tuple(b.size[::-1].tolist()))
             for b in split_box(region, (64, 64, 64), (overlap,) * 3)]
    rng = np.random.default_rng(overlap)
    for corner, shape in boxes:
      sub = gt[tuple(slice(c - o, c - o + n) for c, o, n in zip(corner, offset, shape))]
      storage.save_subvolume(renumber_randomly(sub, rng), {},
                             storage.segmentation_path(str(seg), corner))
    results = {"first-writer-wins": first_writer_wins(seg, boxes, offset, gt.shape)}
    for label, flags in (("stitch (defaults)", []), ("stitch --min_overlap 1", ["--min_overlap", "1"])):
      out = tmp / f"gt{overlap}_{len(flags)}.h5"
      run_stitch(seg, f"{out}:seg", tmp / f"{out.name}.work",
                 ["--cluster", "local", "--num_tasks", "2", *flags])
      with h5py.File(out, "r") as f:
        results[label] = f["seg"][...]
    for method, labels in results.items():
      scores = evaluate(labels, gt)
      rows.append({"method": method, "overlap": overlap, "chunks": len(boxes),
                   "segments": scores["segments"], "bodies_split": bodies_split(labels, gt),
                   "vi_split": round(scores["vi_split"], 4) + 0.0,
                   "vi_merge": round(scores["vi_merge"], 4) + 0.0,  # + 0.0: no "-0.0"
                   "adapted_rand_error": round(scores["adapted_rand_error"], 4) + 0.0})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="256,512", help="synthetic volume edges (voxels)")
  parser.add_argument("--chunk", type=int, default=128, help="chunk edge (voxels)")
  parser.add_argument("--overlap", type=int, default=32, help="chunk overlap (voxels)")
  parser.add_argument("--num_tasks", type=int, default=4, help="array tasks per phase")
  parser.add_argument("--skip_groundtruth", action="store_true")
  parser.add_argument("--skip_sizes", action="store_true")
  args = parser.parse_args()
  args.sizes = [int(v) for v in args.sizes.split(",")]
  with tempfile.TemporaryDirectory(prefix="bench_stitch.") as tmp:
    sizes = [] if args.skip_sizes else bench_sizes(args, Path(tmp))
    truth = [] if args.skip_groundtruth else bench_groundtruth(Path(tmp))
  if sizes:
    print("\n| volume | chunks | objects | wall s | Mvoxels/s | extract / match / resolve / write s "
          "| task growth extract / match / write (MiB) | x one chunk's uint64 labels |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sizes:
      s = r["seconds"]
      print(f"| {r['size']}^3 | {r['chunks']} | {r['objects']} | {r['wall_s']} | "
            f"{r['voxels_per_s'] / 1e6:.2f} | {s['extract_s']:.1f} / {s['match_s']:.1f} / "
            f"{s['resolve_s']:.1f} / {s['write_s']:.1f} | {r['extract_growth_mib']} / "
            f"{r['match_growth_mib']} / {r['write_growth_mib']} | {r['extract_growth_x_chunk']} / "
            f"{r['match_growth_x_chunk']} / {r['write_growth_x_chunk']} |")
  if truth:
    print("\n| method | overlap | segments | GT bodies split | VI split | VI merge | adapted RE |")
    print("|---|---|---|---|---|---|---|")
    for r in truth:
      print(f"| {r['method']} | {r['overlap'] or '-'} | {r['segments']} | {r['bodies_split']} | "
            f"{r.get('vi_split', 0)} | {r.get('vi_merge', 0)} | {r.get('adapted_rand_error', 0)} |")


if __name__ == "__main__":
  main()
