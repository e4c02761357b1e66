#!/bin/sh
# Install the forgeline edge agent on a gateway (Debian/Ubuntu, Raspberry Pi OS; systemd; Python >= 3.11).
#
#   sudo ./install-agent.sh [--config agent.yaml] [--from SPEC] [--prefix /opt/forgeline] [--no-start]
#
#   --from SPEC    what pip installs (default 'forgeline[agent]'; a wheel file or a source directory works)
#   --config FILE  copied to /etc/forgeline/agent.yaml when that file does not exist yet
#   --root DIR     install under DIR instead of / (staging an image; no user, no systemctl)
#   --no-start     install and enable, but do not start
#   --skip-pip     create the virtualenv but install nothing into it (with --root, for tests)
#
# Re-running it upgrades the agent and keeps the config and the spool.
set -eu

prefix=/opt/forgeline
root=
from='forgeline[agent]'
config=
start=yes
skip_pip=no
python=${PYTHON:-python3}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --no-start) start=no; shift ;;
    --skip-pip) skip_pip=yes; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install-agent.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

here=$(cd "$(dirname "$0")" && pwd)
unit_source="$here/forgeline-agent.service"
[ -f "$unit_source" ] || { echo "install-agent.sh: $unit_source is missing" >&2; exit 1; }
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install-agent.sh: run as root (sudo), or stage with --root DIR" >&2; exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install-agent.sh: needs Python 3.11 or newer as $python (set PYTHON=...)" >&2; exit 1
fi

if [ -z "$root" ] && ! id forgeline >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/forgeline --no-create-home --shell /usr/sbin/nologin forgeline
fi

install -d -m 0755 "$root$prefix" "$root/etc/systemd/system"
install -d -m 0750 "$root/etc/forgeline" "$root/var/lib/forgeline"
if [ ! -x "$root$prefix/venv/bin/python" ]; then
  "$python" -m venv "$root$prefix/venv"
fi
if [ "$skip_pip" = no ]; then
  "$root$prefix/venv/bin/python" -m pip install --quiet --upgrade pip
  "$root$prefix/venv/bin/python" -m pip install --quiet --upgrade "$from"
fi

# The unit names /opt/forgeline; follow --prefix.
sed "s#/opt/forgeline#$prefix#g" "$unit_source" > "$root/etc/systemd/system/forgeline-agent.service"
chmod 0644 "$root/etc/systemd/system/forgeline-agent.service"

if [ -n "$config" ] && [ ! -f "$root/etc/forgeline/agent.yaml" ]; then
  install -m 0640 "$config" "$root/etc/forgeline/agent.yaml"
fi
if [ -z "$root" ]; then
  chown -R root:forgeline /etc/forgeline
  chown forgeline:forgeline /var/lib/forgeline
fi

if [ -n "$root" ]; then
  echo "staged under $root (no systemctl)"; exit 0
fi
systemctl daemon-reload
systemctl enable forgeline-agent.service
if [ ! -f /etc/forgeline/agent.yaml ]; then
  echo "write /etc/forgeline/agent.yaml (see edge_agent/examples/), then: systemctl start forgeline-agent" >&2
elif [ "$start" = yes ]; then
  systemctl restart forgeline-agent.service
  systemctl --no-pager status forgeline-agent.service || true
fi
