#!/usr/bin/env bash
# Starts a single-node Slurm cluster on this machine (Debian 12 / Ubuntu 22.04+, as root), for the
# Slurm tests and for trying the cluster code paths without a cluster.
#
# What it sets up:
#   * munge (the authentication Slurm daemons and clients share),
#   * MariaDB + slurmdbd (job accounting: `sacct` works, which submitit needs to read job states),
#   * slurmctld + slurmd with one node (this host, all its CPUs, 85% of its memory, node feature
#     "localnode" so that --constraint can be tried) in one partition.
# Daemons are started directly (no systemd: this also works in containers) and are found again by
# their PID files, so running the script twice is harmless. scripts/stop-local-slurm.sh stops them.
#
# Settings (environment):
#   LOCAL_SLURM_PARTITION  name of the partition (default: debug)
#   LOCAL_SLURM_CPUS       CPUs the node offers (default: nproc, at least 4). More CPUs than the machine
#                          has oversubscribe its cores (SlurmdParameters=config_overrides), so that
#                          multi-task jobs (e.g. a parameter-server layout of 4 tasks) fit on a
#                          2-core test machine
#   LOCAL_SLURM_GPUS       number of fake gres/gpu devices on the node (default: 0), to try
#                          --gpus_per_node requests on a machine without GPUs
#   LOCAL_SLURM_LOG        where apt and daemon start-up output goes (default: /var/log/slurm/local-setup.log)
# After changing a setting, run scripts/stop-local-slurm.sh first: a running cluster is left as is.
#
# Every wait is bounded: a step that does not come up ends the script (exit 1) with one line naming
# what it waited for, the last thing the check printed and the log to read. The accounting
# database user 'slurm' gets its password set on every start (ALTER USER), so a 'slurm' user left
# by an earlier Slurm install with another password does not lock slurmdbd out.
set -euo pipefail

PARTITION=${LOCAL_SLURM_PARTITION:-debug}
FAKE_GPUS=${LOCAL_SLURM_GPUS:-0}
SETUP_LOG=${LOCAL_SLURM_LOG:-/var/log/slurm/local-setup.log}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DB_PASSWORD=local-slurm-accounting  # slurmdbd's password for MariaDB (reachable on its socket only)

die() { echo "start-local-slurm: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu)"
[[ "$FAKE_GPUS" =~ ^[0-9]+$ ]] || die "LOCAL_SLURM_GPUS must be a non-negative integer, got '$FAKE_GPUS'"

# One start at a time (two test runs on one machine must not both write the configs). The daemons
# are started with the lock's descriptor closed (9>&-): they would otherwise hold it forever.
mkdir -p /run/lock "$(dirname "$SETUP_LOG")"
exec 9>/run/lock/ffn-local-slurm.lock
flock -w 900 9 || die "another start-local-slurm.sh has held /run/lock/ffn-local-slurm.lock for 900 s"

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# last_line FILE: the last non-empty line of FILE (tabs and runs of spaces squeezed), or "empty".
last_line() { { grep -v '^[[:space:]]*$' "$1" 2>/dev/null || true; } | tail -n 1 | tr -s '\t ' '  '; }
# retry SECONDS WHAT LOG COMMAND...: runs COMMAND every 0.5 s (each try limited to 20 s) until it
# succeeds; after SECONDS, one line on stderr names WHAT, COMMAND's last output and LOG, and the
# script ends. COMMAND may be a shell function (which bounds its own commands).
retry() {
  local seconds=$1 what=$2 log=$3; shift 3
  local deadline=$((SECONDS + seconds)) out
  out=$(mktemp)
  while true; do
    if [ "$(type -t "$1")" = function ]; then
      "$@" >"$out" 2>&1 && break
    else
      timeout 20 "$@" >"$out" 2>&1 && break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "start-local-slurm: gave up after ${seconds}s waiting for $what ($*: $(last_line "$out"));" \
        "see $log (last line: $(last_line "$log"))" >&2
      rm -f "$out"
      exit 1
    fi
    sleep 0.5
  done
  rm -f "$out"
}

# 1. Packages. policy-rc.d answering 101 stops the packages' maintainer scripts from starting the
#    daemons with the distribution's default configuration: we start them ourselves below.
installed() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
  done
}
if ! installed; then
  echo "start-local-slurm: installing ${PACKAGES[*]} (log: $SETUP_LOG)"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  timeout 1200 apt-get -o DPkg::Lock::Timeout=600 update -q >>"$SETUP_LOG" 2>&1 \
    || die "apt-get update failed or took over 20 min; see $SETUP_LOG (last line: $(last_line "$SETUP_LOG"))"
  DEBIAN_FRONTEND=noninteractive timeout 1800 apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends "${PACKAGES[@]}" >>"$SETUP_LOG" 2>&1 \
    || die "apt-get install failed or took over 30 min; see $SETUP_LOG (last line: $(last_line "$SETUP_LOG"))"
fi

HOST=$(hostname -s)
REAL_CPUS=$(nproc)
CPUS=${LOCAL_SLURM_CPUS:-$(( REAL_CPUS > 4 ? REAL_CPUS : 4 ))}
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_CPUS must be a positive integer, got '$CPUS'"
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
# slurmd must be able to resolve its own node name.
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

# 2. munge: a shared key, then the daemon (as the munge user, as its package intends).
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged 9>&-
retry 15 "munged" /var/log/munge/munged.log sh -c 'munge -n | unmunge'

# 3. Slurm configuration. cons_tres with CR_Core_Memory schedules cores and memory, so a job array
#    runs as many tasks at once as fit; proctrack/linuxproc and task/none need no cgroup setup.
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
install -d /var/lib/slurm/slurmd /etc/slurm
GRES_LINE=""
rm -f /etc/slurm/gres.conf
if [ "$FAKE_GPUS" -gt 0 ]; then
  # Fake GPUs: character devices aliasing /dev/null, declared as gres/gpu files.
  for ((i = 0; i < FAKE_GPUS; i++)); do
    [ -c "/var/lib/slurm/fake-gpu$i" ] || mknod "/var/lib/slurm/fake-gpu$i" c 1 3
  done
  {
    echo "AutoDetect=off"
    echo "NodeName=$HOST Name=gpu File=/var/lib/slurm/fake-gpu[0-$((FAKE_GPUS - 1))]"
  } >/etc/slurm/gres.conf
  GRES_LINE="Gres=gpu:$FAKE_GPUS"
fi
cat >/etc/slurm/slurm.conf <<EOF
# Written by scripts/start-local-slurm.sh: one node, one partition.
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
KillWait=5
$([ "$CPUS" -gt "$REAL_CPUS" ] && echo "SlurmdParameters=config_overrides")
$([ "$FAKE_GPUS" -gt 0 ] && echo "GresTypes=gpu")
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Features=localnode $GRES_LINE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# 4. Accounting: MariaDB on its Unix socket only, a database and user for slurmdbd, then slurmdbd.
install -d -o mysql -g mysql /run/mysqld
if ! running /run/mysqld/mysqld.pid; then
  setsid -f /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mysqld.pid </dev/null >>/var/log/slurm/mariadb.log 2>&1 9>&-
fi
retry 60 "MariaDB" /var/log/slurm/mariadb.log mariadb -e 'SELECT 1'
# ALTER USER: CREATE USER IF NOT EXISTS keeps the password of a 'slurm' user that already exists.
timeout 60 mariadb <<SQL || die "MariaDB refused to set up the accounting database and user; see /var/log/slurm/mariadb.log"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
install -m 600 -o slurm -g slurm /dev/stdin /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
running /run/slurmdbd.pid || /usr/sbin/slurmdbd 9>&-
retry 60 "slurmdbd" /var/log/slurm/slurmdbd.log sacctmgr -n list cluster

# 5. Controller and node daemon. The controller registers the cluster with slurmdbd on start-up.
running /run/slurmctld.pid || /usr/sbin/slurmctld 9>&-
retry 60 "slurmctld" /var/log/slurm/slurmctld.log scontrol ping
running /run/slurmd.pid || /usr/sbin/slurmd 9>&-
# A node that was DOWN (e.g. from an earlier, killed run) is resumed until it reports idle.
node_idle() {
  local state
  state=$(timeout 20 sinfo -h -n "$HOST" -o %T) || return 1
  echo "node $HOST is ${state:-not listed}"
  grep -Eqx 'idle|mixed|allocated' <<<"$state" && return 0
  timeout 20 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1
  return 1
}
retry 60 "node $HOST to become idle" /var/log/slurm/slurmd.log node_idle
timeout 20 sinfo
