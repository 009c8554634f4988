"""Scale-out backends on Redis: a feedback-event log on a Redis Stream and a shared session store.

Both implement the same contracts as the embedded defaults (:class:`serving.eventlog.SqliteEventLog`
and :class:`serving.session.MemorySessionStore`), so several serving replicas and the nearline
updater can share one Redis instead of one machine's files and memory.

Keys (``prefix`` defaults to ``instantrec``)::

    {prefix}:events               stream of feedback events, one entry per accepted event; it
                                  also holds the nearline updater's consumer group
                                  (``{prefix}:nearline`` unless configured otherwise)
    {prefix}:event-id:{event_id}  dedupe marker of an event id, its payload's fingerprint
                                  (expires after ``dedupe_ttl_s``)
    {prefix}:session:{session_id} JSON session state (expires ``ttl_s`` after its last write)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis import exceptions as rexc

from serving.errors import InstantrecError
from serving.eventlog import AppendResult, LoggedEvent
from serving.events import Event, client_ts
from serving.schema import ITEM_ID
from serving.session import Interaction, SessionState
from serving.settings import REDIS_GROUP_LEASE_S

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

# KEYS[1] = stream; ARGV = group, last id, batch. Acknowledges up to ``batch`` pending entries
# of the group at or before the last id, in one round trip (the ids never travel to the
# client); returns how many. One batch per call, so a long pending list never holds the
# server for long.
_ACK_LUA = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], '-', ARGV[2], tonumber(ARGV[3]))
if #rows == 0 then return 0 end
local ids = {}
for i, row in ipairs(rows) do ids[i] = row[1] end
return redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
"""


# The group's lease: KEYS[1] = lease key; ARGV = this reader, lease in ms, a holder known to be
# dead (or ""). Takes the lease when nobody holds it, this reader does, or the dead one does;
# returns "" then, else the holder.
_LEASE_TAKE_LUA = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] or holder == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return ''
end
return holder
"""
# Gives the lease up if this reader (ARGV[1]) holds it.
_LEASE_DROP_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# a reader that stopped renewing its group's lease loses it after this long
LEASE_S = REDIS_GROUP_LEASE_S


def _dead_here(holder: str) -> bool:
    """True when ``holder`` (a consumer name, ``<host>-<pid>``) names a process of this host
    that no longer exists: a crashed reader, whose lease need not be waited out."""
    host, _, pid = holder.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


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

    Readers that keep their own position (serving, the batch retrain) use ``read(after)``. The
    nearline updater reads through a consumer group instead (:meth:`consumer_group`), so Redis
    tracks what was delivered to it and not yet acknowledged (``XPENDING``): an operator sees
    its lag, and a dead updater's unfinished entries are handed to its successor.
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

    def consumer_group(self, name: str | None = None,
                       consumer: str | None = None) -> RedisConsumerGroup:
        """A handle on the consumer group ``name`` of this stream (``{prefix}:nearline`` by
        default), reading as ``consumer`` (by default this host and process, so a restarted
        reader is a new consumer that takes over its predecessor's pending entries). It
        shares this log's connection; nothing is created in Redis until
        :meth:`RedisConsumerGroup.create`."""
        return RedisConsumerGroup(self, name or f"{self.prefix}:nearline",
                                  consumer or f"{socket.gethostname()}-{os.getpid()}")

    def close(self) -> None:
        self._r.close()


def _stream_id(offset: int) -> str:
    """The stream id an offset names, ``0-0`` (before every entry) for 0 or less."""
    return decode_offset(max(0, int(offset)))


@dataclass(frozen=True)
class GroupState:
    """Where a consumer group stands (``XINFO GROUPS``)."""

    name: str
    last_delivered: int     # offset of the last entry handed to any consumer (0: none yet)
    pending: int            # entries delivered and not yet acknowledged
    consumers: int


class RedisConsumerGroup:
    """The consumer group through which one reader (the nearline updater) consumes the log.

    Redis remembers the last entry it handed to the group and, per entry, whom it was
    delivered to until it is acknowledged (the pending entries list, ``XPENDING``). The reader
    acknowledges an entry only once a checkpoint covering it is durable, so what is pending is
    exactly what a crash could lose: a successor claims it (:meth:`claim`) and reads it again
    (:meth:`read_pending`) before new entries (:meth:`read_new`). Which entries were *applied*
    is not Redis's to say: the reader's checkpoint records its offset, and the reader skips a
    re-delivered entry at or before it (see :class:`pipelines.learning.nearline.NearlineUpdater`).

    One reader per group: :meth:`claim` takes every pending entry of the group, whoever holds
    it, and removes the consumers it leaves empty (dead predecessors). Two readers that must
    each see every event (e.g. the updaters of two homes on one Redis) need two groups
    (``INSTANTREC_REDIS_GROUP``). The reader holds the group's lease (:meth:`acquire`, a key
    that expires unless renewed): a second live reader is refused with a clear error instead
    of taking the first one's entries, and a crashed reader's successor takes over at once on
    the same host, or once the lease expired on another.
    """

    def __init__(self, log: RedisEventLog, name: str, consumer: str) -> None:
        if not name or not consumer:
            raise ValueError(f"a consumer group needs a name and a consumer, got {name!r} "
                             f"and {consumer!r}")
        self.log = log
        self.name = name
        self.consumer = consumer
        self.url = log.url
        self.stream = log.stream
        self._r = log._r
        self._ack = self._r.register_script(_ACK_LUA)
        self._lease_take = self._r.register_script(_LEASE_TAKE_LUA)
        self._lease_drop = self._r.register_script(_LEASE_DROP_LUA)
        self.lease_key = f"{self.stream}:lease:{name}"
        self._renewed = 0.0

    # -- the lease: one live reader per group ------------------------------------------------

    def _take(self, lease_s: float, dead: str = "") -> str:
        """Take or renew the lease (see :data:`_LEASE_TAKE_LUA`); the holder if another."""
        holder = _call(self.url, "lease", lambda: self._lease_take(
            keys=[self.lease_key], args=[self.consumer, max(1, int(lease_s * 1000)), dead]))
        if not holder:
            self._renewed = time.monotonic()
        return str(holder or "")

    def acquire(self, lease_s: float = LEASE_S, wait_s: float | None = None) -> None:
        """Hold the group's lease for ``lease_s`` seconds (renewed by :meth:`renew`). A holder
        that is a dead process of this host is displaced at once; one that is alive, or on
        another host, is waited for up to ``wait_s`` (default: twice the lease, long enough
        for a crashed reader's lease to expire). Raises InstantrecError naming the holder when
        it is still held then: another reader is live on this group."""
        wait_s = 2 * lease_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        while True:
            holder = self._take(lease_s)
            if not holder:
                return
            if _dead_here(holder):
                log.info("group %s: taking the lease of %s, a process of this host that is "
                         "gone", self.name, holder)
                if not self._take(lease_s, dead=holder):
                    return
                continue
            if time.monotonic() >= deadline:
                raise InstantrecError(
                    f"consumer group {self.name} of stream {self.stream} at "
                    f"{_redact(self.url)} is in use by {holder}, which renewed its lease within "
                    f"the last {lease_s:.0f} s: run one nearline updater per group (stop the "
                    f"other), or give each its own group (INSTANTREC_REDIS_GROUP)")
            time.sleep(min(0.5, lease_s / 4))

    def renew(self, lease_s: float = LEASE_S) -> None:
        """Keep the lease (a round trip at most every third of it). Raises InstantrecError
        when another reader took the group over (this one stopped renewing for longer than
        the lease): it must stop reading, or both would apply the same entries."""
        if time.monotonic() - self._renewed < lease_s / 3:
            return
        holder = self._take(lease_s)
        if holder:
            raise InstantrecError(f"consumer group {self.name} of stream {self.stream}: the "
                                  f"lease passed to {holder} (this reader did not renew it "
                                  f"within {lease_s:.0f} s); stopping")

    def release(self) -> None:
        """Give the lease up (a clean stop), so a successor need not wait it out."""
        _call(self.url, "lease release",
              lambda: self._lease_drop(keys=[self.lease_key], args=[self.consumer]))

    def _logged(self, entries: list[tuple[str, dict[str, str]]]) -> list[LoggedEvent]:
        return [LoggedEvent(encode_offset(sid), _event_from(fields)) for sid, fields in entries]

    def create(self, start: int = 0) -> bool:
        """Create the group (and the stream, if there is none yet: ``MKSTREAM``) so that every
        entry after offset ``start`` is still to be delivered. Returns False, changing
        nothing, when the group exists already (``BUSYGROUP``): it keeps its position."""

        def run() -> bool:
            try:
                return bool(self._r.xgroup_create(self.stream, self.name, id=_stream_id(start),
                                                  mkstream=True))
            except rexc.ResponseError as exc:
                if str(exc).startswith("BUSYGROUP"):
                    return False
                raise

        return _call(self.url, f"XGROUP CREATE {self.name}", run)

    def state(self) -> GroupState:
        """The group's position, pending count and consumers; raises InstantrecError when the
        group does not exist."""
        groups = _call(self.url, "XINFO GROUPS", lambda: self._r.xinfo_groups(self.stream))
        for g in groups:
            if g["name"] == self.name:
                return GroupState(self.name, encode_offset(g["last-delivered-id"]),
                                  int(g["pending"]), int(g["consumers"]))
        raise InstantrecError(f"consumer group {self.name} of stream {self.stream} at "
                              f"{_redact(self.url)} does not exist (create it first)")

    def move(self, to: int) -> None:
        """Set the group's position to offset ``to`` (``XGROUP SETID``): every entry after it is
        delivered again by :meth:`read_new`, a pending one passing to the consumer that reads
        it. Pending entries stay pending until acknowledged."""
        _call(self.url, f"XGROUP SETID {self.name}",
              lambda: self._r.xgroup_setid(self.stream, self.name, _stream_id(to)))

    def claim(self, batch: int = 1000) -> int:
        """Take over every pending entry of the group for this consumer (``XAUTOCLAIM`` with
        no minimum idle time), then remove the other consumers, left with none: one reader
        per group, so they are predecessors that died before acknowledging. Entries deleted
        from the stream since delivery (``forget``) leave the pending list here on Redis 7
        (on 6.2, :meth:`read_pending` acknowledges them). Returns how many entries were taken
        over."""
        claimed = 0
        start = "0-0"
        while True:
            reply = _call(self.url, "XAUTOCLAIM", lambda s=start: self._r.xautoclaim(
                self.stream, self.name, self.consumer, 0, start_id=s, count=batch))
            start, entries = reply[0], reply[1]
            claimed += len(entries)
            if start == "0-0":
                break
        consumers = _call(self.url, "XINFO CONSUMERS",
                          lambda: self._r.xinfo_consumers(self.stream, self.name))
        for c in consumers:
            if c["name"] != self.consumer and int(c["pending"]) == 0:
                _call(self.url, "XGROUP DELCONSUMER",
                      lambda n=c["name"]: self._r.xgroup_delconsumer(self.stream, self.name, n))
        return claimed

    def read_new(self, limit: int = 1000) -> list[LoggedEvent]:
        """Up to ``limit`` entries never delivered to the group before, in stream order
        (``XREADGROUP ... >``); they stay pending until :meth:`ack`. Does not wait."""
        if limit <= 0:
            return []
        reply = _call(self.url, "XREADGROUP", lambda: self._r.xreadgroup(
            self.name, self.consumer, {self.stream: ">"}, count=limit))
        return self._logged(reply[0][1]) if reply else []

    def read_pending(self, after: int = 0, limit: int = 1000) -> list[LoggedEvent]:
        """Up to ``limit`` of this consumer's pending entries after offset ``after``, in stream
        order (``XREADGROUP`` from an id); an empty list once there are no more. An entry
        deleted from the stream since its delivery (``forget``) cannot be read, so it is
        acknowledged here and left out."""
        if limit <= 0:
            return []
        while True:
            reply = _call(self.url, "XREADGROUP pending", lambda a=after: self._r.xreadgroup(
                self.name, self.consumer, {self.stream: _stream_id(a)}, count=limit))
            entries = reply[0][1] if reply else []
            gone = [sid for sid, fields in entries if not fields]
            if gone:
                _call(self.url, "XACK", lambda g=gone: self._r.xack(self.stream, self.name, *g))
            kept = [(sid, fields) for sid, fields in entries if fields]
            if kept or not entries:
                return self._logged(kept)
            after = encode_offset(entries[-1][0])

    def ack(self, up_to: int, batch: int = 1000) -> int:
        """Acknowledge every pending entry of the group (whichever consumer holds it) with an
        offset at or before ``up_to``; returns how many."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if up_to <= 0:
            return 0
        args = [self.name, _stream_id(up_to), int(batch)]
        acked = 0
        while True:
            n = int(_call(self.url, "XACK", lambda: self._ack(keys=[self.stream], args=args)))
            acked += n
            if n < batch:
                return acked

    def pending(self) -> int:
        """How many entries were delivered to the group and not yet acknowledged
        (``XPENDING``): the reader's work since its last checkpoint, or a dead reader's."""
        summary = _call(self.url, "XPENDING", lambda: self._r.xpending(self.stream, self.name))
        return int(summary["pending"])


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
