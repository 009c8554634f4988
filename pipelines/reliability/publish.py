"""Atomic publish and I/O errors: releases and ranker checkpoints killed or failed at every
filesystem step, and published a thousand times under concurrent readers.

- ``run_publish_crashes``: a release publish and a checkpoint publish, SIGKILLed at each of
  their filesystem steps (:mod:`serving.failpoints` names them). After each kill the pointer
  must name a complete release whose every checksum verifies (a checkpoint that loads), and a
  retry must finish the publish, moving the pointer exactly once.
- ``run_io_errors``: the same steps, plus an event-log append, failing with ENOSPC or EIO
  instead: each must surface as a typed :class:`~serving.errors.StorageError` (never as
  success, never as a crash), leave the pointer where it was, and a retry must succeed.
- ``run_concurrent_publishes``: releases and checkpoints published one after another while
  reader processes follow both pointers as serving does: a reader must never see a partial
  release or checkpoint.
- ``run_real_disk_full``: a home on a small tmpfs filled for real: appends and checkpoint
  publishes fail typed, what was acknowledged before stays readable.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.reliability import EXIT_OK, EXIT_TYPED, figures, fork_call, kill, stage_copy, wait_exit

RELEASE_STEPS = ("atomic.written:1", "atomic.synced:1", "atomic.replaced:1", "publish.manifest:1",
                 "publish.moved:1", "publish.dir_synced:1", "atomic.written:2",
                 "atomic.synced:2", "atomic.replaced:2", "publish.pointer:1")
CHECKPOINT_STEPS = ("checkpoint.saved:1", "checkpoint.written:1", "atomic.written:1",
                    "atomic.synced:1", "atomic.replaced:1", "checkpoint.published:1")
# the steps above that are themselves writes (a write, an fsync, a rename): where an I/O
# error can happen; the others mark the instants between writes
RELEASE_WRITES = ("atomic.written:1", "atomic.synced:1", "atomic.replaced:1", "publish.moved:1",
                  "publish.dir_synced:1", "atomic.written:2", "atomic.synced:2",
                  "atomic.replaced:2")
CHECKPOINT_WRITES = ("checkpoint.saved:1", "atomic.written:1", "atomic.synced:1",
                     "atomic.replaced:1")


def _copy_home(source: Path, work: Path) -> Path:
    from serving.layout import rankers_dir, releases_dir

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(releases_dir(source), releases_dir(work))
    rankers_dir(work).mkdir(parents=True)
    return work


def _release_ok(home: Path) -> bool:
    """The pointer names a complete release whose manifest and checksums all verify."""
    from serving.manifest import read_manifest
    from serving.release import current_bundle_dir

    try:
        read_manifest(current_bundle_dir(home / "releases"), verify_files=True)
    except Exception:  # noqa: BLE001 - any failure to read is what this counts
        return False
    return True


def _checkpoint_ok(home: Path) -> bool:
    from serving.checkpoint import read_latest
    from serving.layout import rankers_dir
    from serving.ranker import Ranker

    try:
        ref = read_latest(home)
        return ref is None or Ranker.load(rankers_dir(home) / ref.file) is not None
    except Exception:  # noqa: BLE001
        return False


def _publish(home: Path, staged: Path) -> None:
    from pipelines.catalogue.publish import publish_release

    publish_release(staged, home / "releases")


def _initial_ranker(home: Path) -> Any:
    from serving.manifest import read_manifest
    from serving.ranker import Ranker
    from serving.release import current_bundle_dir

    manifest = read_manifest(current_bundle_dir(home / "releases"), verify_files=False)
    return Ranker.initial(manifest.release_id, manifest.encoder.dim, manifest.item_count)


def _publish_checkpoint(home: Path, offset: int) -> None:
    from serving.checkpoint import publish_checkpoint

    publish_checkpoint(home, _initial_ranker(home), offset)


def _generation(home: Path) -> int:
    from serving.release import read_pointer

    pointer = read_pointer(home / "releases")
    return pointer.generation if pointer else 0


def _seq(home: Path) -> int:
    from serving.checkpoint import read_latest

    ref = read_latest(home)
    return ref.seq if ref else 0


def run_publish_crashes(source: Path, work: Path, rounds: int = 1) -> dict[str, Any]:
    """SIGKILL a release publish at each of its steps and a checkpoint publish at each of
    its, ``rounds`` times over; check the pointers after each kill and after each retry."""
    from serving.release import read_pointer

    home = _copy_home(source, work)
    base = read_pointer(home / "releases").release_id
    tried = survived = crashed = not_reached = 0
    broken: list[str] = []
    n = 0

    def kill_then_retry(run: Callable[[], Any], step: str,
                        check: Callable[[], bool]) -> tuple[bool, int | None]:
        """Kill ``run`` at ``step`` in a child, check the pointer, retry it whole: whether
        the check held after the kill, and the retry's exit code."""
        nonlocal tried, crashed, not_reached
        tried += 1
        code = wait_exit(fork_call(run, step), 60)
        if code == EXIT_OK:
            not_reached += 1
        elif code != -9:
            crashed += 1
        return check(), wait_exit(fork_call(run), 60)

    for _ in range(rounds):
        for step in RELEASE_STEPS:
            n += 1
            staged = stage_copy(home / "releases", base, f"probe{n:06d}")
            before = _generation(home)
            after_kill, retry = kill_then_retry(lambda s=staged: _publish(home, s), step,
                                                lambda: _release_ok(home))
            pointer = read_pointer(home / "releases")
            ok = (after_kill and retry == EXIT_OK and pointer.release_id == f"probe{n:06d}"
                  and pointer.generation == before + 1 and _release_ok(home))
            survived += ok
            if not ok:
                broken.append(f"release {step}")
        for step in CHECKPOINT_STEPS:
            n += 1
            before = _seq(home)
            after_kill, retry = kill_then_retry(lambda o=n: _publish_checkpoint(home, o), step,
                                                lambda: _checkpoint_ok(home))
            # a kill after the pointer moved leaves it one ahead: the retry is one more
            ok = after_kill and retry == EXIT_OK and _seq(home) in (before + 1, before + 2) \
                and _checkpoint_ok(home)
            survived += ok
            if not ok:
                broken.append(f"checkpoint {step}")
    return figures(tried=tried, survived=survived, crashed=crashed,
                   steps=len(RELEASE_STEPS) + len(CHECKPOINT_STEPS), point_not_reached=not_reached,
                   failed_at=broken)


def _append_one(home: Path, i: int) -> None:
    from pipelines.reliability.appends import event_for
    from serving.eventlog import SqliteEventLog
    from serving.layout import events_path

    SqliteEventLog(events_path(home)).append([event_for(i)])


def run_io_errors(source: Path, work: Path) -> dict[str, Any]:
    """ENOSPC and EIO at every write step of a release publish, a checkpoint publish and an
    event-log append: typed error, pointer unchanged, retry succeeds."""
    from pipelines.reliability.appends import check_log
    from serving.layout import events_path
    from serving.release import read_pointer

    home = _copy_home(source, work)
    base = read_pointer(home / "releases").release_id
    _publish_checkpoint(home, 1)
    tried = survived = crashed = reported_success = 0
    broken: list[str] = []
    n = 0
    acked: set[int] = set()
    for kind in ("enospc", "eio"):
        for step in RELEASE_WRITES:
            n += 1
            tried += 1
            staged = stage_copy(home / "releases", base, f"probe{n:06d}")
            before = read_pointer(home / "releases")
            code = wait_exit(fork_call(lambda s=staged: _publish(home, s), f"{step}:{kind}"), 60)
            reported_success += code == EXIT_OK
            crashed += code not in (EXIT_OK, EXIT_TYPED)
            after = read_pointer(home / "releases")
            # an error after the pointer's rename (the directory's fsync) is still reported
            # as a failure, though the pointer has moved: the retry finds it live
            unchanged = after == before or step == "atomic.replaced:2"
            retry = wait_exit(fork_call(lambda s=staged: _publish(home, s)), 60)
            ok = (code == EXIT_TYPED and unchanged and _release_ok(home) and retry == EXIT_OK
                  and read_pointer(home / "releases").release_id == f"probe{n:06d}")
            survived += ok
            if not ok:
                broken.append(f"release {step}:{kind} (exit {code})")
        for step in CHECKPOINT_WRITES:
            n += 1
            tried += 1
            before = _seq(home)
            code = wait_exit(fork_call(lambda o=n: _publish_checkpoint(home, o),
                                       f"{step}:{kind}"), 60)
            reported_success += code == EXIT_OK
            crashed += code not in (EXIT_OK, EXIT_TYPED)
            unchanged = _seq(home) == before or step == "atomic.replaced:1"
            retry = wait_exit(fork_call(lambda o=n: _publish_checkpoint(home, o)), 60)
            ok = code == EXIT_TYPED and unchanged and _checkpoint_ok(home) and retry == EXIT_OK
            survived += ok
            if not ok:
                broken.append(f"checkpoint {step}:{kind} (exit {code})")
        n += 1
        tried += 1
        code = wait_exit(fork_call(lambda i=n: _append_one(home, i), f"eventlog.inserted:1:{kind}"),
                         60)
        reported_success += code == EXIT_OK
        crashed += code not in (EXIT_OK, EXIT_TYPED)
        retry = wait_exit(fork_call(lambda i=n: _append_one(home, i)), 60)
        acked.add(n)
        check = check_log(events_path(home), acked)
        ok = code == EXIT_TYPED and retry == EXIT_OK and not check["lost"] and not check["torn"]
        survived += ok
        if not ok:
            broken.append(f"event log append:{kind} (exit {code})")
    return figures(tried=tried, survived=survived, crashed=crashed,
                   reported_success_on_failure=reported_success, failed_at=broken)


def _reader(home: Path, stop: Path, out: Path) -> None:
    """Follow both pointers as serving does, until ``stop`` exists; count what was read."""
    from serving.checkpoint import read_latest
    from serving.layout import rankers_dir
    from serving.manifest import read_manifest
    from serving.ranker import Ranker
    from serving.release import read_pointer

    counts: Counter[str] = Counter()
    problems: list[str] = []
    while not stop.exists():
        pointer = read_pointer(home / "releases")
        try:
            read_manifest(home / "releases" / pointer.release_id, verify_files=True)
            counts["releases_read"] += 1
        except Exception as exc:  # noqa: BLE001
            counts["release_partial"] += 1
            problems.append(str(exc)[:200])
        ref = read_latest(home)
        if ref is None:
            continue
        path = rankers_dir(home) / ref.file
        try:
            Ranker.load(path)
            counts["checkpoints_read"] += 1
        except Exception as exc:  # noqa: BLE001
            if not path.exists():  # cleaned up after newer ones: serving reads LATEST again
                counts["checkpoint_gone"] += 1
            else:
                counts["checkpoint_partial"] += 1
                problems.append(str(exc)[:200])
    import json

    out.write_text(json.dumps({"counts": counts, "problems": problems[:5]}))


def run_concurrent_publishes(source: Path, work: Path, publishes: int = 1000,
                             readers: int = 8) -> dict[str, Any]:
    """``publishes`` release publishes and as many checkpoint publishes, one after another,
    under ``readers`` reader processes."""
    import json

    from serving.release import read_pointer

    home = _copy_home(source, work)
    base = read_pointer(home / "releases").release_id
    _publish_checkpoint(home, 0)
    stop = work / "stop"
    pids = [fork_call(lambda i=i: _reader(home, stop, work / f"reader-{i}.json"))
            for i in range(readers)]
    start = time.monotonic()
    done = 0
    failed = 0
    try:
        for n in range(1, publishes + 1):
            staged = stage_copy(home / "releases", base, f"probe{n:06d}")
            try:
                _publish(home, staged)
                _publish_checkpoint(home, n)
                done += 1
            except Exception:  # noqa: BLE001 - counted
                failed += 1
    finally:
        stop.touch()
        codes = [wait_exit(pid, 120) for pid in pids]
        for pid, code in zip(pids, codes, strict=True):
            if code is None:
                kill(pid)
    seconds = time.monotonic() - start
    counts: Counter[str] = Counter()
    problems: list[str] = []
    for i in range(readers):
        path = work / f"reader-{i}.json"
        if path.exists():
            data = json.loads(path.read_text())
            counts.update(data["counts"])
            problems += data["problems"]
    crashed = sum(code != EXIT_OK for code in codes)
    partial = counts["release_partial"] + counts["checkpoint_partial"]
    shutil.rmtree(work, ignore_errors=True)
    return figures(tried=publishes, survived=done, crashed=crashed + failed, lost=0,
                   readers=readers, partial_reads=partial, reads=counts["releases_read"]
                   + counts["checkpoints_read"], release_reads=counts["releases_read"],
                   checkpoint_reads=counts["checkpoints_read"],
                   checkpoint_cleaned_before_read=counts["checkpoint_gone"],
                   seconds=round(seconds, 1), problems=problems[:5])


def run_real_disk_full(work: Path, size_kib: int = 1024) -> dict[str, Any]:
    """A real full disk: a ``size_kib`` tmpfs mounted at ``work/disk`` (needs root), filled by
    event-log appends and then by checkpoint publishes."""
    from pipelines.reliability.appends import check_log, event_for
    from serving.errors import StorageError
    from serving.eventlog import SqliteEventLog

    mount = work / "disk"
    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        from serving.errors import MeasurementError

        raise MeasurementError(f"cannot mount a small tmpfs at {mount} for the disk-full probe "
                               f"(root is needed): {result.stderr.strip()}")
    try:
        log = SqliteEventLog(mount / "events.db")
        acked: set[int] = set()
        typed = untyped = 0
        i = 0
        while True:
            batch = [event_for(j) for j in range(i, i + 100)]
            try:
                log.append(batch)
            except StorageError:
                typed += 1
                break
            except Exception:  # noqa: BLE001 - counted as a crash
                untyped += 1
                break
            acked.update(range(i, i + 100))
            i += 100
        log.close()
        check = check_log(mount / "events.db", acked)
        return figures(tried=1, survived=int(typed == 1 and not check["lost"]
                                             and not check["torn"]),
                       lost=check["lost"], crashed=untyped, acknowledged_before_full=len(acked),
                       readable_after=check["stored"], typed_error=typed == 1,
                       integrity=check["integrity"])
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
