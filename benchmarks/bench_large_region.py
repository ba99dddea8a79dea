"""A large region as a real Slurm job array: chunked batch inference + stitch vs one unchunked run.

  .venv/bin/python benchmarks/bench_large_region.py                      # 150^3, 8 chunks of 91^3
  .venv/bin/python benchmarks/bench_large_region.py --box 25,25,25,100,100,100 \\
      --subvolume_size 58 --overlap 16 --cluster local

Google's fib25 model (``sample_data/fib25/model``) on the shipped crop
(``sample_data/fib25/training_sample2_crop.h5``: ``raw``, body ground truth ``stack``), the
request of ``configs/inference_training_sample2.pbtxt`` pointed at the sample, in
``--compute_dtype`` (default bfloat16). Box and tiling are x,y,z in the crop's voxels.

1. Unchunked: one ``ffn run_inference`` of the whole box (a subprocess). Its result is reused when
   ``<--work_dir>/unchunked/`` already holds it for the same box and dtype.
2. Chunked: ``ffn batch_inference --subvolume_size S --overlap O --num_tasks N --wait`` on
   ``--cluster`` (default ``slurm``: a real job array), then ``ffn stitch`` of its results
   (``--min_agreement`` / ``--min_overlap``, default the command's) into HDF5, on the same
   cluster. A rerun resumes both (finished chunks are not submitted again; an existing stitched
   output of the same flags is reused).
3. First-writer-wins on the same chunk files (the SLURM fork's rule: chunks pasted in x,y,z-start
   order -- z-major corner order -- each only where nothing was written yet, ids offset to be
   unique, no merging across chunks).

Scores of each against the ground truth of the box (:func:`ffn.metrics.scores.evaluate`: VI
split/merge, adapted Rand error) and two counts of ground-truth bodies, defined in
:func:`bodies_cut`:

* ``bodies split``: a body b and an object u of the unchunked run (both non-zero) such that the
  voxels of b inside u that the method labels (non-zero) carry at least two method ids -- a body
  the method splits where the unchunked run kept it whole (anywhere: seeding order also differs
  inside chunks).
* ``bodies cut at seams``: the subset where two such voxels with different method ids are face
  neighbours (6-connectivity) on the two sides of a seam plane: a chunk face (where
  first-writer-wins switches from one chunk's labels to the next) or the middle of two
  neighbouring chunks' overlap (where stitching switches owners). Cuts elsewhere (seeding order
  differs inside chunks too) are not counted.

Prints one JSON line per method, a Markdown table, and writes all of it to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_stitch import first_writer_wins  # noqa: E402
from ffn.axes import BoundingBox, split_box  # noqa: E402
from ffn.inference import storage  # noqa: E402
from ffn.inference.request import format_bounding_box  # noqa: E402
from ffn.metrics.scores import evaluate  # noqa: E402

SAMPLE = REPO / "sample_data" / "fib25" / "training_sample2_crop.h5"


def write_request(path: Path, output_dir: Path) -> Path:
  """configs/inference_training_sample2.pbtxt with absolute sample paths and ``output_dir``."""
  from ffn.demo import write_sample_request
  return write_sample_request(path, output_dir)


def ffn_command(args: list[str], log: Path) -> float:
  """Runs ``python -m ffn.cli ARGS`` from the repository root (output to ``log``); wall seconds."""
  t0 = time.monotonic()
  with log.open("w") as f:
    result = subprocess.run([sys.executable, "-m", "ffn.cli", *args], cwd=REPO, stdout=f,
                            stderr=subprocess.STDOUT, check=False)
  wall = time.monotonic() - t0
  if result.returncode != 0:
    tail = log.read_text()[-3000:]
    raise SystemExit(f"ffn {args[0]} failed ({result.returncode}), log {log}:\n{tail}")
  return wall


def chunk_boxes(box: BoundingBox, size: int, overlap: int) -> list[BoundingBox]:
  return split_box(box, (size,) * 3, (overlap,) * 3)


def seam_planes(box: BoundingBox, chunks: list[BoundingBox]) -> list[list[int]]:
  """Per axis (z,y,x), the box-relative coordinates q where voxels q-1 and q lie on two sides of a
  chunk face (where first-writer-wins switches chunks) or of an ownership boundary (the middle
  ``(s_i + e_{i-1}) // 2`` of two neighbouring chunks' overlap, where stitching switches)."""
  planes = []
  for a in range(3):
    lo, n = int(box.start[::-1][a]), int(box.size[::-1][a])
    starts = sorted({int(c.start[::-1][a]) - lo for c in chunks})
    ends = sorted({int(c.start[::-1][a]) + int(c.size[::-1][a]) - lo for c in chunks})
    middles = [(s + e) // 2 for s, e in zip(starts[1:], ends[:-1])]
    planes.append(sorted({q for q in starts + ends + middles if 0 < q < n}))
  return planes


def bodies_cut(method: np.ndarray, unchunked: np.ndarray, gt: np.ndarray,
               planes: list[list[int]]) -> tuple[int, int]:
  """(bodies split, bodies cut at seams) of ``method`` relative to ``unchunked`` (all z,y,x).

  A ground-truth body b (id != 0) is *split* when some object u != 0 of the unchunked run has,
  among the voxels of b inside u where ``method`` is non-zero, at least two distinct method ids.
  It is *cut at a seam* when moreover two face-adjacent voxels v, w both in b and in the same u,
  with non-zero and different method ids, lie on the two sides of a seam plane (``planes``, from
  :func:`seam_planes`).
  """
  triples = np.stack([gt.ravel(), unchunked.ravel().astype(np.int64),
                      method.ravel().astype(np.int64)])
  triples = triples[:, (triples[0] != 0) & (triples[1] != 0) & (triples[2] != 0)]
  triples = np.unique(triples, axis=1)
  pairs, counts = np.unique(triples[:2], axis=1, return_counts=True)
  split = set(np.unique(pairs[0, counts > 1]).tolist())
  cut: set[int] = set()
  for axis in range(3):
    q = np.asarray(planes[axis], np.int64)
    if not q.size:
      continue
    lo = [np.take(x, q - 1, axis=axis) for x in (gt, unchunked, method)]
    hi = [np.take(x, q, axis=axis) for x in (gt, unchunked, method)]
    where = ((lo[0] != 0) & (lo[0] == hi[0]) & (lo[1] != 0) & (lo[1] == hi[1]) & (lo[2] != 0)
             & (hi[2] != 0) & (lo[2] != hi[2]))
    cut.update(np.unique(lo[0][where]).tolist())
  return len(split), len(cut)


def load_unchunked(directory: Path, box: BoundingBox) -> np.ndarray | None:
  path = storage.segmentation_path(str(directory), tuple(int(v) for v in box.start[::-1]))
  if not os.path.exists(path):
    return None
  labels, _ = storage.load_segmentation_file(path)
  return labels


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--box", default="0,0,0,150,150,150",
                      help="x,y,z start then x,y,z size in the crop's voxels (default: all of it)")
  parser.add_argument("--subvolume_size", type=int, default=91, help="chunk edge (voxels)")
  parser.add_argument("--overlap", type=int, default=32, help="chunk overlap (voxels)")
  parser.add_argument("--compute_dtype", default="bfloat16")
  parser.add_argument("--cluster", default="slurm", help="cluster of both array runs")
  parser.add_argument("--num_tasks", type=int, default=4,
                      help="array tasks of the batch run (the local Slurm node runs 4 at once)")
  parser.add_argument("--min_agreement", default=None, help="ffn stitch --min_agreement")
  parser.add_argument("--min_overlap", default=None, help="ffn stitch --min_overlap")
  parser.add_argument("--work_dir", default=str(REPO / "work_dirs" / "large_region"),
                      help="results; a rerun reuses (resumes) what is there (default: %(default)s)")
  parser.add_argument("--json", default=None, help="(default: <work_dir>/large_region.json)")
  args = parser.parse_args()
  values = [int(v) for v in args.box.split(",")]
  box = BoundingBox(values[:3], values[3:])
  work = Path(args.work_dir).absolute()
  tag = f"{'_'.join(map(str, values))}-{args.compute_dtype}"
  chunks = chunk_boxes(box, args.subvolume_size, args.overlap)
  tiling = f"{len(chunks)}x{args.subvolume_size}^3-o{args.overlap}"
  run = work / f"chunked-{tag}-{tiling}"
  common = ["--bounding_box", format_bounding_box(box), "--compute_dtype", args.compute_dtype]
  timings: dict[str, float] = {}

  unchunked_dir = work / f"unchunked-{tag}"
  unchunked = load_unchunked(unchunked_dir, box)
  if unchunked is None:
    request = write_request(unchunked_dir / "request.pbtxt", unchunked_dir)
    seconds = ffn_command(["run_inference", "--inference_request", str(request), *common],
                          unchunked_dir / "run_inference.log")
    (unchunked_dir / "seconds.json").write_text(json.dumps({"unchunked_s": seconds}) + "\n")
    unchunked = load_unchunked(unchunked_dir, box)
  if (unchunked_dir / "seconds.json").exists():  # also when reused: the time it took then
    timings.update(json.loads((unchunked_dir / "seconds.json").read_text()))
  print(f"unchunked: {unchunked_dir}", flush=True)

  request = write_request(run / "request.pbtxt", run / "seg")
  slurm = ["--cluster", args.cluster, "--slurm_job_name", f"ffn-bench-{uuid.uuid4().hex[:8]}",
           "--slurm_time_min", "120", "--slurm_cpus_per_task", "1", "--slurm_mem_gb", "3"]
  timings["batch_inference_s"] = ffn_command(  # with --wait: until the last chunk is done
      ["batch_inference", "--inference_request", str(request), *common, "--subvolume_size",
       f"{args.subvolume_size}", "--overlap", f"{args.overlap}", "--num_tasks",
       str(args.num_tasks), "--wait", *slurm],
      run / "batch_inference.log")
  stitch_flags = []
  if args.min_agreement is not None:
    stitch_flags += ["--min_agreement", args.min_agreement]
  if args.min_overlap is not None:
    stitch_flags += ["--min_overlap", args.min_overlap]
  output = run / f"stitched{''.join(stitch_flags).replace('--', '-')}.h5"
  if not output.exists():
    timings["stitch_s"] = ffn_command(
        ["stitch", "--segmentation_dir", str(run / "seg"), "--output", f"{output}:seg",
         *stitch_flags, *slurm], run / f"{output.name}.log")

  import h5py
  from ffn.io.tensorstore_volumes import read_labels
  stitched, corner = read_labels(f"{output}:seg")
  assert tuple(corner) == tuple(int(v) for v in box.start[::-1]), corner
  zyx = tuple(slice(int(s), int(s) + int(n)) for s, n in zip(box.start[::-1], box.size[::-1]))
  with h5py.File(SAMPLE, "r") as f:
    gt = f["stack"][zyx]
  corners = [(tuple(int(v) for v in c.start[::-1]), tuple(int(v) for v in c.size[::-1]))
             for c in chunks]
  fww = first_writer_wins(run / "seg", corners, tuple(int(v) for v in box.start[::-1]), gt.shape)
  planes = seam_planes(box, chunks)
  summary = json.loads((run / f"{output.name}.stitch" / "summary.json").read_text())
  tasks = [json.loads(t.read_text()) for t in (run / "seg" / "batch" / "tasks").glob("*.json")]
  timings["batch_tasks_wall_s"] = max(t["ended"] for t in tasks) - min(t["started"] for t in tasks)
  timings["chunk_s_sum"] = sum(sum(t["seconds"].values()) for t in tasks)

  rows = []
  for method, labels in (("unchunked", unchunked), ("stitched", stitched),
                         ("first-writer-wins", fww)):
    scores = evaluate(labels, gt)
    split, cut = bodies_cut(labels, unchunked, gt, planes)
    rows.append({"method": method, "segments": scores["segments"],
                 "vi_split": round(scores["vi_split"], 4) + 0.0,
                 "vi_merge": round(scores["vi_merge"], 4) + 0.0,
                 "adapted_rand_error": round(scores["adapted_rand_error"], 4) + 0.0,
                 "fraction_unsegmented": round(scores["fraction_unsegmented"], 4),
                 "bodies_split": split, "bodies_cut_at_seams": cut})
    print(json.dumps(rows[-1]), flush=True)
  result = {"box_xyz": values, "chunks": len(chunks), "subvolume_size": args.subvolume_size,
            "overlap": args.overlap, "compute_dtype": args.compute_dtype, "cluster": args.cluster,
            "stitch_flags": stitch_flags, "groundtruth_bodies": int(np.count_nonzero(np.unique(gt))),
            "objects_merged_across_seams": summary.get("objects_merged_across_seams"),
            "timings_s": {k: round(v, 1) for k, v in timings.items()}, "run_dir": str(run),
            "rows": rows}
  delta = rows[1]["adapted_rand_error"] - rows[0]["adapted_rand_error"]
  result["stitched_minus_unchunked_adapted_re"] = round(delta, 4)
  path = Path(args.json) if args.json else work / "large_region.json"
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"\n{format_bounding_box(box)}, {len(chunks)} chunks of {args.subvolume_size}^3, overlap "
        f"{args.overlap}, {args.compute_dtype}, {result['groundtruth_bodies']} ground-truth bodies; "
        f"times {result['timings_s']}")
  print("\n| method | segments | VI split | VI merge | adapted RE | GT bodies split | "
        "cut at seams |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['segments']} | {r['vi_split']} | {r['vi_merge']} | "
          f"{r['adapted_rand_error']} | {r['bodies_split']} | {r['bodies_cut_at_seams']} |")
  print(f"\nstitched - unchunked adapted RE: {delta:+.4f}; JSON: {path}")


if __name__ == "__main__":
  main()
