"""A real ``redis-server`` on loopback for tests: durable (AOF, fsync always), private dir.

The process itself is :class:`pipelines.service.RedisProcess` (the benchmarks start the same);
here its failures fail the test. ``redis-server`` is a system package (``make system-deps``
installs it); its absence fails the tests that need it, loudly, and never skips them.

The suite's shared fixture ``redis_server`` (one server per test module, see
``tests/conftest.py``) is built on :func:`running_redis`; tests sharing it keep apart by a key
prefix of their own (:func:`unique_prefix`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from pipelines.service import RedisProcess, free_port
from serving.errors import InstantrecError

__all__ = ["RedisServer", "free_port", "redis_text", "running_redis", "unique_prefix"]


class RedisServer(RedisProcess):
    """One ``redis-server`` process on 127.0.0.1:``port`` keeping its data in ``directory``,
    with AOF ``appendfsync always``; a failure to start fails the test."""

    def start(self) -> str:
        try:
            return super().start()
        except InstantrecError as exc:
            pytest.fail(f"{exc} (the Redis backend tests need a real redis-server)",
                        pytrace=False)


@contextmanager
def running_redis(directory: Path, port: int | None = None) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit."""
    server = RedisServer(directory, port)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def unique_prefix(tag: str = "t") -> str:
    """A key prefix no other test uses, so tests can share one server."""
    return f"{tag}{uuid.uuid4().hex[:12]}"


def redis_text(url: str) -> list[str]:
    """Every key name and every value in the database, as text (strings and streams; any
    other kind of key shows as ``<unexpected KIND>``)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    out: list[str] = []
    try:
        for key in client.scan_iter(count=1000):
            out.append(key)
            kind = client.type(key)
            if kind == "string":
                out.append(client.get(key) or "")
            elif kind == "stream":
                for sid, fields in client.xrange(key):
                    out.append(sid)
                    out += [f"{k}={v}" for k, v in fields.items()]
            else:
                out.append(f"<unexpected {kind}>")
    finally:
        client.close()
    return out
