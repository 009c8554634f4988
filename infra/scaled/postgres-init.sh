#!/bin/sh
# Creates the MLflow backend database next to Airflow's on the first start of the postgres
# service (mounted into /docker-entrypoint-initdb.d by docker-compose.yaml). Airflow and MLflow
# both keep an alembic_version table, so they need separate databases.
set -e  # executed (it is +x) or sourced by the postgres entrypoint; both stop on error
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE USER mlflow WITH PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
SQL
