"""``ffn pipeline run CONFIG.toml`` and ``ffn pipeline status RUN_DIR``.

  ffn pipeline run configs/pipeline_example.toml [--dry_run] [--force_from STAGE] [--wait]
  ffn pipeline status runs/example [--watch] [--interval_s 30]
  ffn pipeline report runs/example          (re)write report.html / report.md / report.json

``run`` plans every stage (see :mod:`ffn.pipeline.plan`), refuses a config change that would
invalidate begun or finished stages (one line naming the key), and submits: on Slurm the whole DAG
at once as dependent job arrays (``--wait`` follows it to the end), elsewhere the stages in order.
``--dry_run`` prints the plan (stages, phases, tasks, resources, dependencies, what is done,
outputs) and submits and writes nothing. ``status`` prints a table of the stages: tasks done /
running / failed / pending, job ids, elapsed, ETA, failed tasks' logs; exit status 1 when
something failed.

Exit status: 0 done or submitted, 1 failed, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  p = sub.add_parser("run", help="plan and submit (or resume) the pipeline of a TOML config")
  p.add_argument("config", help="pipeline TOML file (configs/pipeline_example.toml documents it)")
  p.add_argument("--dry_run", action="store_true",
                 help="print the plan (stages, tasks, resources, dependencies, what is done); "
                      "submit and write nothing")
  p.add_argument("--force_from", default=None, metavar="STAGE",
                 help="redo this stage and every stage after it (old outputs stay until the new "
                      "ones are complete)")
  p.add_argument("--wait", action="store_true",
                 help="on Slurm: follow the run until it ends (progress, ETA); else return once "
                      "submitted")
  p.add_argument("--poll_s", type=float, default=10.0, help="seconds between progress checks")
  p = sub.add_parser("status", help="table of stages: tasks, job ids, elapsed, ETA, failed logs")
  p.add_argument("run_dir", help="the run directory (run.run_dir of the config)")
  p.add_argument("--watch", action="store_true", help="refresh until every stage is done or failed")
  p.add_argument("--interval_s", type=float, default=30.0, help="refresh interval for --watch")
  from ffn.pipeline import report
  report.add_arguments(sub.add_parser("report", help="(re)write the run's report (HTML, Markdown, "
                                                     "JSON scores)"))


def run(args: argparse.Namespace) -> int:
  from ffn.pipeline.status import something_failed, stage_statuses, status_table
  if args.action == "run":
    from ffn.pipeline.run import run_pipeline
    return run_pipeline(args.config, args.dry_run, args.force_from, args.wait, args.poll_s)
  if args.action == "report":
    from ffn.pipeline import report
    return report.run(args)
  while True:
    statuses = stage_statuses(args.run_dir)
    print("\n".join(status_table(statuses)), flush=True)
    finished = all(s.state == "done" for s in statuses)
    failed = something_failed(statuses)
    if not args.watch or finished or (failed and not any(s.count("running") for s in statuses)):
      return 1 if failed else 0
    time.sleep(args.interval_s)
    print()
