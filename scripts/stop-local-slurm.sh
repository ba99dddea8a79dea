#!/usr/bin/env bash
# Stops the single-node cluster started by scripts/start-local-slurm.sh: cancels the jobs still
# queued or running, then stops the daemons in the reverse order of their start, each by its PID
# file. Packages, configuration, the accounting database and the munge key are kept, so the next
# start is quick.
set -uo pipefail

[ "$(id -u)" = 0 ] || { echo "stop-local-slurm: must run as root" >&2; exit 1; }

# Every Slurm command is bounded (timeout): an unresponsive controller does not stop the script.
if command -v squeue >/dev/null && timeout 20 scontrol ping >/dev/null 2>&1; then
  timeout 20 squeue -h -o %A | sort -u | xargs -r timeout 20 scancel
  for _ in $(seq 40); do
    [ -z "$(timeout 20 squeue -h 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

# stop PIDFILE: SIGTERM, up to 10 s for a clean exit, then SIGKILL.
stop() {
  local pidfile=$1 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop-local-slurm: $pidfile (PID $pid) did not exit, killing it" >&2
      kill -9 "$pid"
    fi
  fi
  rm -f "$pidfile"
}

stop /run/slurmd.pid
stop /run/slurmctld.pid
stop /run/slurmdbd.pid
stop /run/mysqld/mysqld.pid
stop /run/munge/munged.pid
echo "stop-local-slurm: stopped"
