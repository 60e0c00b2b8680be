#!/usr/bin/env bash
# sshd on 127.0.0.1 for the `cluster` tests' ssh:// DVC remote: its own config, host key and a
# throw-away client key in DIR, key authentication only, SFTP. Prints the port it listens on.
# Idempotent per DIR (a running one is reused). Needs root. Exit 77: cannot.
set -euo pipefail
DIR=${1:?usage: sshd-up.sh DIR}
[ "$(id -u)" = 0 ] || { echo "sshd-up: needs root" >&2; exit 77; }
if [ ! -x /usr/sbin/sshd ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q openssh-server >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openssh-server >/dev/null 2>&1; } \
    || { echo "sshd-up: cannot install openssh-server from Debian's packages" >&2; exit 77; }
fi
mkdir -p "$DIR" /run/sshd
chmod 700 "$DIR"
if [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; then
  cat "$DIR/port"
  exit 0
fi
[ -f "$DIR/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/host_key"
[ -f "$DIR/client_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/client_key"
cp "$DIR/client_key.pub" "$DIR/authorized_keys"
chmod 600 "$DIR/authorized_keys"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$DIR/sshd_config" <<CONF
Port $PORT
ListenAddress 127.0.0.1
HostKey $DIR/host_key
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
CONF
/usr/sbin/sshd -f "$DIR/sshd_config" -E "$DIR/sshd.log"
for _ in $(seq 50); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break
  sleep 0.2
done
echo "$PORT" >"$DIR/port"
echo "$PORT"
