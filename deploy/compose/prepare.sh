#!/bin/sh
# Prepare ./secrets for compose.yaml: a development CA and certificates, the broker's users and
# tenant ACL, and the twin's and the agent's configuration files. Needs `forgeline` on PATH
# (pip install 'forgeline[broker]') and a filled-in .env.
#
#   ./prepare.sh TENANT [SITE]        e.g. ./prepare.sh acme munich
#
# For production, replace secrets/broker/certs with certificates from your own CA.
set -eu
cd "$(dirname "$0")"
tenant=${1:?usage: prepare.sh TENANT [SITE]}
site=${2:-site1}
[ -f .env ] || { echo "prepare.sh: copy env.example to .env and fill it in first" >&2; exit 2; }
# shellcheck disable=SC1091
. ./.env
: "${INFLUX_TOKEN:?set INFLUX_TOKEN in .env}"

umask 077
mkdir -p secrets/pki secrets/broker/certs secrets/twin secrets/agent
forgeline broker certs secrets/pki --server-host mosquitto --server-host localhost \
  --client _twin --client "$tenant" >/dev/null
# Each container gets only its own key; the CA key stays in secrets/pki.
cp secrets/pki/ca.crt secrets/pki/server.crt secrets/pki/server.key secrets/broker/certs/
cp secrets/pki/ca.crt secrets/twin/ && cp secrets/pki/_twin.crt secrets/twin/client.crt \
  && cp secrets/pki/_twin.key secrets/twin/client.key
cp secrets/pki/ca.crt secrets/agent/ && cp "secrets/pki/$tenant.crt" secrets/agent/client.crt \
  && cp "secrets/pki/$tenant.key" secrets/agent/client.key
new_password() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
twin_password=$(new_password)
agent_password=$(new_password)
printf '%s\n' "$twin_password" | forgeline broker users secrets/broker/passwd --add _twin --password-stdin
printf '%s\n' "$agent_password" | forgeline broker users secrets/broker/passwd --add "$tenant" --password-stdin \
  --acl secrets/broker/acl

cat > secrets/twin/twin.yaml <<EOT
broker: mqtts://mosquitto:8883
mqtt: {username: _twin, password: "$twin_password", ca_file: /etc/forgeline/ca.crt,
       cert_file: /etc/forgeline/client.crt, key_file: /etc/forgeline/client.key}
influx: {url: "http://influxdb:8086", token: "$INFLUX_TOKEN", org: forgeline, bucket: forgeline,
         spill_dir: /var/lib/forgeline/spill}
EOT

cat > secrets/agent/agent.yaml <<EOT
# Replace the simulator with the site's real sources (octoprint, moonraker, opcua, modbus): docs/agent.md
mqtt:
  url: mqtts://mosquitto:8883
  username: "$tenant"
  password: "$agent_password"
  tls: {ca_file: /etc/forgeline/ca.crt, cert_file: /etc/forgeline/client.crt, key_file: /etc/forgeline/client.key}
spool:
  path: /var/lib/forgeline/spool.db
sources:
  - type: simulator
    seed: 1
    printers:
      - {device: fdm-01, technology: FDM, tenant: "$tenant", site: "$site", area: hall1}
      - {device: sls-01, technology: SLS, tenant: "$tenant", site: "$site", area: hall1}
EOT
echo "secrets written to $(pwd)/secrets; Mosquitto runs as uid 1883: sudo chown -R 1883 secrets/broker; the forgeline image runs as uid 10001: sudo chown -R 10001 secrets/twin secrets/agent" >&2
