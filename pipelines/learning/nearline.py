"""The nearline updater: folds feedback events into the ranker within seconds.

It reads the durable event log from the offset its last checkpoint recorded, turns events into
labelled examples, takes one online step per example, and publishes checkpoints every N events
or T seconds. A checkpoint holds the parameters and the offset they include, written
atomically, so a kill at any instant loses nothing and applies nothing twice.

Events become examples in :class:`pipelines.learning.replay.FeedbackReplay` (a cascade
reading of each result list: clicked items positive, skipped items above a click negative).
Everything the updater keeps besides the parameters is that replay's window: the events of
the last few minutes, keyed by event time. After a restart it replays that window without
learning, so it resumes in exactly the state it had.

On a Redis event log the updater consumes through a consumer group
(:class:`serving.redis_backends.RedisConsumerGroup`) and acknowledges entries only once a
checkpoint covering them is published, so Redis shows what it has not yet made durable
(``pending_acks``) and hands a dead updater's entries to the next one. The checkpoint's offset
stays the source of truth: a re-delivered entry at or before it is acknowledged, never applied
again, and entries the group cannot re-deliver (acknowledged under a checkpoint the updater no
longer stands on) are delivered again by moving the group back to the offset.

With a release store (``settings.release_store``), each checkpoint published here is also
pushed to the store (:func:`serving.checkpoint.push_checkpoint`: file, then pointer, forward
only), so replicas on other hosts serve what the updater learned. The push runs in a thread of
its own (:class:`CheckpointPusher`) and only ever pushes the newest checkpoint: a slow or
unreachable store never slows the updater's own publishing; a failed push is logged, counted
and retried (with the newest checkpoint by then) after a back-off.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.learning.replay import Example, FeedbackReplay, FeedbackTally
from pipelines.lockfile import try_lock, unlock
from serving.backends import open_event_log
from serving.checkpoint import (
    CheckpointRef,
    load_latest,
    publish_checkpoint,
    push_checkpoint,
    read_latest,
)
from serving.encoder import Encoder
from serving.errors import InstantrecError, UpdaterLockedError
from serving.eventlog import EventLog, LoggedEvent
from serving.failpoints import failpoint
from serving.forgotten import ForgottenFeed
from serving.layout import rankers_dir
from serving.objectstore import ObjectStore, open_store
from serving.query import parse_steps
from serving.ranker import Ranker
from serving.recommender import release_encoder
from serving.release import Bundle, current_bundle_dir, load_bundle, read_pointer
from serving.retrieval import QueryRelevance
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.redis_backends import RedisConsumerGroup

log = logging.getLogger(__name__)

PUSH_BACKOFF_S = (1.0, 30.0)   # wait after a failed push: first, doubling up to the last
PUSH_DRAIN_S = 30.0   # how long closing the updater waits for the last push


class CheckpointPusher:
    """Pushes checkpoints published in ``home`` to ``store`` from a thread of its own.

    :meth:`offer` hands over a checkpoint just published and returns at once: one waiting to be
    pushed is replaced by the newer one (the store only ever needs the newest), so at most one
    push runs and one waits, whatever the store's speed. A failed push is logged and counted
    and the newest checkpoint is tried again after a back-off (:data:`PUSH_BACKOFF_S`).
    :meth:`stats`: ``pushes`` (the store's pointer moved), ``push_skipped`` (the store had it
    or a newer one), ``push_failures``, and the last push's seq, seconds and error."""

    def __init__(self, store: ObjectStore, home: Path,
                 backoff_s: tuple[float, float] = PUSH_BACKOFF_S) -> None:
        self.store = store
        self.home = home
        self.backoff_s = backoff_s
        self._counters: Counter[str] = Counter()
        self._last: dict[str, Any] = {}
        self._attempts = 0
        self._cond = threading.Condition()
        self._next: CheckpointRef | None = None
        self._busy = False
        self._stop = False
        self._urgent = False   # a flush: the next attempt does not wait for the back-off
        self._not_before = 0.0   # monotonic time before which no retry is made
        self._wait = backoff_s[0]
        self._thread: threading.Thread | None = None

    def offer(self, ref: CheckpointRef) -> None:
        """Push ``ref`` (published in ``home``) as soon as the push before it is done."""
        with self._cond:
            self._next = ref
            self._stop = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="instantrec-push",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Push the newest checkpoint offered now, without waiting for a back-off, and wait
        (up to ``timeout_s``) until it is in the store or its push failed once more. True if
        nothing is left to push."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            start = self._attempts
            self._urgent = True
            self._cond.notify_all()
            try:
                while self._busy or (self._next is not None and not (
                        self._attempts > start and self._last.get("seq") == self._next.seq)):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return self._next is None
            finally:
                self._urgent = False

    def close(self, timeout_s: float = PUSH_DRAIN_S) -> bool:
        """:meth:`flush`, then stop the thread (a push still running finishes on its own);
        False if a checkpoint was left unpushed."""
        done = self.flush(timeout_s)
        with self._cond:
            self._stop = True
            self._next = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)
        return done

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"store": self.store.url, "pushes": 0, "push_skipped": 0, "push_failures": 0,
                    **self._counters, "last": dict(self._last)}

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next is None or (time.monotonic() < self._not_before
                                             and not self._urgent):
                    if self._stop:
                        return
                    self._cond.wait(None if self._next is None
                                    else self._not_before - time.monotonic())
                ref, self._next, self._busy, self._urgent = self._next, None, True, False
            started = time.monotonic()
            try:
                moved = push_checkpoint(self.store, self.home, ref)
                error = None
            except Exception as exc:  # noqa: BLE001 - a failing store must never stop the updater
                moved, error = False, exc
            seconds = time.monotonic() - started
            with self._cond:
                self._busy = False
                self._attempts += 1
                self._last = {"seq": ref.seq, "seconds": round(seconds, 4),
                              "error": None if error is None else str(error)}
                if error is None:
                    self._counters["pushes" if moved else "push_skipped"] += 1
                    self._wait, self._not_before = self.backoff_s[0], 0.0
                else:
                    self._counters["push_failures"] += 1
                    if self._next is None and not self._stop:
                        self._next = ref   # nothing newer yet: this one is retried
                    self._not_before = time.monotonic() + self._wait
                    retry_s, self._wait = self._wait, min(self._wait * 2, self.backoff_s[1])
                self._cond.notify_all()
            if error is not None:
                log.warning("checkpoint %s (seq %d) not pushed to %s (the newest checkpoint is "
                            "tried again in %.0f s): %s", ref.file, ref.seq, self.store.url,
                            retry_s, error)


@dataclass
class UpdaterStats:
    counters: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    ledger: str = ""        # sha256 chain over applied event ids: proof of exactly-once


class NearlineUpdater:
    """Consumes the event log and trains the ranker of the live release."""

    def __init__(self, settings: Settings, encoder: Encoder | None = None,
                 event_log: EventLog | None = None, restore: bool = True,
                 collect: bool = False) -> None:
        """``restore``: continue from the live checkpoint (else from an untrained ranker at
        offset 0); ``collect``: derive labelled examples into :attr:`sink` (with a
        :attr:`tally` of what was shown and chosen) instead of learning from them, and never
        publish by itself (the batch retrain)."""
        self.settings = settings
        self.home = settings.home
        self.log = event_log or open_event_log(settings)
        self.bundle: Bundle = load_bundle(current_bundle_dir(settings.releases_dir))
        # the encoder the release was embedded with (a fine-tuned one is recorded by path)
        # PyTorch, whatever serving uses: the updater's arithmetic stays the same bit for bit
        # across restarts and in-process replays
        self.encoder = encoder or release_encoder(self.bundle, settings, backend="torch")
        self.row_of = {i: r for r, i in enumerate(self.bundle.items.item_ids.tolist())}
        self.stats = UpdaterStats()
        self.offset = 0
        self.relevance = QueryRelevance(self.bundle, self.encoder,
                                        parse_steps(settings.query_steps), settings.candidates)
        self.sink: list[Example] | None = [] if collect else None
        self.tally: FeedbackTally | None = FeedbackTally() if collect else None
        self._published_seq = 0
        self.pusher = (CheckpointPusher(open_store(settings.release_store), self.home)
                       if settings.release_store else None)
        # before the warm-up replay: a forget while it reads is applied at the first poll
        self.forgotten = ForgottenFeed(self.home)
        if restore:
            self.ranker = self._restore()
        else:
            self._reset_transient()
            self.ranker = Ranker.initial(self.bundle.release_id, self.bundle.manifest.encoder.dim,
                                         len(self.bundle.items))
        self._since_publish = 0
        self._last_publish = time.monotonic()
        self.group = self._consumer_group(collect)
        self.redelivered_skipped = 0   # re-delivered entries at or before the offset, not applied
        self._checkpointed = self.offset  # offset of the last checkpoint published or restored
        self._recovering = False
        self._pending_after = 0
        if self.group is not None:
            self._join_group()

    # -- state ----------------------------------------------------------------------------

    def _reset_transient(self) -> None:
        self.replay = FeedbackReplay(self.bundle, self.encoder, self.settings)

    def _process(self, logged: LoggedEvent, learn: bool) -> None:
        """One logged event: derive its examples and (``learn``) step on them, or collect
        them with ``collect``; without ``learn``, only rebuild the transient state."""
        examples, applied = self.replay.process(
            logged, self.stats.counters if learn else None, self.tally if learn else None,
            derive=learn)
        for example in examples:
            self._learn(example)
        if applied and learn:
            self.stats.applied += 1
            self.stats.ledger = hashlib.sha256(
                (self.stats.ledger + logged.event.event_id).encode()).hexdigest()

    def _restore(self) -> Ranker:
        self._reset_transient()
        latest = load_latest(self.home)
        items = self.bundle.items
        if latest is None:
            ranker = Ranker.initial(self.bundle.release_id, self.bundle.manifest.encoder.dim,
                                    len(items))
            return ranker
        ref, ranker = latest
        self._published_seq = ref.seq
        meta = ranker.meta
        self.offset = meta.offset if meta.offset is not None else ref.offset
        self.stats = UpdaterStats(Counter(meta.counters), meta.applied, meta.ledger)
        warm_from = meta.warm_from if meta.warm_from is not None else self.offset
        if ranker.release_id != self.bundle.release_id:
            ranker = self._migrate(ranker, ref.release_id)
        if warm_from < self.offset:
            self.ranker = ranker
            replayed = 0
            after = warm_from
            while after < self.offset:
                batch = [e for e in self.log.read(after, 2000) if e.offset <= self.offset]
                if not batch:
                    break
                for logged in batch:
                    self._process(logged, learn=False)
                replayed += len(batch)
                after = batch[-1].offset
            log.info("resumed at offset %d (warm-up replayed %d events)", self.offset, replayed)
        return ranker

    def _migrate(self, ranker: Ranker, old_release: str) -> Ranker:
        old_dir = self.settings.releases_dir / old_release
        try:
            old_ids = load_bundle(old_dir, verify_files=False).items.item_ids
        except Exception as exc:  # noqa: BLE001 - the old release may be gone
            log.warning("cannot read release %s to carry item biases over (%s); "
                        "item biases restart at zero", old_release, exc)
            old_ids = np.array([], dtype=object)
            ranker.item_bias = np.zeros(0)
            ranker.accum["item_bias"] = np.zeros(0)
        log.info("carrying the ranker from release %s to %s", old_release,
                 self.bundle.release_id)
        return ranker.for_release(self.bundle.release_id, old_ids, self.bundle.items.item_ids)

    def follow_release(self) -> bool:
        """Switch to a newly published release, carrying the ranker over; True if switched."""
        pointer = read_pointer(self.settings.releases_dir)
        if pointer is None or pointer.release_id == self.bundle.release_id:
            return False
        old = self.bundle
        self.bundle = load_bundle(self.settings.releases_dir / pointer.release_id)
        self.row_of = {i: r for r, i in enumerate(self.bundle.items.item_ids.tolist())}
        self.replay.use_bundle(self.bundle)
        self.relevance = QueryRelevance(self.bundle, self.encoder, self.relevance.steps,
                                        self.relevance.depth)
        self.ranker = self.ranker.for_release(self.bundle.release_id, old.items.item_ids,
                                              self.bundle.items.item_ids)
        self.publish()
        return True

    def follow_checkpoint(self) -> bool:
        """Continue from a checkpoint someone else published (the batch retrain): its state
        replaces ours and the events after its offset are applied again on top of it."""
        latest = read_latest(self.home)
        if latest is None or latest.seq == self._published_seq:
            return False
        log.info("continuing from externally published checkpoint %s (offset %d)",
                 latest.file, latest.offset)
        self.stats = UpdaterStats()
        self.offset = 0
        self.ranker = self._restore()
        self._since_publish = 0
        if self.group is not None:
            self._join_group()
        return True

    # -- the consumer group (a Redis log) ---------------------------------------------------

    def _consumer_group(self, collect: bool) -> RedisConsumerGroup | None:
        """The group to consume a Redis log through; None (read by offset) on SQLite, and for
        a collecting updater (the batch retrain), which must take no entry from the live one."""
        if collect or self.settings.events_backend != "redis":
            return None
        from serving.redis_backends import RedisEventLog

        if not isinstance(self.log, RedisEventLog):
            return None
        return self.log.consumer_group(self.settings.redis_group)

    def _join_group(self) -> None:
        """Join the group at the offset just restored: create it there if it is new, take over
        the entries a dead predecessor left pending, and have :meth:`poll` read those first."""
        assert self.group is not None
        # one live updater per group: a second one is refused here
        self.group.acquire(self.settings.redis_group_lease_s)
        created = self.group.create(self.offset)
        claimed = self.group.claim()
        self._checkpointed = self.offset
        self._recovering, self._pending_after = True, 0
        log.info("consuming %s through group %s as %s (%s; %d pending entries taken over)",
                 self.group.stream, self.group.name, self.group.consumer,
                 "created" if created else "joined", claimed)

    def _read_group(self, limit: int) -> tuple[list[LoggedEvent], int]:
        """The next entries to apply through the group, and how many entries were read.

        First this consumer's pending entries (delivered before a crash, in stream order):
        one is applied only if it is the very next entry of the stream after the offset, so
        nothing is applied out of order or over a gap. The first that is not (the group has
        acknowledged entries past the offset: a checkpoint restored from elsewhere, or an
        older one published by the batch retrain) ends that phase, as does the end of the
        pending list; the group is then moved to the offset, so :meth:`read_new` delivers
        everything after it, in order, the other pending entries included.
        """
        assert self.group is not None
        self.group.renew(self.settings.redis_group_lease_s)
        if self._recovering:
            delivered = self.group.read_pending(self._pending_after, limit)
            if delivered:
                self._pending_after = delivered[-1].offset
                fresh = self._past_offset(delivered)
                if not fresh:
                    return [], len(delivered)
                following = self.log.read(self.offset, len(fresh))
                if [e.offset for e in following] == [e.offset for e in fresh]:
                    return fresh, len(delivered)
                log.info("pending entries of group %s do not continue offset %d (next pending "
                         "%d, next in the stream %s): reading again from the offset",
                         self.group.name, self.offset, fresh[0].offset,
                         following[0].offset if following else "none")
            self._recovering = False
            if self.group.state().last_delivered != self.offset:
                self.group.move(self.offset)
        delivered = self.group.read_new(limit)
        return self._past_offset(delivered), len(delivered)

    def _past_offset(self, delivered: list[LoggedEvent]) -> list[LoggedEvent]:
        """``delivered`` without the entries at or before the offset: those were applied
        before (the checkpoint says so) and are acknowledged instead (now if a published
        checkpoint covers them, else with the next one, which is due)."""
        fresh = [e for e in delivered if e.offset > self.offset]
        stale = len(delivered) - len(fresh)
        if stale:
            assert self.group is not None
            self.redelivered_skipped += stale
            if delivered[0].offset <= self._checkpointed:
                self.group.ack(self._checkpointed)
        return fresh

    # -- events -> examples -> steps ------------------------------------------------------

    def _learn(self, ex: Example) -> None:
        if self.sink is not None:
            self.sink.append(ex)
            return
        model = self.ranker.relevance
        rel = self.relevance(model, ex.query, ex.row) if model is not None and ex.query else None
        self.ranker.step(ex.q, ex.x, ex.s, ex.row, ex.label, ex.weight, ex.lex, ex.qkey, rel)

    # -- loop -----------------------------------------------------------------------------

    def close(self) -> None:
        """Push the last checkpoint to the release store, if any (waiting up to
        :data:`PUSH_DRAIN_S`), give up the consumer group's lease, and close the event log."""
        if self.pusher is not None:
            self.pusher.close()
        if self.group is not None:
            try:
                self.group.release()  # a successor need not wait the lease out
            except InstantrecError as exc:
                log.warning("could not release the lease of group %s: %s", self.group.name, exc)
        self.log.close()

    def replay_all(self) -> int:
        """Read the log to its end (learning, or collecting with ``collect``); returns the
        offset reached."""
        while self.poll():
            pass
        return self.offset

    def publish(self, ranker: Ranker | None = None) -> None:
        """Publish a checkpoint at the current offset: of the updater's own ranker, or of
        ``ranker`` (e.g. the batch retrain's), which the updater then continues from. The
        updater's warm-up metadata (counters, ledger, replay window) goes with it."""
        if ranker is not None:
            self.ranker = ranker
        warm_from = self.replay.warm_from(self.offset)
        meta = self.ranker.meta
        meta.applied, meta.ledger = self.stats.applied, self.stats.ledger
        meta.counters, meta.warm_from = dict(self.stats.counters), warm_from
        meta.published_at = time.time()
        ref = publish_checkpoint(self.home, self.ranker, self.offset)
        self._published_seq = ref.seq
        if self.pusher is not None:
            self.pusher.offer(ref)
        self._since_publish = 0
        self._last_publish = time.monotonic()
        self._checkpointed = self.offset
        if self.group is not None:
            # only now: an entry acknowledged before its checkpoint is durable could be lost
            self.group.ack(self.offset)

    def forget_pending(self) -> int:
        """Drop from the replay window what ``forget`` named since the last poll (its events
        are already gone from the log); returns how many entries went."""
        if not self.forgotten.pending():
            return 0
        gone = self.forgotten.read(self.settings.user_key())
        if not gone:
            return 0
        dropped = self.replay.forget(gone)
        self.stats.counters["forget_requests"] += len(gone.users)
        self.stats.counters["forgotten_state_dropped"] += dropped
        log.info("forgot %d users: %d entries of the replay window dropped",
                 len(gone.users), dropped)
        return dropped

    def poll(self, limit: int = 2000) -> int:
        """Process the next batch of events (after applying any ``forget``); returns how many
        were read (through a consumer group, re-delivered entries skipped included)."""
        self.forget_pending()
        if self.group is None:
            batch = self.log.read(self.offset, limit)
            read = len(batch)
        else:
            batch, read = self._read_group(limit)
        for logged in batch:
            self._process(logged, learn=True)
            self.offset = logged.offset
            failpoint("nearline.applied")
            self._since_publish += 1
            # a collecting updater (sink set, for batch training) never publishes
            if self.sink is None and self._since_publish >= self.settings.checkpoint_every_events:
                self.publish()
        return read

    def run_once(self) -> dict[str, Any]:
        """Process everything pending, publish a checkpoint, return a summary."""
        start = time.monotonic()
        read = 0
        self.follow_release()
        while (n := self.poll()):
            read += n
        if self._since_publish or load_latest(self.home) is None:
            self.publish()
        if self.pusher is not None:
            self.pusher.flush(PUSH_DRAIN_S)
        seconds = time.monotonic() - start
        return self.summary(read, seconds)

    def run_forever(self, poll_s: float = 0.02, max_seconds: float | None = None) -> None:
        """Follow the log until stopped (or ``max_seconds``), publishing every N events or
        T seconds, and switching to new releases as they are published."""
        start = time.monotonic()
        next_release_check = 0.0
        while max_seconds is None or time.monotonic() - start < max_seconds:
            now = time.monotonic()
            if now >= next_release_check:
                self.follow_checkpoint()
                self.follow_release()
                next_release_check = now + 1.0
            n = self.poll()
            if self._since_publish and (time.monotonic() - self._last_publish
                                        >= self.settings.checkpoint_every_s):
                self.publish()
            if n == 0:
                time.sleep(poll_s)
        if self._since_publish:
            self.publish()

    def summary(self, read: int = 0, seconds: float = 0.0) -> dict[str, Any]:
        """What the updater has done; through a consumer group, also the entries delivered
        and not yet acknowledged (``pending_acks``: applied since the last checkpoint, or
        left by a dead updater) and the re-delivered ones it skipped."""
        out = {"release_id": self.bundle.release_id, "offset": self.offset, "read": read,
               "applied_total": self.stats.applied, "seconds": round(seconds, 3),
               "events_per_s": round(read / seconds, 1) if seconds > 0 else None,
               "counters": dict(self.stats.counters), "ledger": self.stats.ledger}
        if self.group is not None:
            out.update({"group": self.group.name, "pending_acks": self.group.pending(),
                        "redelivered_skipped": self.redelivered_skipped})
        if self.pusher is not None:
            out["store_push"] = self.pusher.stats()
        return out


class UpdaterLock:
    """One nearline updater per home: an exclusive ``flock`` on ``rankers/.updater.lock``,
    with the holder's pid written in it. Two updaters on one log would each apply every event
    (twice in all) and publish over each other; the second one is refused instead. The kernel
    drops the lock when its process dies, however it dies, so a SIGKILLed updater never
    leaves a stale lock behind."""

    def __init__(self, home: Path) -> None:
        self.path = rankers_dir(home) / ".updater.lock"
        self._fd: int | None = None

    def acquire(self) -> UpdaterLock:
        fd, holder = try_lock(self.path)
        if fd is None:
            raise UpdaterLockedError(
                f"another nearline updater ({holder}) holds {self.path}: one updater per "
                "home; stop it first")
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None

    def __enter__(self) -> UpdaterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_nearline(settings: Settings, once: bool,
                 max_seconds: float | None = None) -> dict[str, Any]:
    """The ``instantrec nearline`` command: the updater of this home, holding its lock."""
    with UpdaterLock(settings.home):
        updater = NearlineUpdater(settings)
        try:
            if once:
                return updater.run_once()
            updater.run_forever(max_seconds=max_seconds)
            if updater.pusher is not None:
                updater.pusher.flush(PUSH_DRAIN_S)
            return updater.summary()
        finally:
            updater.close()
