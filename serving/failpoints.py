"""Named points at which a fault test may kill this process or fail a write, deterministically.

``INSTANTREC_FAILPOINT=NAME:N`` makes the N-th pass through the point ``NAME`` (default 1)
SIGKILL the process on the spot, as a power cut or the OOM killer would: no cleanup, no
flush. ``NAME:N:enospc`` (or ``eio``) instead makes that pass raise the ``OSError`` a full
disk (or a failing one) gives, as the write or fsync at that point would. Unset (as always
outside such tests), a point costs one dictionary look-up.

Points (each is just before or just after one filesystem step):

- ``atomic.written`` / ``atomic.synced`` / ``atomic.replaced``: a small file written by
  :func:`serving.manifest.write_json_atomic` (manifests, pointers, evaluation files): its
  temporary file written, then fsynced, then renamed into place;
- ``publish.manifest``, ``publish.moved``, ``publish.dir_synced``, ``publish.pointer``: a
  release publish: the final manifest written, the bundle renamed into ``releases/``, that
  directory fsynced, the pointer moved;
- ``store.files``, ``store.manifest``: a push of a release to the release store
  (:func:`pipelines.catalogue.publish.push_release`): its bundle files uploaded, then its
  manifest, the store's pointer not yet written;
- ``checkpoint.saved`` (the ranker's file written and fsynced, not yet renamed),
  ``checkpoint.written`` (a checkpoint file complete, the pointer not yet moved),
  ``checkpoint.published`` (the pointer has moved, older files not yet cleaned up);
- ``nearline.applied``: the updater has applied an event, before any checkpoint;
- ``eventlog.inserted``: an event inserted inside an append's transaction, not committed;
- ``step.<step>.begin`` / ``step.<step>.end`` for ``ingest``, ``embed``, ``index``,
  ``evaluate``, ``publish``, ``register``, ``retrain``, ``report``: a function of
  ``pipelines.steps`` (what a DAG task calls) entered, and about to return after its last
  write;
- ``ingest.upserted``: a snapshot's items upserted inside the ingest transaction, not
  committed;
- ``embed.written``: a shard's vectors in its temporary file, not renamed into place;
- ``index.stored``: the shard files stored in the warehouse (and removed), no bundle built;
- ``registry.registered``: a model version created in MLflow, its tags not set yet;
- ``report.checked``: a retrain's report has read the live ranker pointer (it writes nothing).
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "INSTANTREC_FAILPOINT"
_hits: dict[str, int] = {}
_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO}


def failpoint(name: str) -> None:
    """Pass through the point ``name``: kill this process here, or raise the I/O error, if
    the environment says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    count, _, kind = rest.partition(":")
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(count or 1):
        return
    if not kind:
        os.kill(os.getpid(), signal.SIGKILL)
    code = _ERRORS[kind]
    raise OSError(code, f"{os.strerror(code)} (injected at {name})")


def reset() -> None:
    """Forget the passes counted so far (a forked test child starts counting afresh)."""
    _hits.clear()
