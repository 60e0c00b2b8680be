#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1 for the `cluster` tests: munge, MariaDB, slurmdbd (so sacct
# and account checks work as on a real site), slurmctld and slurmd, from Debian's packages.
# Idempotent: a second run finds the daemons up and only re-checks. Needs root. Exit 77: cannot,
# or will not: it never touches a SLURM or MariaDB it did not set up (a real site's config).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-up: needs root" >&2; exit 77; }
MARK="# cola-audio test cluster, written by tests/cluster/slurm-up.sh"
ROOT=/var/lib/cola-slurm
mkdir -p "$ROOT"
if [ -f /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  echo "slurm-up: /etc/slurm/slurm.conf belongs to another SLURM; refusing to touch it" >&2
  exit 77
fi
if [ ! -f /etc/slurm/slurm.conf ] && pgrep -x slurmctld >/dev/null; then
  echo "slurm-up: a slurmctld runs that this script did not start; refusing" >&2
  exit 77
fi
if pgrep -x mariadbd >/dev/null && [ ! -f "$ROOT/started-mariadb" ]; then
  echo "slurm-up: a MariaDB runs that this script did not start; refusing to add to it" >&2
  exit 77
fi

need=()
for cmd in slurmctld slurmd slurmdbd sacctmgr munged mariadbd; do
  command -v "$cmd" >/dev/null || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurm-wlm slurmdbd mariadb-server munge)
  apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1; } \
    || { echo "slurm-up: cannot install ${pkgs[*]} from Debian's packages" >&2; exit 77; }
fi

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
LOGS=/var/log/cola-slurm
mkdir -p "$ROOT/ctld" "$ROOT/d" "$LOGS" /etc/slurm /run/munge

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq "$((seconds * 5))"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "slurm-up: $what did not come up within ${seconds}s (logs in $LOGS)" >&2
  exit 1
}

# munge: the key Debian generated on install; one daemon.
[ -s /etc/munge/munge.key ] || mungekey --create --force
if ! pgrep -x munged >/dev/null; then
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged
  touch "$ROOT/started-munge"
fi
wait_for 10 munge munge -n

# MariaDB holding SLURM's accounting database.
if ! pgrep -x mariadbd >/dev/null; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  (mysqld_safe --skip-networking=0 --bind-address=127.0.0.1 >"$LOGS/mariadb.log" 2>&1 &)
  touch "$ROOT/started-mariadb"
fi
wait_for 30 MariaDB mysqladmin ping
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'cola-test';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat >/etc/slurm/slurmdbd.conf <<CONF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=cola-test
StorageLoc=slurm_acct_db
LogFile=$LOGS/slurmdbd.log
PidFile=/run/cola-slurmdbd.pid
CONF
chmod 600 /etc/slurm/slurmdbd.conf

cat >/etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=cola
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/ctld
SlurmdSpoolDir=$ROOT/d
SlurmctldPidFile=/run/cola-slurmctld.pid
SlurmdPidFile=/run/cola-slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM_MB / CPUS))
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStoreFlags=job_comment
MinJobAge=600
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmdbd >/dev/null || slurmdbd
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster cola >/dev/null 2>&1 || true
sacctmgr -i add account cola Cluster=cola Description=cola-tests Organization=cola >/dev/null 2>&1 || true
sacctmgr -i add user root Account=cola DefaultAccount=cola >/dev/null 2>&1 || true

if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure >/dev/null  # a config written by a newer version of this script
else
  slurmctld
fi
wait_for 30 slurmctld scontrol ping
pgrep -x slurmd >/dev/null || slurmd
wait_for 30 "node $HOST" bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
echo "slurm-up: cluster 'cola' up: node $HOST, $CPUS CPUs, $MEM_MB MB, partition debug, account cola"
