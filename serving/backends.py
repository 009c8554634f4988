"""Choose the event log and session store named by the settings (embedded or Redis)."""

from __future__ import annotations

from serving.eventlog import EventLog, SqliteEventLog
from serving.session import MemorySessionStore, SessionStore
from serving.settings import Settings


def open_event_log(settings: Settings) -> EventLog:
    if settings.events_backend == "redis":
        from serving.redis_backends import RedisEventLog

        return RedisEventLog(settings.redis_url, settings.redis_prefix)
    return SqliteEventLog(settings.events_path)


def open_session_store(settings: Settings) -> SessionStore:
    if settings.sessions_backend == "redis":
        from serving.redis_backends import RedisSessionStore

        return RedisSessionStore(settings.redis_url, settings.redis_prefix, settings.session_ttl_s)
    return MemorySessionStore(settings.session_max, settings.session_ttl_s)
