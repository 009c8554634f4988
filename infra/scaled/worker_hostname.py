"""``[core] hostname_callable`` for several Celery workers on one machine.

Airflow records on each task instance the host that ran it (its ``hostname`` field in the UI
and the REST API), taken from ``hostname_callable`` in the process that supervises the task;
the default, the machine's FQDN, is the same for every worker on one host.
``infra/scaled/loopback.sh`` starts each worker with ``CELERY_WORKER_HOSTNAME`` set to its
``--celery-hostname`` and puts this directory on ``PYTHONPATH``, with

    AIRFLOW__CORE__HOSTNAME_CALLABLE=worker_hostname.worker_hostname

so that a task instance names the worker that ran it. Processes without the variable (the
scheduler, the api-server) report the FQDN, as with the default.
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    """The Celery worker's name (``CELERY_WORKER_HOSTNAME``, e.g. ``worker-1@myhost``), else the
    machine's fully qualified domain name."""
    return os.environ.get("CELERY_WORKER_HOSTNAME") or socket.getfqdn()
