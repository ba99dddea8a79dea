"""The pipeline's report: ``report.html``, ``report.md`` (+ ``report/*.png``) and ``report.json``
of a run directory (``ffn pipeline report <run_dir>``; the pipeline's last stage calls
:func:`write_report`).

  ffn pipeline report runs/demo/

It reads ``plan.json`` and every ``stages/<name>/stage.json`` (layout: the pipeline's run
directory) and reports, per stage:

* **scores** against the ground truth (when the plan has one) of every scoreable output: VI split
  and merge (nats), adapted and adjusted Rand error, segments, unsegmented fraction, as
  ``ffn evaluate`` computes them (:mod:`ffn.metrics.scores`), but blockwise (:mod:`ffn.pipeline.scores`:
  memory O(block + contingency table)). A segmentation volume or result npz is scored over its
  box (``segmentation_box``, default the run's region); a ``chunks_dir`` (forward / reverse /
  consensus results per chunk) chunk by chunk, each against the ground truth of its own box,
  reported as the mean weighted by scored voxels, with the per-chunk table;
* **object statistics** (objects, unsegmented fraction, object sizes in voxels), blockwise too;
* **previews**: the xy, xz and yz planes through the region centre, image + segmentation
  (:mod:`ffn.pipeline.previews`; a chunks_dir shows the chunk holding the centre);
* **time and resources**: the stage's wall time from stage.json and, for its Slurm job ids,
  ``sacct`` (Elapsed, AllocCPUS, ReqMem, MaxRSS, State per task); "local" for a stage that ran
  without Slurm; where ``sacct`` is absent or fails, the report says so and goes on;
* the plan (stages, tasks, resources), the config (``pipeline.toml``), the Neuroglancer folder
  with its ``ffn serve`` command and link, and the stage's other files.

``report.html`` is self-contained: inline CSS, the previews as ``data:`` URIs, no script, nothing
fetched. ``report.md`` links the same previews as ``report/<label>.png``. ``report.json`` holds the
scores, statistics, times and resources. Each output is written atomically (:mod:`ffn.io.atomic`):
first the ``report/`` folder (exchanged as a whole), then report.json, report.md and last
report.html, so each of them is the complete old or new one.
"""

from __future__ import annotations

import argparse
import base64
import collections
import dataclasses
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ffn.axes import BoundingBox, parse_xyz
from ffn.errors import FFNError
from ffn.pipeline import previews
from ffn.pipeline.scores import LabelSource, chunk_mean, measure, object_stats

SACCT_FORMAT = "JobID,Elapsed,AllocCPUS,ReqMem,MaxRSS,State"
SACCT_TIMEOUT_S = 60.0
DEFAULT_RESOLUTION_NM = (10.0, 10.0, 10.0)
SERVE_PORT = 8000  # ``ffn serve``'s default port, for the printed Neuroglancer link
SCOREABLE = ("segmentation", "chunks_dir")


# ----------------------------------------------------------------------------- inputs

def _read_json(path: Path, what: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FFNError(f"{path}: not found ({what})") from None
  except (OSError, ValueError) as e:
    raise FFNError(f"{path}: unreadable {what} ({e})") from None
  if not isinstance(data, dict):
    raise FFNError(f"{path}: {what} must be a JSON object")
  return data


def _box(value: Any, where: str) -> BoundingBox:
  try:
    return BoundingBox(value["start"], value["size"])
  except (KeyError, TypeError, ValueError) as e:
    raise FFNError(f"{where}: expected {{\"start\": [x,y,z], \"size\": [x,y,z]}} ({e})") from None


def _resolve_path(path: str, run_dir: Path) -> str:
  """``path``, relative to ``run_dir`` unless absolute (the pipeline writes absolute paths)."""
  return path if os.path.isabs(path) else str(run_dir / path)


def _resolve(spec: str, run_dir: Path) -> str:
  """The volume spec or result npz ``spec`` with a relative path made relative to ``run_dir``."""
  from ffn.io.volumes import parse_spec
  if spec.endswith(".npz"):
    return _resolve_path(spec, run_dir)
  try:
    parsed = parse_spec(spec)
  except FFNError:
    return spec
  if parsed.scheme == "json" or os.path.isabs(parsed.path):
    return spec
  return str(dataclasses.replace(parsed, path=str(run_dir / parsed.path)))


@dataclasses.dataclass
class Scoreable:
  """One scoreable output of a stage: ``label`` names it in the report."""
  label: str
  stage: str
  done: bool
  segmentation: str | None = None
  box: BoundingBox | None = None
  chunks_dir: str | None = None


def _scoreables(stage: str, outputs: dict, done: bool, run_dir: Path, where: str) -> list[Scoreable]:
  entries = outputs.get("results")
  if entries is None:
    entries = [dict(outputs, label="forward" if stage == "inference" else stage)] if any(
        k in outputs for k in SCOREABLE) else []
  elif not isinstance(entries, list):
    raise FFNError(f"{where}: outputs.results must be a list")
  found = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or not any(k in entry for k in SCOREABLE):
      raise FFNError(f"{where}: outputs.results[{i}] has neither segmentation nor chunks_dir")
    label = str(entry.get("label") or f"{stage} {i}")
    box = _box(entry["segmentation_box"], f"{where}: segmentation_box") \
        if entry.get("segmentation_box") else None
    seg = entry.get("segmentation")
    chunks = entry.get("chunks_dir")
    found.append(Scoreable(label, stage, done, _resolve(seg, run_dir) if seg else None, box,
                           _resolve_path(chunks, run_dir) if chunks else None))
  return found


# ----------------------------------------------------------------------------- sacct

_MEM_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_memory(text: str) -> int | None:
  """Bytes of a Slurm memory figure (``886360K``, ``4G``, ``1000Mn``); None when empty."""
  match = re.fullmatch(r"([\d.]+)([KMGTP]?)[nc]?", text.strip())
  if match is None:
    return None
  return int(float(match[1]) * _MEM_UNITS[match[2]])


def parse_elapsed(text: str) -> float | None:
  """Seconds of a Slurm duration ``[D-][HH:]MM:SS[.fff]``; None when unparsable."""
  match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text.strip())
  if match is None:
    return None
  days, hours, minutes, seconds = match.groups()
  return (int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds))


def _job_key(job: str) -> tuple:
  """Sort key of a Slurm job id: ``802`` < ``802_1`` < ``802_10`` < ``802_[11-15]`` < ``803``."""
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[_\[\]]", job) if p)


def sacct_resources(job_ids: Sequence[str]) -> dict:
  """Time and resources of Slurm jobs from ``sacct -j <ids> --format=JobID,Elapsed,AllocCPUS,
  ReqMem,MaxRSS,State --parsable2``: ``{"source": "sacct", "tasks": [one row per job or array
  task: JobID, Elapsed, AllocCPUS, ReqMem, MaxRSS (the largest of its steps), State], "summary":
  {...}}``; ``source`` "local" without job ids, "unavailable" (with ``note``) when sacct is
  missing or fails."""
  if not job_ids:
    return {"source": "local", "note": "ran on the local cluster (no Slurm jobs)"}
  binary = shutil.which("sacct")
  ids = ",".join(dict.fromkeys(str(j) for j in job_ids))
  if binary is None:
    return {"source": "unavailable", "note": f"sacct not found on PATH: no accounting for jobs {ids}"}
  try:
    result = subprocess.run([binary, "-j", ids, f"--format={SACCT_FORMAT}", "--parsable2"],
                            capture_output=True, text=True, timeout=SACCT_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    return {"source": "unavailable", "note": f"sacct did not answer within {SACCT_TIMEOUT_S:g} s"}
  except OSError as e:
    return {"source": "unavailable", "note": f"sacct could not run: {e}"}
  if result.returncode != 0:
    line = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[0]
    return {"source": "unavailable", "note": f"sacct failed: {line}"}
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  if not lines:
    return {"source": "unavailable", "note": "sacct printed nothing"}
  header = lines[0].split("|")
  rows = [dict(zip(header, line.split("|"))) for line in lines[1:]]
  tasks: dict[str, dict] = {}
  rss: dict[str, int] = collections.defaultdict(int)
  for row in rows:
    job = row.get("JobID", "")
    main, _, step = job.partition(".")
    if not step:
      tasks.setdefault(main, row)
    value = parse_memory(row.get("MaxRSS", ""))
    if value is not None:
      rss[main] = max(rss[main], value)
  table = []
  for job, row in sorted(tasks.items(), key=lambda item: _job_key(item[0])):
    table.append({"JobID": job, "Elapsed": row.get("Elapsed", ""), "AllocCPUS": row.get("AllocCPUS", ""),
                  "ReqMem": row.get("ReqMem", ""),
                  "MaxRSS": _format_bytes(rss[job]) if job in rss else "",
                  "State": row.get("State", "").split(" ")[0]})
  if not table:
    return {"source": "unavailable", "note": f"sacct knows no job {ids}"}
  elapsed = [parse_elapsed(t["Elapsed"]) or 0.0 for t in table]
  cpus = [int(t["AllocCPUS"]) if t["AllocCPUS"].isdigit() else 0 for t in table]
  summary = {"tasks": len(table),
             "states": dict(collections.Counter(t["State"] for t in table)),
             "elapsed_s_max": max(elapsed), "elapsed_s_total": float(sum(elapsed)),
             "cpu_s": float(sum(e * c for e, c in zip(elapsed, cpus))),
             "alloc_cpus": sorted(set(cpus)),
             "req_mem": sorted({t["ReqMem"] for t in table if t["ReqMem"]}),
             "max_rss_bytes": max(rss.values()) if rss else None}
  return {"source": "sacct", "tasks": table, "summary": summary}


# ----------------------------------------------------------------------------- formatting

def _format_bytes(n: int | None) -> str:
  if n is None:
    return ""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def format_seconds(s: float | None) -> str:
  """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``; empty for None."""
  if s is None:
    return ""
  if s < 60:
    return f"{s:.1f} s"
  if s < 3600:
    return f"{int(s // 60)} min {int(s % 60):02d} s"
  return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _num(value: float) -> str:
  return f"{abs(value) if value == 0 else value:.4f}"


def _pct(value: float) -> str:
  return f"{100 * value:.1f}%"


def _when(t: float | None) -> str:
  return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


SCORE_HEADERS = ["result", "stage", "VI split", "VI merge", "VI", "adapted RE", "adjusted RE",
                 "segments", "GT objects", "unsegmented", "voxels scored", "scored as"]


def _score_row(label: str, s: dict) -> list[str]:
  how = (f"mean of {len(s['chunks'])} chunks (weights: scored voxels)" if s["kind"] == "chunks"
         else "whole box")
  return [label, s["stage"], _num(s["vi_split"]), _num(s["vi_merge"]), _num(s["vi"]),
          _num(s["adapted_rand_error"]), _num(s["adjusted_rand_error"]), str(s["segments"]),
          str(s["groundtruth_objects"]), _pct(s["fraction_unsegmented"]), f"{s['voxels_scored']:,}",
          how]


STAT_HEADERS = ["result", "objects", "voxels", "unsegmented", "size min", "p10", "median", "p90",
                "max", "mean"]


def _stat_row(label: str, s: dict) -> list[str]:
  sizes = s.get("size_voxels") or {}
  objects = str(s["objects"]) + (" (chunk-local ids, summed)" if s.get("per_chunk") else "")
  return [label, objects, f"{s['voxels']:,}", _pct(s["unsegmented_fraction"])] + [
      f"{sizes[k]:,.0f}" if k in sizes else "" for k in ("min", "p10", "median", "p90", "max", "mean")]


# ----------------------------------------------------------------------------- document model

@dataclasses.dataclass
class Block:
  """One piece of the report: ``kind`` text | table | pre | image | links."""
  kind: str
  text: str = ""
  headers: list[str] = dataclasses.field(default_factory=list)
  rows: list[list[str]] = dataclasses.field(default_factory=list)
  image: str = ""  # file name under report/
  links: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (text, href)
  summary: str = ""  # table: shown folded under this line (HTML <details>)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:78em;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;border:1px solid #ddd;padding:.8em;overflow-x:auto;font-size:.88em}
code{background:#f2f2f2;padding:0 .2em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}
details summary{cursor:pointer;margin:.4em 0}
"""


_NUMBER = re.compile(r"-?[\d,]+(\.\d+)?( ?%| s| min \d+ s| h \d+ min)?")  # right-aligned cells


def _html(title: str, sections: list[tuple[str, list[Block]]], images: dict[str, bytes]) -> str:
  e = html.escape
  out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f"<title>{e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
  for heading, blocks in sections:
    out.append(f"<h2>{e(heading)}</h2>")
    for b in blocks:
      if b.kind == "text":
        out.append(f"<p>{e(b.text)}</p>")
      elif b.kind == "subheading":
        out.append(f"<h3>{e(b.text)}</h3>")
      elif b.kind == "pre":
        out.append(f"<pre>{e(b.text)}</pre>")
      elif b.kind == "table":
        rows = "".join("<tr>" + "".join(f'<td class="n">{e(c)}</td>' if _NUMBER.fullmatch(c)
                                        else f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows)
        table = ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers)
                 + f"</tr></thead><tbody>{rows}</tbody></table>")
        out.append(f"<details><summary>{e(b.summary)}</summary>{table}</details>" if b.summary
                   else table)
      elif b.kind == "image":
        data = base64.b64encode(images[b.image]).decode("ascii")
        out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.text)}">'
                   f"<figcaption>{e(b.text)}</figcaption></figure>")
      elif b.kind == "links":
        items = "".join(f'<li><a href="{e(href)}">{e(text)}</a></li>' for text, href in b.links)
        out.append(f"<ul>{items}</ul>")
  out.append("</body></html>")
  return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
  out = [f"# {title}", ""]
  for heading, blocks in sections:
    out += [f"## {heading}", ""]
    for b in blocks:
      if b.kind == "text":
        out += [b.text, ""]
      elif b.kind == "subheading":
        out += [f"### {b.text}", ""]
      elif b.kind == "pre":
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", b.text)), default=0))
        out += [fence, b.text.rstrip("\n"), fence, ""]
      elif b.kind == "table":
        if b.summary:
          out += [f"{b.summary}:", ""]
        out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
        out.append("|" + "|".join("---" for _ in b.headers) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
        out.append("")
      elif b.kind == "image":
        out += [f"![{b.image[:-len('.png')]}](report/{b.image})", "", f"*{b.text}*", ""]
      elif b.kind == "links":
        out += [f"- [{text}]({href.replace(' ', '%20')})" for text, href in b.links] + [""]
  return "\n".join(out)


# ----------------------------------------------------------------------------- the report

def _png_name(label: str, taken: set[str]) -> str:
  base = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "preview"
  name, n = f"{base}.png", 2
  while name in taken:
    name, n = f"{base}_{n}.png", n + 1
  taken.add(name)
  return name


def _centre_in(box: BoundingBox, centre_xyz: np.ndarray) -> np.ndarray:
  """``centre_xyz`` if inside ``box``, else the box's centre (x,y,z)."""
  inside = np.all(centre_xyz >= box.start) and np.all(centre_xyz < box.end)
  return centre_xyz if inside else box.start + box.size // 2


class _Image:
  """The run's image (channel 0 of a 4D one), read plane by plane for the previews."""

  def __init__(self, spec: str | None) -> None:
    from ffn.io.volumes import Volume
    self.volume = Volume(spec, channels=True) if spec else None

  def planes(self, box: BoundingBox, centre: np.ndarray) -> list[np.ndarray] | None:
    if self.volume is None:
      return None
    from ffn.io.volumes import check_box_inside
    check_box_inside(box, self.volume.shape, f"{self.volume.spec} (image of the previews)")
    return previews.read_planes(lambda b: self.volume[b.to_slices()], box, centre)

  def close(self) -> None:
    if self.volume is not None:
      self.volume.close()


def _score_chunks(item: Scoreable, gt: LabelSource | None, block: Sequence[int],
                  centre: np.ndarray) -> tuple[dict | None, dict, str | None]:
  """(scores, stats, the path of the chunk to preview) of a chunks_dir."""
  from ffn.inference import storage
  corners = storage.existing_corners(item.chunks_dir)
  if not corners:
    raise FFNError(f"{item.chunks_dir}: no chunk results seg-<x>_<y>_<z>.npz (stage {item.stage})")
  chunks, sizes, unsegmented, best = [], [], 0, (None, np.inf)
  for corner in corners:
    path = storage.existing_segmentation_path(item.chunks_dir, corner)
    with LabelSource(path, what=f"stage {item.stage}") as seg:
      tables = measure(seg, gt, seg.extent, block)
      extent = seg.extent
    nonzero = tables.ids != 0
    sizes.append(tables.sizes[nonzero])
    unsegmented += int(tables.sizes[~nonzero].sum())
    row = {"start": extent.start.tolist(), "size": extent.size.tolist(),
           "path": os.path.relpath(path, item.chunks_dir)}
    if gt is not None:
      row.update(tables.scores())
    chunks.append(row)
    inside = np.all(centre >= extent.start) and np.all(centre < extent.end)
    distance = float(np.sum((extent.start + extent.size / 2 - centre) ** 2)) - (1e18 if inside else 0)
    if distance < best[1]:
      best = (path, distance)
  stats = object_stats(np.concatenate(sizes), unsegmented)
  stats["per_chunk"] = True
  scores = None
  if gt is not None:
    scores = chunk_mean(chunks)
    scores["chunks"] = chunks
  stats["chunks"] = len(chunks)
  return scores, stats, best[0]


def _resources(state: dict) -> dict:
  """:func:`sacct_resources` of a stage's job ids (``state``: its stage.json, {} if absent)."""
  if not state:
    return {"source": "none", "note": "not started"}
  if not state.get("job_ids") and state.get("state") != "done":
    return {"source": "none", "note": "no Slurm jobs (yet)"}
  return sacct_resources(state.get("job_ids") or [])


def write_report(run_dir: str | os.PathLike, block_size_xyz: Sequence[int] = (64, 64, 64)) -> dict:
  """Writes ``report.html``, ``report.md`` (+ ``report/*.png``) and ``report.json`` in ``run_dir``
  (module docstring); ``block_size_xyz``: x,y,z voxels read at a time for the scores and
  statistics. Returns ``{"html", "md", "json": paths, "scores": {label: scores}}``. FFNError for a
  run directory without a readable plan, and for a finished stage whose output is unreadable."""
  from ffn.io.atomic import atomic_dir, write_text_atomic
  run = Path(run_dir).absolute()
  block = parse_xyz(block_size_xyz, "block_size")
  plan = _read_json(run / "plan.json", "the pipeline's plan")
  try:
    region = _box(plan["region"], f"{run / 'plan.json'}: region")
    stages = list(plan["stages"])
  except (KeyError, TypeError) as e:
    raise FFNError(f"{run / 'plan.json'}: missing {e} (not a pipeline plan)") from None
  resolution = tuple(float(v) for v in plan.get("resolution_nm") or (
      (plan.get("config") or {}).get("export") or {}).get("resolution") or DEFAULT_RESOLUTION_NM)
  centre = region.start + region.size // 2
  gt_spec = plan.get("groundtruth")
  gt_spec = _resolve(gt_spec, run) if gt_spec else None

  stage_rows, items, extra = [], [], []
  for entry in stages:
    name = str(entry.get("name"))
    path = run / "stages" / name / "stage.json"
    state = _read_json(path, f"state of stage {name}") if path.exists() else {}
    outputs = dict(entry.get("outputs") or {}, **(state.get("outputs") or {}))
    done = state.get("state") == "done"
    elapsed = state.get("elapsed_s")
    if elapsed is None and state.get("started") and state.get("finished"):
      elapsed = float(state["finished"]) - float(state["started"])
    stage_rows.append({"name": name, "depends_on": list(entry.get("depends_on") or []),
                       "state": state.get("state", "not started"), "error": state.get("error"),
                       "started": state.get("started"),
                       "finished": state.get("finished"), "elapsed_s": elapsed,
                       "job_ids": [str(j) for j in state.get("job_ids") or []],
                       "tasks": state.get("tasks") or {}, "counters": state.get("counters") or {},
                       "phases": entry.get("phases") or [],
                       "resources": _resources(state)})
    items += _scoreables(name, outputs, done, run, str(path))
    extra.append((name, outputs))

  gt = LabelSource(gt_spec, None, "groundtruth of the plan") if gt_spec else None
  image = _Image(plan.get("image"))
  scores: dict[str, dict] = {}
  stats: dict[str, dict] = {}
  images: dict[str, bytes] = {}
  figures: list[Block] = []
  unavailable: list[list[str]] = []
  taken: set[str] = set()
  preview_paths: dict[str, str] = {}  # result label (or "groundtruth") -> report/<name>.png
  try:
    if gt is not None:
      gt.check_covers(region)
      planes = previews.read_planes(gt.read, region, centre)
      name = _png_name("groundtruth", taken)
      images[name] = previews.png_bytes(previews.plane_preview(
          image.planes(region, centre), planes, region, centre, resolution))
      figures.append(Block("image", text="ground truth: region start "
                           f"{region.start.tolist()} size {region.size.tolist()} (x,y,z)", image=name))
      preview_paths["groundtruth"] = f"report/{name}"
    labels_seen: set[str] = set()
    for item in items:
      label = item.label if item.label not in labels_seen else f"{item.stage} {item.label}"
      labels_seen.add(label)
      title = label if label == item.stage else f"{label} ({item.stage})"
      target = item.segmentation or item.chunks_dir
      try:
        if item.chunks_dir:
          s, st, preview_path = _score_chunks(item, gt, block, centre)
          with LabelSource(preview_path) as seg:
            box = seg.extent
            at = _centre_in(box, centre)
            planes = previews.read_planes(seg.read, box, at)
          caption = (f"{title}: chunk {os.path.relpath(preview_path, item.chunks_dir)}"
                     f" (start {box.start.tolist()} size {box.size.tolist()}, x,y,z), the one holding"
                     " the region centre")
        else:
          with LabelSource(item.segmentation, item.box or region, f"stage {item.stage}") as seg:
            box = item.box or (seg.extent if item.segmentation.endswith(".npz") else region)
            tables = measure(seg, gt, box, block)
            s = tables.scores() if gt is not None else None
            st = tables.stats()
            at = _centre_in(box, centre)
            planes = previews.read_planes(seg.read, box, at)
          caption = (f"{title}: start {box.start.tolist()} size {box.size.tolist()}"
                     " (x,y,z)")
      except FFNError as e:
        if item.done:
          raise
        unavailable.append([label, item.stage, f"not available (stage not done): {e}"])
        continue
      if s is not None:
        s.update(stage=item.stage, kind="chunks" if item.chunks_dir else "volume",
                 box={"start": box.start.tolist(), "size": box.size.tolist()}, source=target)
        if item.chunks_dir:
          s["box"] = None
        scores[label] = s
      stats[label] = st
      name = _png_name(label, taken)
      images[name] = previews.png_bytes(previews.plane_preview(
          image.planes(box, at), planes, box, at, resolution))
      figures.append(Block("image", text=caption, image=name))
      preview_paths[label] = f"report/{name}"
  finally:
    image.close()
    if gt is not None:
      gt.close()

  report = {"format": 1, "run_dir": str(run), "written": time.time(),
            "toolkit_version": plan.get("toolkit_version"), "plan_created": plan.get("created"),
            "image": plan.get("image"), "groundtruth": gt_spec,
            "region": {"start": region.start.tolist(), "size": region.size.tolist()},
            "block_size": list(block), "scores": scores, "stats": stats, "stages": stage_rows,
            "previews": preview_paths,
            "not_available": [{"result": r[0], "stage": r[1], "why": r[2]} for r in unavailable]}
  sections = _sections(run, plan, report, figures, unavailable, extra)
  title = f"FFN pipeline report: {run.name}"
  with atomic_dir(run / "report") as tmp:
    for name, data in images.items():
      (tmp / name).write_bytes(data)
  json_path, md_path, html_path = run / "report.json", run / "report.md", run / "report.html"
  write_text_atomic(json_path, json.dumps(report, indent=1) + "\n")
  write_text_atomic(md_path, _markdown(title, sections))
  write_text_atomic(html_path, _html(title, sections, images))
  return {"html": str(html_path), "md": str(md_path), "json": str(json_path), "scores": scores}


def _sections(run: Path, plan: dict, report: dict, figures: list[Block], unavailable: list[list[str]],
              extra: list[tuple[str, dict]]) -> list[tuple[str, list[Block]]]:
  region = report["region"]
  summary = [Block("text", text=f"Run directory {run}; plan created {_when(plan.get('created'))} by "
                   f"ffn {plan.get('toolkit_version', '?')}; report written {_when(report['written'])}."),
             Block("table", headers=["what", "value"], rows=[
                 ["image", str(plan.get("image"))],
                 ["ground truth", str(report["groundtruth"] or "none")],
                 ["region (x,y,z voxels)", f"start {region['start']} size {region['size']}"]])]
  sections: list[tuple[str, list[Block]]] = [("Run", summary)]

  blocks: list[Block] = []
  if report["groundtruth"] is None:
    blocks.append(Block("text", text="No ground truth in the plan: no scores."))
  elif report["scores"]:
    blocks.append(Block("text", text=(
        "Against the ground truth (voxels of ground-truth id 0 ignored; unsegmented voxels count "
        "as one more segment). VI split = H(segmentation | ground truth), VI merge = "
        "H(ground truth | segmentation), in nats; adapted RE = 1 - Rand F-score; adjusted RE = "
        "1 - adjusted Rand index. Chunked results (forward, reverse, consensus before stitching) "
        "are scored chunk by chunk against the ground truth of each chunk's own box, as the mean "
        "weighted by scored voxels.")))
    blocks.append(Block("table", headers=SCORE_HEADERS,
                        rows=[_score_row(k, v) for k, v in report["scores"].items()]))
    for label, s in report["scores"].items():
      if s["kind"] == "chunks":
        blocks.append(Block("table", summary=f"per-chunk scores of {label} ({len(s['chunks'])} chunks)",
                            headers=["chunk (x,y,z start)", "size", "VI split", "VI merge",
                                     "adapted RE", "segments", "voxels scored"],
                            rows=[[str(c["start"]), str(c["size"]), _num(c["vi_split"]),
                                   _num(c["vi_merge"]), _num(c["adapted_rand_error"]),
                                   str(c["segments"]), f"{c['voxels_scored']:,}"]
                                  for c in s["chunks"]]))
  else:
    blocks.append(Block("text", text="No scoreable result yet."))
  if unavailable:
    blocks.append(Block("table", headers=["result", "stage", "why"], rows=unavailable))
  sections.append(("Scores", blocks))

  sections.append(("Object statistics", [
      Block("text", text="Objects = distinct non-zero ids in the result's box; sizes in voxels "
                         "inside the box (numpy linear quantiles)."),
      Block("table", headers=STAT_HEADERS, rows=[_stat_row(k, v) for k, v in report["stats"].items()])]
      if report["stats"] else [Block("text", text="No result yet.")]))

  sections.append(("Previews", figures or [Block("text", text="No preview.")]))

  rows = []
  sacct_blocks = []
  for s in report["stages"]:
    res = s["resources"]
    if res["source"] == "sacct":
      m = res["summary"]
      tasks_text = f"{m['tasks']} task{'s' if m['tasks'] != 1 else ''}"
      how = (f"sacct: {tasks_text} ({', '.join(f'{n} {k}' for k, n in m['states'].items())}); "
             f"task max {format_seconds(m['elapsed_s_max'])}, CPU time {format_seconds(m['cpu_s'])}; "
             f"CPUs {', '.join(map(str, m['alloc_cpus']))}; ReqMem {', '.join(m['req_mem'])}; "
             f"peak MaxRSS {_format_bytes(m['max_rss_bytes']) or 'not sampled (job too short)'}")
      sacct_blocks.append(Block("table", summary=f"sacct of stage {s['name']} ({tasks_text})",
                                headers=SACCT_FORMAT.split(","),
                                rows=[[t[k] for k in SACCT_FORMAT.split(",")] for t in res["tasks"]]))
    else:
      how = res["note"]
    tasks = s["tasks"]
    state = f"{s['state']}: {s['error']}" if s.get("error") else s["state"]
    rows.append([s["name"], state, format_seconds(s["elapsed_s"]), _when(s["started"]),
                 f"{tasks.get('done', '')}/{tasks.get('total', '')}" + (
                     f", {tasks['failed']} failed" if tasks.get("failed") else ""),
                 " ".join(s["job_ids"]) or "-", how])
  sections.append(("Time and resources", [
      Block("table", headers=["stage", "state", "wall time", "started", "tasks done", "Slurm jobs",
                              "resources"], rows=rows)] + sacct_blocks))

  plan_rows = []
  for s in report["stages"]:
    for phase in s["phases"] or [{}]:
      r = phase.get("resources") or {}
      plan_rows.append([s["name"], ", ".join(s["depends_on"]) or "-", str(phase.get("name", "")),
                        str(phase.get("tasks", "")), str(r.get("cpus_per_task", "")),
                        f"{r['mem_gb']:g}" if r.get("mem_gb") is not None else "",
                        str(r.get("gpus_per_task", "")), str(r.get("time_min", "")),
                        str(r.get("partition") or "")])
  counters = [[s["name"], ", ".join(f"{k} {v}" for k, v in s["counters"].items())]
              for s in report["stages"] if s["counters"]]
  plan_blocks = [Block("table", headers=["stage", "depends on", "phase", "tasks", "CPUs/task",
                                         "mem GB", "GPUs/task", "time min", "partition"],
                       rows=plan_rows)]
  if counters:
    plan_blocks.append(Block("table", headers=["stage", "counters"], rows=counters))
  sections.append(("Plan", plan_blocks))

  from ffn.inference.serve import neuroglancer_url, precomputed_layers
  viewer: list[Block] = []
  links: list[tuple[str, str]] = []
  for name, outputs in extra:
    folder = outputs.get("neuroglancer")
    if folder:
      folder = folder if os.path.isabs(folder) else str(run / folder)
      viewer.append(Block("text", text=f"Stage {name}: Neuroglancer precomputed folder {folder}; "
                          "view it with (prints the link; --client local for an offline viewer):"))
      viewer.append(Block("pre", text=f"ffn serve {shlex.quote(folder)}"))
      if os.path.isdir(folder):
        layers = precomputed_layers(folder)
        if layers:
          viewer.append(Block("links", links=[(
              f"Neuroglancer link (while ffn serve runs on its default port {SERVE_PORT})",
              neuroglancer_url(f"http://localhost:{SERVE_PORT}", layers))]))
      else:
        viewer.append(Block("text", text=f"(not there yet: {folder})"))
    for label, path in (outputs.get("files") or {}).items():
      path = _resolve_path(str(path), run)
      h5 = re.fullmatch(r"(.+\.(?:h5|hdf5|hdf)):[^/]+", path)  # a dataset spec: link its file
      target = h5[1] if h5 and not os.path.exists(path) else path
      links.append((f"{name}: {label} ({path})", os.path.relpath(target, run)))
  sections.append(("Neuroglancer", viewer or [Block("text", text="No Neuroglancer export in this run.")]))
  if links:
    sections.append(("Files", [Block("links", links=links)]))

  config = run / "pipeline.toml"
  text = config.read_text(encoding="utf-8", errors="replace") if config.exists() else None
  sections.append(("Configuration (pipeline.toml)",
                   [Block("pre", text=text)] if text is not None else
                   [Block("text", text=f"{config} not found.")]))
  return sections


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run_dir", help="the pipeline's run directory (holds plan.json)")
  parser.add_argument("--block_size", default="64,64,64",
                      help="x,y,z voxels read at a time for scores and statistics (peak memory "
                           "about 50 bytes per voxel of a block: 13 MB at 64^3, 0.8 GB at 256^3; "
                           "64^3 was also the fastest on the 250^3 volume)")


def run(args: argparse.Namespace) -> int:
  out = write_report(args.run_dir, parse_xyz(args.block_size, "--block_size"))
  for label, s in out["scores"].items():
    print(f"{label}: VI split {_num(s['vi_split'])} merge {_num(s['vi_merge'])}, adapted RE "
          f"{_num(s['adapted_rand_error'])}, {s['segments']} segments")
  print(f"wrote {out['html']}, {out['md']}, {out['json']}")
  return 0
