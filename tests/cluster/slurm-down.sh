#!/usr/bin/env bash
# Tear down what slurm-up.sh started (jobs, slurmd, slurmctld, slurmdbd, MariaDB, munge) and its
# state. Idempotent: stopping what is not running is fine. The Debian packages stay installed.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "slurm-down: needs root" >&2; exit 77; }
command -v scancel >/dev/null && scancel --user root >/dev/null 2>&1
for daemon in slurmd slurmctld slurmdbd; do
  pkill -x "$daemon" 2>/dev/null
done
command -v mysqladmin >/dev/null && mysqladmin shutdown >/dev/null 2>&1
pkill -x munged 2>/dev/null
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  for _ in $(seq 50); do
    pgrep -x "$daemon" >/dev/null || break
    sleep 0.2
  done
done
rm -rf /var/lib/cola-slurm /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf
echo "slurm-down: stopped"
