"""Scale-out backends on Redis: a feedback-event log on a Redis Stream and a shared session store.

Both implement the same contracts as the embedded defaults (:class:`serving.eventlog.SqliteEventLog`
and :class:`serving.session.MemorySessionStore`), so several serving replicas and the nearline
updater can share one Redis instead of one machine's files and memory.

Keys (``prefix`` defaults to ``instantrec``)::

    {prefix}:events               stream of feedback events, one entry per accepted event
    {prefix}:event-id:{event_id}  dedupe marker of an event id, its payload's fingerprint
                                  (expires after ``dedupe_ttl_s``)
    {prefix}:session:{session_id} JSON session state (expires ``ttl_s`` after its last write)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis import exceptions as rexc

from serving.errors import InstantrecError
from serving.eventlog import AppendResult, LoggedEvent
from serving.events import Event, client_ts
from serving.schema import ITEM_ID
from serving.session import Interaction, SessionState

log = logging.getLogger(__name__)

T = TypeVar("T")

SEQ_BITS = 20
SEQ_LIMIT = 1 << SEQ_BITS           # stream-id sequence numbers must stay below this
DEDUPE_TTL_S = 7 * 24 * 3600        # how long a seen event id is remembered
MIN_SERVER = (6, 2)                 # exclusive XRANGE starts "(ms-seq"

# Field order of a stream entry; a None value is stored as an absent field.
_FIELDS = ("event_id", "ts", "session_id", "user", "query", ITEM_ID, "type", "position",
           "received")

# KEYS[1] = stream, KEYS[1 + i] = dedupe key of event i.
# ARGV[1] = dedupe ttl (s), then per event: its fingerprint (see _fingerprint), n (number of
# field/value pairs), then 2n strings.
# All in one script, so Redis runs it atomically: no other client sees a dedupe key set without
# its stream entry, and two writers racing on one event id cannot both add it. A first pass
# compares each known id's fingerprint (an id earlier in the same append included); with any
# conflict nothing is written. Returns {accepted, duplicates, flags}, a flag per event: 1 new,
# 0 a duplicate, 2 a conflict.
_APPEND_LUA = """
local function same(stored, fp)
  if stored == '1' then return true end  -- a marker from before payloads were compared
  local stored_hash, stored_ts = string.match(stored, '^(%S+) (%S+)$')
  local hash, ts = string.match(fp, '^(%S+) (%S+)$')
  if stored_hash ~= hash then return false end
  return stored_ts == '-' or ts == '-' or stored_ts == ts
end
local ttl = tonumber(ARGV[1])
local duplicates, conflict = 0, false
local flags, seen, fps, starts, counts = {}, {}, {}, {}, {}
local a = 2
for i = 2, #KEYS do
  local fp, n = ARGV[a], tonumber(ARGV[a + 1])
  fps[i], starts[i], counts[i] = fp, a + 2, n
  local stored = seen[KEYS[i]] or redis.call('GET', KEYS[i])
  if not stored then
    seen[KEYS[i]] = fp
    flags[#flags + 1] = 1
  elseif same(stored, fp) then
    duplicates = duplicates + 1
    flags[#flags + 1] = 0
  else
    conflict = true
    flags[#flags + 1] = 2
  end
  a = a + 2 + 2 * n
end
if conflict then return {0, duplicates, flags} end
local accepted = 0
for i = 2, #KEYS do
  if flags[i - 1] == 1 then
    redis.call('SET', KEYS[i], fps[i], 'EX', ttl)
    local fields = {}
    for j = starts[i], starts[i] + 2 * counts[i] - 1 do fields[#fields + 1] = ARGV[j] end
    redis.call('XADD', KEYS[1], '*', unpack(fields))
    accepted = accepted + 1
  end
end
return {accepted, duplicates, flags}
"""


def _redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable redis url>"


def _connect(url: str) -> redis.Redis:
    """A client for ``url``, checked with a PING; raises InstantrecError when unreachable."""
    try:
        client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                      socket_timeout=30, health_check_interval=30)
    except ValueError as exc:
        raise InstantrecError(f"invalid Redis URL {_redact(url)}: {exc}") from exc
    _call(url, "PING", client.ping)
    return client


def _call(url: str, what: str, fn: Callable[[], T]) -> T:
    """Run one Redis operation, turning client errors into InstantrecError naming the server."""
    try:
        return fn()
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:
        raise InstantrecError(f"cannot reach Redis at {_redact(url)} ({what}): {exc}") from exc
    except rexc.RedisError as exc:
        raise InstantrecError(f"Redis at {_redact(url)} failed {what}: {exc}") from exc


def encode_offset(stream_id: str) -> int:
    """Stream id ``ms-seq`` -> integer offset ``ms * 2**20 + seq`` (order-preserving)."""
    ms, _, seq = stream_id.partition("-")
    ms_i, seq_i = int(ms), int(seq or 0)
    assert 0 <= seq_i < SEQ_LIMIT, f"stream id {stream_id} has a sequence number >= 2**{SEQ_BITS}"
    return (ms_i << SEQ_BITS) | seq_i


def decode_offset(offset: int) -> str:
    """Integer offset -> stream id ``ms-seq``; the inverse of :func:`encode_offset`."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return f"{offset >> SEQ_BITS}-{offset & (SEQ_LIMIT - 1)}"


def _event_fields(e: Event) -> list[str]:
    out: list[str] = []
    for name in _FIELDS:
        value = getattr(e, name)
        if value is None:
            continue
        if name in ("ts", "received"):
            value = repr(float(value))      # repr round-trips a float exactly
        out += [name, str(value)]
    return out


def _fingerprint(e: Event) -> str:
    """What an event's dedupe marker holds: a digest of the payload that
    :func:`serving.events.same_payload` compares, then the client's timestamp (``-`` when the
    server filled it in or cannot tell); a digest, so the marker holds no query or user."""
    payload = json.dumps([e.session_id, e.user, e.query, e.item_id, e.type, e.position],
                         separators=(",", ":"))
    digest = hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    ts = client_ts(e)
    return f"{digest} {'-' if ts is None else repr(float(ts))}"


def _event_from(fields: dict[str, str]) -> Event:
    position = fields.get("position")
    return Event(
        event_id=fields["event_id"],
        ts=float(fields["ts"]),
        session_id=fields["session_id"],
        user=fields.get("user"),
        query=fields.get("query"),
        item_id=fields[ITEM_ID],
        type=fields["type"],
        position=int(position) if position is not None else None,
        received=float(fields["received"]) if "received" in fields else None,
    )


class RedisEventLog:
    """The feedback-event log on a Redis Stream (``{prefix}:events``); safe for many processes.

    The stream carries the same event schema as the SQLite log (:class:`SqliteEventLog`): one
    entry per event with the fields of :class:`serving.events.Event`, a None value stored as an
    absent field. An entry's stream id ``ms-seq`` is exposed as the integer offset
    ``ms * 2**20 + seq``, so offsets increase strictly in stream order, and Redis assigns ids in
    the order the (atomic) appends run, so a reader of ``read(after=offset)`` never skips an
    event that lands later with a smaller offset.

    Re-sending an event id with the same payload is a no-op: each append runs one Lua script
    that, per event, reads ``{prefix}:event-id:{event_id}`` and adds the entry (and the marker,
    the payload's fingerprint) only if there was none. A known id whose fingerprint differs is
    a conflict (:func:`serving.events.same_payload`): the script then writes nothing and the
    result names it. A marker written before fingerprints (``1``) matches any payload. The
    marker expires after ``dedupe_ttl_s`` (7 days by default): an id re-sent later than that is
    stored again. The script is idempotent, so retrying an append whose reply was lost (e.g. a
    connection dropped) is safe; such a retry counts the events already stored as duplicates.

    Durability: Redis acknowledges a write once it is in memory. An acknowledged append is
    durable (survives a crash or restart of the server) only when the server runs with
    ``appendonly yes`` and ``appendfsync always``, as the tests start it; with ``everysec`` up
    to a second of acknowledged events can be lost, and without the AOF everything since the
    last snapshot. A warning is logged at start-up when the server reports no AOF.

    The stream is never trimmed here: retention (``XTRIM ... MINID``) is an operator's decision,
    made after every consumer has checkpointed past the trimmed offsets.
    """

    def __init__(self, url: str, prefix: str = "instantrec",
                 dedupe_ttl_s: int = DEDUPE_TTL_S) -> None:
        if dedupe_ttl_s < 1:
            raise ValueError(f"dedupe_ttl_s must be at least 1 second, got {dedupe_ttl_s}")
        self.url = url
        self.prefix = prefix
        self.stream = f"{prefix}:events"
        self._id_prefix = f"{prefix}:event-id:"
        self.dedupe_ttl_s = int(dedupe_ttl_s)
        self._r = _connect(url)
        self._check_server()
        self._append = self._r.register_script(_APPEND_LUA)

    def _check_server(self) -> None:
        info = _call(self.url, "INFO server", lambda: self._r.info("server"))
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < MIN_SERVER:
            raise InstantrecError(
                f"Redis at {_redact(self.url)} is version {version}; the event log needs "
                f"{'.'.join(map(str, MIN_SERVER))} or newer (exclusive XRANGE)")
        persistence = _call(self.url, "INFO persistence", lambda: self._r.info("persistence"))
        if not int(persistence.get("aof_enabled", 0)):
            log.warning("Redis at %s runs without appendonly: acknowledged events are not durable "
                        "(set appendonly yes, appendfsync always)", _redact(self.url))

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        keys = [self.stream]
        args: list[Any] = [self.dedupe_ttl_s]
        for e in events:
            fields = _event_fields(e)
            keys.append(self._id_prefix + e.event_id)
            args += [_fingerprint(e), len(fields) // 2]
            args += fields
        accepted, duplicates, flags = _call(self.url, "append",
                                            lambda: self._append(keys=keys, args=args))
        marked = list(zip(events, map(int, flags), strict=True))
        conflicts = frozenset(e.event_id for e, f in marked if f == 2)
        if conflicts:
            return AppendResult(0, int(duplicates), frozenset(), conflicts)
        return AppendResult(int(accepted), int(duplicates),
                            frozenset(e.event_id for e, f in marked if f == 1))

    def read(self, after: int, limit: int = 1000) -> list[LoggedEvent]:
        if limit <= 0:
            return []
        start = "-" if after < 0 else "(" + decode_offset(int(after))
        entries = _call(self.url, "XRANGE",
                        lambda: self._r.xrange(self.stream, min=start, max="+", count=limit))
        return [LoggedEvent(encode_offset(sid), _event_from(fields)) for sid, fields in entries]

    def last_offset(self) -> int:
        entries = _call(self.url, "XREVRANGE",
                        lambda: self._r.xrevrange(self.stream, max="+", min="-", count=1))
        return encode_offset(entries[0][0]) if entries else 0

    def count(self) -> int:
        return int(_call(self.url, "XLEN", lambda: self._r.xlen(self.stream)))

    def forget(self, user: str, batch: int = 5000) -> tuple[int, set[str]]:
        """Delete every entry of ``user`` (its pseudonym) from the stream (XDEL); returns how
        many and their sessions. Reads the whole stream: an operator's request, not a hot path."""
        ids: list[str] = []
        sessions: set[str] = set()
        start = "-"
        while True:
            entries = _call(self.url, "XRANGE", lambda s=start: self._r.xrange(
                self.stream, min=s, max="+", count=batch))
            for sid, fields in entries:
                if fields.get("user") == user:
                    ids.append(sid)
                    sessions.add(fields["session_id"])
            if len(entries) < batch:
                break
            start = "(" + entries[-1][0]
        for i in range(0, len(ids), 1000):
            chunk = ids[i:i + 1000]
            _call(self.url, "XDEL", lambda c=chunk: self._r.xdel(self.stream, *c))
        return len(ids), sessions

    def close(self) -> None:
        self._r.close()


class RedisSessionStore:
    """Session state shared by every serving replica, one JSON value per session.

    ``{prefix}:session:{session_id}`` holds the :class:`SessionState` (interactions as
    ``[item_id, weight, ts]`` lists, ``shift_ts``, ``last_ts``, ``extra``), written with
    ``SET ... PX`` so it expires ``ttl_s`` after its last write, like the in-memory store.
    The store is bounded by that expiry alone (no LRU cap of its own): its size is the number of
    sessions active within ``ttl_s``. For a hard memory cap, configure the server's
    ``maxmemory`` with ``maxmemory-policy volatile-lru`` (every session key has a TTL).

    :meth:`update` is atomic across replicas (optimistic: ``WATCH`` the key, read, ``MULTI``
    ``SET``, retried when another writer got in between), so two replicas recording into one
    session at once lose no interaction; ``get`` then ``put`` keeps the last write.
    """

    MAX_RETRIES = 100

    def __init__(self, url: str, prefix: str = "instantrec", ttl_s: float = 1800.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(round(ttl_s * 1000)))
        self._r = _connect(url)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def get(self, session_id: str) -> SessionState | None:
        raw = _call(self.url, "GET session", lambda: self._r.get(self._key(session_id)))
        return self._decode(session_id, raw)

    def _decode(self, session_id: str, raw: bytes | str | None) -> SessionState | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return SessionState(
                interactions=tuple(Interaction(str(i), float(w), float(t))
                                   for i, w, t in data["interactions"]),
                shift_ts=float(data["shift_ts"]),
                last_ts=float(data["last_ts"]),
                extra={str(k): float(v) for k, v in data.get("extra", {}).items()},
            )
        except (ValueError, KeyError, TypeError) as exc:
            # a corrupt entry must not break serving: the session restarts empty
            log.warning("ignoring unreadable session state %s: %s", self._key(session_id), exc)
            return None

    @staticmethod
    def _encode(state: SessionState) -> str:
        return json.dumps({
            "interactions": [[it.item_id, it.weight, it.ts] for it in state.interactions],
            "shift_ts": state.shift_ts,
            "last_ts": state.last_ts,
            "extra": dict(state.extra),
        }, separators=(",", ":"))

    def put(self, session_id: str, state: SessionState) -> None:
        payload = self._encode(state)
        _call(self.url, "SET session",
              lambda: self._r.set(self._key(session_id), payload, px=self._ttl_ms))

    def update(self, session_id: str,
               change: Callable[[SessionState | None], SessionState]) -> SessionState:
        key = self._key(session_id)

        def attempt() -> SessionState:
            with self._r.pipeline() as pipe:
                for _ in range(self.MAX_RETRIES):
                    try:
                        pipe.watch(key)
                        state = change(self._decode(session_id, pipe.get(key)))
                        pipe.multi()
                        pipe.set(key, self._encode(state), px=self._ttl_ms)
                        pipe.execute()
                        return state
                    except redis.WatchError:  # another writer got in first: read again
                        continue
            raise InstantrecError(f"session {key}: {self.MAX_RETRIES} concurrent writers in a "
                                  "row got in first; giving up this update")

        return _call(self.url, "UPDATE session", attempt)

    def delete(self, session_id: str) -> bool:
        return bool(_call(self.url, "DEL session", lambda: self._r.delete(self._key(session_id))))

    def close(self) -> None:
        self._r.close()
