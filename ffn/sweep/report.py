"""A sweep's rows, its choice of checkpoint, and the files people read.

Rows: one per (checkpoint, box), from the evaluation's score file when it has one, else from the
job array's status (``running``, ``queued``, ``pending``, or ``failed`` with the task's reason and
log). Choice (:func:`rank`): every checkpoint whose boxes all scored is ranked by the mean of the
``select_by`` column over its boxes, lower first (every selectable column is an error or a
fraction: lower is better); ties keep the later step.

Files in the output directory (each written atomically, and only when the rows changed):
``results.csv`` / ``results.json`` (rows; the json adds the ranking), ``summary.md`` (the ranking
as a table, best marked), ``metrics.png`` (each metric against training step, best marked),
``best_checkpoint.txt`` (the chosen prefix); and, for a ``--train_dir`` sweep, the per-checkpoint
means as TensorBoard scalars ``sweep/<metric>`` at each checkpoint's step in
``<train_dir>/eval/events.out.tfevents.ffn-sweep.v2``, which TensorBoard shows as run ``eval``
next to the training curves.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ffn.blockwise import RunStatus, WorkItem
from ffn.io.atomic import atomic_path, write_text_atomic
from ffn.sweep.checkpoints import Checkpoint
from ffn.sweep.worker import GT_METRICS, item_id, read_score, score_path

COLUMNS = ("checkpoint", "step", "box", "status", "reason", "vi_split", "vi_merge",
           "adapted_rand_error", "adjusted_rand_error", "objects", "unsegmented_fraction",
           "evaluations", "seconds", "median_object_voxels", "largest_object_fraction",
           "fwd_rev_vi", "fwd_rev_adapted_rand_error", "key", "log")
# --select_by choices: ground-truth scores, then label-free proxies.
SELECTABLE = ("adapted_rand_error", "adjusted_rand_error", "vi", "vi_split", "vi_merge",
              "unsegmented_fraction", "fwd_rev_vi", "fwd_rev_adapted_rand_error")
PROXIES = ("unsegmented_fraction", "fwd_rev_vi", "fwd_rev_adapted_rand_error")
# metrics.png panels (those with values are drawn).
PLOTTED = ("adapted_rand_error", "adjusted_rand_error", "vi_split", "vi_merge", "objects",
           "unsegmented_fraction", "fwd_rev_vi", "evaluations")
TITLES = {"adapted_rand_error": "adapted Rand error", "adjusted_rand_error": "1 - ARI",
          "vi_split": "VI split (nats)", "vi_merge": "VI merge (nats)", "vi": "VI (nats)",
          "objects": "objects", "unsegmented_fraction": "unsegmented fraction",
          "fwd_rev_vi": "fwd/rev VI (proxy)", "evaluations": "network evaluations",
          "fwd_rev_adapted_rand_error": "fwd/rev adapted RE (proxy)"}
EVENTS_NAME = "events.out.tfevents.ffn-sweep.v2"


def rows(output_dir: str, checkpoints: Sequence[Checkpoint], boxes: Sequence, items:
         Sequence[WorkItem], status: RunStatus | None) -> list[dict[str, Any]]:
  """One row per (checkpoint, box), checkpoints by step (then key), boxes in order."""
  by_id = {item.id: item for item in items}
  out = []
  order = sorted(checkpoints, key=lambda c: (c.step is None, c.step or 0, c.key))
  for checkpoint in order:
    for box in boxes:
      item = by_id[item_id(checkpoint.key, box)]
      score = read_score(score_path(output_dir, item))
      if score is not None:
        row = {**score, "checkpoint": checkpoint.path, "key": checkpoint.key}
      else:
        state = status.states.get(item.id) if status is not None else None
        row = {"checkpoint": checkpoint.path, "key": checkpoint.key, "step": checkpoint.step,
               "box": item.id.rpartition("@")[2], "status": state.state if state else "pending"}
        if state is not None and state.state == "failed":
          row["reason"] = f"{state.reason or 'task failed'} (task {state.task}, job {state.job_id})"
          row["log"] = state.log
      if "vi_split" in row and "vi" not in row:
        row["vi"] = row["vi_split"] + row["vi_merge"]
      out.append(row)
  return out


def rank(table: Sequence[dict[str, Any]], select_by: str) -> list[dict[str, Any]]:
  """Checkpoints whose boxes all scored, best first: ``key``, ``checkpoint``, ``step``, ``value``
  (mean of ``select_by`` over the boxes) and the means of the other numeric columns."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for row in table:
    groups.setdefault(row["key"], []).append(row)
  ranked = []
  for key, group in groups.items():
    if not all(r.get("status") == "ok" and r.get(select_by) is not None for r in group):
      continue
    means = {}
    for column in (*GT_METRICS, *PLOTTED, "seconds", "median_object_voxels"):
      values = [r[column] for r in group if r.get(column) is not None]
      if len(values) == len(group):
        means[column] = sum(values) / len(values)
    ranked.append({"key": key, "checkpoint": group[0]["checkpoint"], "step": group[0]["step"],
                   "value": means[select_by], "boxes": len(group), "means": means})
  ranked.sort(key=lambda r: (r["value"], -(r["step"] or 0), r["key"]))
  return ranked


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def csv_text(table: Sequence[dict[str, Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in table:
    writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS})
  return buffer.getvalue()


def summary_text(table: Sequence[dict[str, Any]], ranked: Sequence[dict[str, Any]],
                 select_by: str, groundtruth: str | None) -> str:
  """The ranking as a markdown table (best marked), then checkpoints not ranked and why."""
  proxy = select_by in PROXIES or groundtruth is None
  lines = ["# Checkpoint sweep", "",
           f"Ranked by mean `{select_by}` over {ranked[0]['boxes'] if ranked else '?'} box(es), "
           "lower is better" + (" -- a label-free PROXY, not a score against ground truth"
                                if proxy else f"; ground truth `{groundtruth}`") + ".", ""]
  columns = [c for c in ("adapted_rand_error", "adjusted_rand_error", "vi_split", "vi_merge",
                         "objects", "unsegmented_fraction", "fwd_rev_vi", "evaluations",
                         "seconds") if c != select_by and any(c in r["means"] for r in ranked)]
  header = (["rank", "checkpoint", "step", f"**{TITLES.get(select_by, select_by)}**"]
            + [TITLES.get(c, c) for c in columns])
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, r in enumerate(ranked):
    digits = {"objects": 1, "evaluations": 0, "seconds": 1}
    cells = [f"{i + 1}{' (best)' if i == 0 else ''}", f"`{r['key']}`", _fmt(r["step"]),
             f"**{_fmt(r['value'])}**"] + [_fmt(r["means"].get(c), digits.get(c, 4))
                                          for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  if ranked:
    lines += ["", f"Best: `{ranked[0]['checkpoint']}`"]
  ranked_keys = {r["key"] for r in ranked}
  others = [r for r in table if r["key"] not in ranked_keys]
  if others:
    lines += ["", "Not ranked:", ""]
    for r in others:
      if r.get("status") == "ok":
        continue
      why = f": {r['reason']}" if r.get("reason") else ""
      log = f" (log: {r['log']})" if r.get("log") else ""
      lines.append(f"- `{r['key']}` box {r['box']}: {r['status']}{why}{log}")
  return "\n".join(lines) + "\n"


def write_plot(path: str, table: Sequence[dict[str, Any]], ranked: Sequence[dict[str, Any]]) -> None:
  """``metrics.png``: one panel per metric, against training step when the checkpoints are those
  of one directory with distinct steps (else in ranking-table order of step, named by key); thin
  lines per box, a thick line for the mean over boxes, the chosen checkpoint marked with a red
  star and a dashed line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = sorted({r["key"] for r in ranked}, key=lambda k: next(
      (r["step"] or 0, k) for r in ranked if r["key"] == k))
  steps = {r["key"]: r["step"] for r in ranked}
  one_run = len({os.path.dirname(r["checkpoint"]) for r in ranked}) == 1
  by_step = (one_run and all(s is not None for s in steps.values())
             and len(set(steps.values())) == len(steps))
  xs = {k: (steps[k] if by_step else i) for i, k in enumerate(keys)}
  panels = [c for c in PLOTTED if any(c in r["means"] for r in ranked)]
  n_cols = min(3, max(1, len(panels)))
  n_rows = max(1, -(-len(panels) // n_cols))
  fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), squeeze=False)
  boxes = sorted({r["box"] for r in table})
  best = ranked[0]["key"] if ranked else None
  for ax, column in zip(axes.flat, panels):
    for box in boxes:
      points = sorted((xs[r["key"]], r[column]) for r in table if r["key"] in xs
                      and r["box"] == box and r.get(column) is not None)
      if points and len(boxes) > 1:
        ax.plot(*zip(*points), "-o", lw=0.8, ms=2.5, alpha=0.5, label=f"box {box}")
    mean = sorted((xs[r["key"]], r["means"][column]) for r in ranked if column in r["means"])
    ax.plot(*zip(*mean), "-o", color="black", lw=1.8, ms=4,
            label="mean over boxes" if len(boxes) > 1 else f"box {boxes[0]}")
    if best is not None and column in ranked[0]["means"]:
      ax.axvline(xs[best], color="red", ls="--", lw=0.8)
      ax.plot([xs[best]], [ranked[0]["means"][column]], "*", color="red", ms=14, label="chosen")
    ax.set_title(TITLES.get(column, column), fontsize=10)
    ax.set_xlabel("training step" if by_step else "checkpoint")
    if not by_step:
      ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=6)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  if panels:
    axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  with atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, format="png", dpi=90)
  plt.close(fig)


def write_tensorboard(summary_dir: str, ranked: Sequence[dict[str, Any]]) -> str | None:
  """Scalars ``sweep/<metric>`` (means over boxes) at each ranked checkpoint's step, as one
  event file that replaces the previous one; returns its path (None: no checkpoint with a step)."""
  points = sorted((r["step"], r["means"]) for r in ranked if r["step"] is not None)
  if not points:
    return None
  import tensorflow as tf
  from tensorflow.core.framework import summary_pb2
  meta = summary_pb2.SummaryMetadata()
  meta.plugin_data.plugin_name = "scalars"
  os.makedirs(summary_dir, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=".ffn-sweep-", dir=summary_dir)
  try:
    writer = tf.summary.create_file_writer(scratch)
    with writer.as_default():
      for step, means in points:
        for column, value in sorted(means.items()):
          tf.summary.write(f"sweep/{column}", tf.constant(float(value), tf.float32), step=step,
                           metadata=meta.SerializeToString())
    writer.close()
    (written,) = Path(scratch).glob("events.out.tfevents.*")
    target = os.path.join(summary_dir, EVENTS_NAME)
    os.replace(written, target)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return target


def write_outputs(output_dir: str, table: list[dict[str, Any]], select_by: str,
                  groundtruth: str | None, summary_dir: str | None) -> tuple[list[dict], bool]:
  """Writes every output file when the rows differ from ``results.json``'s; returns (ranking,
  whether anything was written)."""
  ranked = rank(table, select_by)
  document = {"select_by": select_by, "groundtruth": groundtruth,
              "proxy": select_by in PROXIES or groundtruth is None,
              "best": ranked[0]["checkpoint"] if ranked else None, "ranking": ranked,
              "rows": table}
  text = json.dumps(document, indent=1, sort_keys=True) + "\n"
  out = Path(output_dir)
  names = ["results.json", "results.csv", "summary.md"] + (["metrics.png"] if ranked else [])
  if summary_dir is not None and any(r["step"] is not None for r in ranked):
    events = Path(summary_dir) / EVENTS_NAME
  else:
    events = None
  previous = out / "results.json"
  if (previous.exists() and previous.read_text() == text and all((out / n).exists() for n in names)
      and (events is None or events.exists())):
    return ranked, False
  write_text_atomic(out / "results.csv", csv_text(table))
  write_text_atomic(out / "summary.md", summary_text(table, ranked, select_by, groundtruth))
  if ranked:
    write_plot(str(out / "metrics.png"), table, ranked)
    write_text_atomic(out / "best_checkpoint.txt", ranked[0]["checkpoint"] + "\n")
  else:  # nothing scored (yet): no choice, and no stale one
    for name in ("metrics.png", "best_checkpoint.txt"):
      (out / name).unlink(missing_ok=True)
  if events is not None:
    write_tensorboard(str(summary_dir), ranked)
  write_text_atomic(previous, text)
  return ranked, True
