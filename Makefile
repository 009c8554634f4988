# Two commands for a fresh machine with nothing but Python: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Embedded defaults (same as infra/local/env.sh): everything under this checkout.
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__PARALLELISM := 4
export INSTANTREC_HOME ?= $(CURDIR)/artefacts
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test-scaled install system-deps demo test test-unit test-integration lint clean \
	airflow-start airflow-stop airflow-status

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/pip install --upgrade pip > $(VENV)/install.log 2>&1 \
		&& $(BIN)/pip install -c constraints.txt -e ".[dev]" >> $(VENV)/install.log 2>&1 \
		|| (grep -v "^WARNING: Location" $(VENV)/install.log | tail -40; exit 1)
	@touch $(STAMP)

# Debian packages the tests run for real: redis-server (the Redis backends, on loopback),
# chromium (the storefront test drives it through Playwright; no browser download) and
# postgresql (the server binaries infra/scaled/loopback.sh runs a private cluster with; Debian's
# package also creates a cluster of its own, which the script does not use).

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "missing Debian packages:$$missing; this is not root: install them (e.g." \
				"sudo apt-get install$$missing), then run make again" >&2; \
			exit 1; \
		fi; \
		apt-get update && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing; \
	fi

demo: install
	$(BIN)/airflow db migrate > /dev/null
	$(BIN)/airflow dags test catalogue_refresh > $(AIRFLOW_HOME)/demo-run.log 2>&1 \
		|| (tail -50 $(AIRFLOW_HOME)/demo-run.log; exit 1)
	@grep -o "DagRun Finished.*state=[a-z]*" $(AIRFLOW_HOME)/demo-run.log | sed 's/, run_start.*state=/ ... state=/'
	@$(BIN)/instantrec recommend "wireless noise cancelling headphones" --k 5 2>/dev/null
	@$(BIN)/instantrec recommend "cast iron skillet" --k 5 2>/dev/null
	@# Filters that keep what is relevant: the catalogue's five running shoes cost $$140-165;
	@# at most $$150 and in stock drops the $$165 ASICS and the out-of-stock HOKA.
	@echo "filters: max price 150, in stock"
	@$(BIN)/instantrec recommend "running shoes" --k 3 --max-price 150 --in-stock 2>/dev/null
	@echo "MLflow registry: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(INSTANTREC_HOME)/mlflow/mlflow.db --host 127.0.0.1"

# The embedded Airflow as operators run it: api-server (UI, REST and execution API on
# 127.0.0.1:8080), scheduler (LocalExecutor, --skip-serve-logs) and dag-processor, in the
# background, stopped by PID; every socket on loopback (unlike `airflow standalone`, whose log
# servers listen on all interfaces). PIDs and output in $(AIRFLOW_HOME)/run/.
airflow-start: install
	infra/local/airflow.sh start

airflow-stop:
	infra/local/airflow.sh stop

airflow-status:
	infra/local/airflow.sh status

# Both cores: a test file per worker (module fixtures and servers stay within one process);
# 399 tests in 9 min on 2 cores against 14 min in one process.
PYTEST_PARALLEL := -n 2 --dist loadfile

test: install system-deps
	$(BIN)/pytest -q $(PYTEST_PARALLEL) -m "not scaled"

# Whole set-ups of services on loopback: the embedded Airflow under its scheduler
# (infra/local/airflow.sh: api-server, scheduler, dag-processor), the scaled-out set-up
# (infra/scaled/loopback.sh: Postgres, Redis, MLflow server, Airflow with two Celery workers),
# two serving replicas and the nearline updater on one Redis: CI's second job, about 6 minutes.
test-scaled: install system-deps
	$(BIN)/pytest -q -s -m scaled tests/integration/test_airflow_scheduler.py \
		tests/integration/test_scaled_airflow.py tests/integration/test_replicas.py

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install system-deps
	$(BIN)/pytest -q $(PYTEST_PARALLEL) tests/integration

lint: install
	$(BIN)/ruff check dags pipelines serving tests

clean:
	rm -rf artefacts .airflow
