#!/bin/sh
# InfluxDB 2 init script (runs once, at setup): map bucket "forgeline" to database/retention policy
# "forgeline/autogen", so the dashboards' InfluxQL queries (FROM "kpi" in database forgeline) resolve.
set -eu
bucket_id=$(influx bucket list --org "${DOCKER_INFLUXDB_INIT_ORG}" --name "${DOCKER_INFLUXDB_INIT_BUCKET}" --hide-headers | cut -f1)
influx v1 dbrp create --org "${DOCKER_INFLUXDB_INIT_ORG}" --bucket-id "${bucket_id}" \
  --db forgeline --rp autogen --default
