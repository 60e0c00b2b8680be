#!/usr/bin/env bash
# Stop the sshd that sshd-up.sh started for DIR. Idempotent.
set -uo pipefail
DIR=${1:?usage: sshd-down.sh DIR}
[ -f "$DIR/sshd.pid" ] && kill "$(cat "$DIR/sshd.pid")" 2>/dev/null
rm -f "$DIR/sshd.pid"
echo "sshd-down: stopped"
