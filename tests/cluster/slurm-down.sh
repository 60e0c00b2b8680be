#!/usr/bin/env bash
# Tear down what slurm-up.sh started (its jobs and daemons, MariaDB and munge only if it started
# them) and its state. Idempotent. Refuses (exit 77) where the SLURM config is not its own.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-down: needs root" >&2; exit 77; }
MARK="# cola-audio test cluster, written by tests/cluster/slurm-up.sh"
ROOT=/var/lib/cola-slurm
if [ -f /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  echo "slurm-down: /etc/slurm/slurm.conf belongs to another SLURM; leaving it alone" >&2
  exit 77
fi
stop() {  # stop PIDFILE NAME: the daemon whose pid file this script's config named
  [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null
  for _ in $(seq 50); do
    pgrep -x "$2" >/dev/null || return 0
    sleep 0.2
  done
}
if [ -f /etc/slurm/slurm.conf ]; then
  command -v scancel >/dev/null && scancel --user root >/dev/null 2>&1
  stop /run/cola-slurmd.pid slurmd
  stop /run/cola-slurmctld.pid slurmctld
  stop /run/cola-slurmdbd.pid slurmdbd
fi
if [ -f "$ROOT/started-mariadb" ]; then
  mysqladmin shutdown >/dev/null 2>&1
  for _ in $(seq 50); do pgrep -x mariadbd >/dev/null || break; sleep 0.2; done
fi
[ -f "$ROOT/started-munge" ] && pkill -x munged 2>/dev/null
rm -rf "$ROOT" /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf
echo "slurm-down: stopped"
