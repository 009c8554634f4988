"""Object stores and the publish contract on them, on tiny bundles: LocalStore round trips and
atomic writes, refusal of bad keys, URLs and pointers, the order and forward-only rule of a
push, and a replica's sync (verified, read-only, nothing partial visible); the same for ranker
checkpoints on tiny rankers (push, retention, a replica's sync and what it refuses)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pipelines.catalogue.publish import push_release
from serving.checkpoint import (
    KEEP,
    STORE_LATEST,
    CheckpointSync,
    publish_checkpoint,
    push_checkpoint,
    read_latest,
    read_store_latest,
)
from serving.errors import ConfigurationError, ReleaseError, StorageError
from serving.manifest import Manifest, file_entries, write_manifest
from serving.objectstore import LocalStore, S3Store, check_key, open_store
from serving.ranker import Ranker
from serving.release import Pointer, read_pointer, write_pointer
from serving.release_sync import (
    STORE_POINTER,
    ReleaseSync,
    StoreSource,
    read_store_pointer,
    write_store_pointer,
)

FILES = {"vectors.npy": b"\x93NUMPY fake vectors", "items.parquet": b"PAR1 items",
         "lexical/params.json": b'{"k1": 1.5}'}


def make_bundle(releases: Path, release_id: str, generation: int | None = None) -> Path:
    """A bundle of three small files with a manifest whose checksums match them; with
    ``generation``, the pointer of ``releases`` names it at that generation."""
    bundle = releases / release_id
    for name, data in FILES.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data + release_id.encode())
    write_manifest(bundle, Manifest(
        release_id=release_id, created_at="2026-01-01T00:00:00Z", item_count=3,
        catalogue_digest="d" * 64,
        encoder={"name": "enc", "revision": "rev1", "dim": 4, "max_tokens": 16},
        index={"n_trees": 2, "search_k": 20, "seed": 1, "recall_at_10": 0.96,
               "recall_target": 0.95},
        files=file_entries(bundle, sorted(FILES)), libraries={}))
    if generation is not None:
        write_pointer(releases, Pointer(release_id, generation))
    return bundle


class RecordingStore(LocalStore):
    """A real LocalStore that also records the order of its writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_file(self, key: str, path: Path) -> None:
        super().put_file(key, path)
        self.writes.append(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        super().write_bytes(key, data)
        self.writes.append(key)

    def delete(self, key: str) -> None:
        super().delete(key)
        self.writes.append(f"delete {key}")


# -- LocalStore -------------------------------------------------------------------------------


def test_local_store_round_trips(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 1000)
    store.put_file("releases/r1/lexical/x.bin", src)
    store.write_bytes("releases/CURRENT", b'{"release_id": "r1", "generation": 1}')

    out = tmp_path / "out" / "deep" / "x.bin"
    store.get_file("releases/r1/lexical/x.bin", out)
    assert out.read_bytes() == b"abc" * 1000
    assert store.read_bytes("releases/CURRENT") == b'{"release_id": "r1", "generation": 1}'
    assert store.read_bytes("releases/none") is None
    assert store.exists("releases/r1/lexical/x.bin") and not store.exists("releases/r1/x.bin")
    assert store.list_keys("releases/") == ["releases/CURRENT", "releases/r1/lexical/x.bin"]
    assert store.list_keys("releases/r1/") == ["releases/r1/lexical/x.bin"]
    assert store.list_keys("releases/r2/") == []
    with pytest.raises(StorageError, match="releases/r2/x"):
        store.get_file("releases/r2/x", tmp_path / "missing")


def test_local_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    store.write_bytes("releases/CURRENT", b"old")
    store.write_bytes("releases/CURRENT", b"new")
    assert store.read_bytes("releases/CURRENT") == b"new"

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(StorageError, match="No space left"):
        store.write_bytes("releases/CURRENT", b"never seen")
    monkeypatch.undo()
    # the old object whole, and no temporary file left beside it
    assert store.read_bytes("releases/CURRENT") == b"new"
    assert sorted(p.name for p in (tmp_path / "store" / "releases").iterdir()) == ["CURRENT"]


def test_a_write_in_progress_is_not_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("releases/r1/a", b"1")
    (tmp_path / "releases" / "r1" / ".b.tmp-123-abcd").write_bytes(b"half")
    assert store.list_keys("releases/r1/") == ["releases/r1/a"]


@pytest.mark.parametrize("key", ["", "../x", "releases/../../x", "/etc/passwd", "a//b",
                                 "a/./b", "a\\b", "a/\x00b", "releases/"])
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StorageError, match="not a relative path"):
        check_key(key)
    with pytest.raises(StorageError):
        store.write_bytes(key, b"x")
    assert not (tmp_path / "x").exists()


# -- URLs -------------------------------------------------------------------------------------


def test_open_store_maps_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    local = open_store(str(tmp_path / "plain"))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "plain"
    uri = open_store((tmp_path / "a b").as_uri())
    assert isinstance(uri, LocalStore) and uri.root == tmp_path / "a b"
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    bare = open_store("s3://bucket")
    assert isinstance(bare, S3Store) and bare.prefix == "" and bare._key("x/y") == "x/y"
    assert s3._key("releases/CURRENT") == "some/prefix/releases/CURRENT"


@pytest.mark.parametrize("url", ["s3://", "http://example.com/x", "ftp://host/x",
                                 "file://otherhost/x", "file:relative", "", "gs://bucket/x"])
def test_open_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(ConfigurationError, match="INSTANTREC_RELEASE_STORE"):
        open_store(url)


# -- the store's pointer ---------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"release_id": "../x", "generation": 1}', "not a plain name"),
    (b'{"release_id": ".staging", "generation": 1}', "not a plain name"),
    (b'{"release_id": "r1"}', "corrupt"),
    (b'{"release_id": "r1", "generation": "two"}', "corrupt"),
    (b"not json", "corrupt")])
def test_a_bad_store_pointer_is_refused(tmp_path: Path, payload: bytes, message: str) -> None:
    store = LocalStore(tmp_path)
    assert read_store_pointer(store) is None
    store.write_bytes(STORE_POINTER, payload)
    with pytest.raises(ReleaseError, match=message):
        read_store_pointer(store)


# -- pushing -----------------------------------------------------------------------------------


def test_push_writes_files_then_manifest_then_pointer(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    make_bundle(releases, "r1", generation=3)
    store = RecordingStore(tmp_path / "store")
    result = push_release(store, releases, "r1")
    assert (result.pushed, result.pointer_moved, result.generation) == (4, True, 3)
    assert store.writes == ["releases/r1/items.parquet", "releases/r1/lexical/params.json",
                            "releases/r1/vectors.npy", "releases/r1/manifest.json",
                            "releases/CURRENT"]
    assert read_store_pointer(store) == Pointer("r1", 3)
    for name in FILES:
        assert store.read_bytes(f"releases/r1/{name}") == (releases / "r1" / name).read_bytes()

    # a retried push of the same release does nothing
    store.writes.clear()
    again = push_release(store, releases, "r1")
    assert (again.pushed, again.pointer_moved, again.generation) == (0, False, 3)
    assert store.writes == []


def test_push_moves_the_store_pointer_forward_only(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    make_bundle(releases, "r1", generation=2)
    store = RecordingStore(tmp_path / "store")
    write_store_pointer(store, Pointer("r9", 5))  # another publisher went further
    store.writes.clear()
    result = push_release(store, releases, "r1")
    assert (result.pushed, result.pointer_moved, result.generation) == (0, False, 5)
    assert store.writes == [] and read_store_pointer(store) == Pointer("r9", 5)

    write_store_pointer(store, Pointer("r0", 2))  # same generation: not lower, refused too
    assert not push_release(store, releases, "r1").pointer_moved
    write_store_pointer(store, Pointer("r0", 1))
    assert push_release(store, releases, "r1").pointer_moved
    assert read_store_pointer(store) == Pointer("r1", 2)


def test_push_skips_a_release_that_is_no_longer_live(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    make_bundle(releases, "r1", generation=1)
    make_bundle(releases, "r2", generation=2)
    store = RecordingStore(tmp_path / "store")
    result = push_release(store, releases, "r1")
    assert (result.pushed, result.pointer_moved) == (0, False) and store.writes == []


def test_push_refuses_a_corrupt_local_release(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    bundle = make_bundle(releases, "r1", generation=1)
    (bundle / "vectors.npy").write_bytes(b"changed")
    store = RecordingStore(tmp_path / "store")
    with pytest.raises(ReleaseError, match="vectors.npy"):
        push_release(store, releases, "r1")
    assert store.writes == []


# -- syncing -----------------------------------------------------------------------------------


def test_sync_installs_a_verified_read_only_release_and_moves_the_local_pointer(
        tmp_path: Path) -> None:
    publisher = tmp_path / "pub"
    make_bundle(publisher, "r1", generation=7)
    store = LocalStore(tmp_path / "store")
    push_release(store, publisher, "r1")
    replica = tmp_path / "replica" / "releases"
    replica.mkdir(parents=True)
    sync = ReleaseSync(StoreSource(store), replica)

    assert sync.sync() == "r1"
    # the replica's own generation: its pointer's history, not the store's
    assert read_pointer(replica) == Pointer("r1", 1)
    for name in FILES:
        path = replica / "r1" / name
        assert path.read_bytes() == (publisher / "r1" / name).read_bytes()
        assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert list((replica / ".staging").glob("r1*")) == [replica / ".staging" / "r1.sync.lock"]
    assert sync.sync() is None  # nothing changed: the pointer is read, nothing else

    make_bundle(publisher, "r2", generation=8)
    push_release(store, publisher, "r2")
    assert sync.sync() == "r2" and read_pointer(replica) == Pointer("r2", 2)


def test_sync_refuses_a_corrupt_object_and_leaves_nothing_behind(tmp_path: Path) -> None:
    publisher = tmp_path / "pub"
    make_bundle(publisher, "r1", generation=1)
    store = LocalStore(tmp_path / "store")
    push_release(store, publisher, "r1")
    stored = tmp_path / "store" / "releases" / "r1" / "vectors.npy"
    data = bytearray(stored.read_bytes())
    data[3] ^= 0x01
    stored.write_bytes(bytes(data))
    replica = tmp_path / "replica"
    replica.mkdir()
    sync = ReleaseSync(StoreSource(store), replica)

    with pytest.raises(ReleaseError, match="checksum mismatch on vectors.npy"):
        sync.sync()
    assert read_pointer(replica) is None and not (replica / "r1").exists()
    assert not (replica / ".staging" / "r1.sync").exists()
    assert sync.sync() is None  # not downloaded again before retry_failed_s

    data[3] ^= 0x01  # repaired in the store: the next try after the delay installs it
    stored.write_bytes(bytes(data))
    sync.retry_failed_s = 0.0
    assert sync.sync() == "r1" and read_pointer(replica) == Pointer("r1", 1)


def test_sync_of_an_incomplete_release_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    # a pointer that names files a push never completed (written by hand: push never does it)
    store.write_bytes("releases/r1/vectors.npy", b"x")
    write_store_pointer(store, Pointer("r1", 1))
    replica = tmp_path / "replica"
    replica.mkdir()
    with pytest.raises(ReleaseError, match="has no manifest.json"):
        ReleaseSync(StoreSource(store), replica).sync()
    assert not (replica / "r1").exists()


def test_sync_without_a_store_pointer_changes_nothing(tmp_path: Path) -> None:
    replica = tmp_path / "replica"
    replica.mkdir()
    assert ReleaseSync(StoreSource(LocalStore(tmp_path / "store")), replica).sync() is None
    assert read_pointer(replica) is None
    assert os.listdir(replica) == []


# -- ranker checkpoints -------------------------------------------------------------------------


def checkpoint(home: Path, release_id: str, offset: int, mark: float = 0.0):
    """Publish a tiny ranker (4 dimensions, 3 items) of ``release_id`` in ``home`` at
    ``offset``; ``mark`` is added to its bias to tell checkpoints apart."""
    ranker = Ranker.initial(release_id, 4, 3)
    ranker.b0 = ranker.b0 + mark
    return publish_checkpoint(home, ranker, offset)


def test_local_store_deletes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.write_bytes("a/b", b"x")
    store.delete("a/b")
    assert not store.exists("a/b") and store.list_keys("a/") == []
    store.delete("a/b")  # a missing object: nothing happens
    with pytest.raises(StorageError):
        store.delete("../outside")


def test_push_checkpoint_writes_the_file_then_the_pointer_forward_only(tmp_path: Path) -> None:
    home = tmp_path / "pub"
    store = RecordingStore(tmp_path / "store")
    first = checkpoint(home, "r1", 10)
    assert push_checkpoint(store, home, first) is True
    assert store.writes == ["rankers/r1/ckpt-000000000010.npz", STORE_LATEST]
    # the same JSON as the local pointer, and the same file
    assert store.read_bytes(STORE_LATEST) == (home / "rankers" / "LATEST").read_bytes()
    assert (store.read_bytes("rankers/r1/ckpt-000000000010.npz")
            == (home / "rankers" / first.file).read_bytes())
    assert push_checkpoint(store, home, first) is False  # pushed already: nothing written
    assert len(store.writes) == 2

    second = checkpoint(home, "r1", 20, mark=1.0)
    assert push_checkpoint(store, home, second) is True
    assert store.writes[2:] == ["rankers/r1/ckpt-000000000020.npz", STORE_LATEST]
    assert push_checkpoint(store, home, first) is False  # never back to a lower seq
    assert read_store_latest(store) == second == read_latest(home)
    assert len(store.writes) == 4


def test_the_store_keeps_the_newest_checkpoints_of_the_pointers_release(tmp_path: Path) -> None:
    home = tmp_path / "pub"
    store = RecordingStore(tmp_path / "store")
    old = checkpoint(home, "r0", 5)
    push_checkpoint(store, home, old)
    refs = []
    for n in range(1, KEEP + 3):
        refs.append(checkpoint(home, "r1", 10 * n))
        push_checkpoint(store, home, refs[-1])
    assert store.list_keys("rankers/") == sorted(
        [STORE_LATEST] + [f"rankers/{ref.file}" for ref in refs[-KEEP:]])
    # files are deleted only after the pointer has moved past them
    first_delete = next(i for i, w in enumerate(store.writes) if w.startswith("delete"))
    assert store.writes[first_delete - 1] == STORE_LATEST
    assert store.writes[first_delete] == f"delete rankers/{old.file}"


def test_sync_installs_the_checkpoint_and_the_same_pointer(tmp_path: Path) -> None:
    home, replica = tmp_path / "pub", tmp_path / "replica"
    store = LocalStore(tmp_path / "store")
    ref = checkpoint(home, "r1", 10, mark=2.5)
    push_checkpoint(store, home, ref)
    sync = CheckpointSync(store, replica)

    assert sync.sync("r1") == ref
    assert (replica / "rankers" / "LATEST").read_bytes() == store.read_bytes(STORE_LATEST)
    assert read_latest(replica) == ref
    assert Ranker.load(replica / "rankers" / ref.file).b0 == pytest.approx(
        Ranker.initial("r1", 4, 3).b0 + 2.5)
    assert sorted(p.name for p in (replica / "rankers" / "r1").iterdir()) == [
        "ckpt-000000000010.npz"]  # no temporary file left
    assert sync.sync("r1") is None  # nothing changed: the store's pointer is read, nothing else

    newer = checkpoint(home, "r1", 20, mark=3.0)
    push_checkpoint(store, home, newer)
    assert sync.sync("r1") == newer and read_latest(replica) == newer


def test_sync_takes_no_checkpoint_of_another_release(tmp_path: Path) -> None:
    home, replica = tmp_path / "pub", tmp_path / "replica"
    store = LocalStore(tmp_path / "store")
    push_checkpoint(store, home, checkpoint(home, "r2", 10))
    assert CheckpointSync(store, replica).sync("r1") is None
    assert not (replica / "rankers").exists()


@pytest.mark.parametrize("file", ["r2/ckpt-000000000010.npz", "r1/../r2/ckpt.npz",
                                  "../r1/ckpt.npz", "r1/.hidden.npz", "r1"])
def test_sync_refuses_a_store_pointer_naming_a_file_outside_its_release(
        tmp_path: Path, file: str) -> None:
    home, replica = tmp_path / "pub", tmp_path / "replica"
    store = LocalStore(tmp_path / "store")
    push_checkpoint(store, home, checkpoint(home, "r2", 10))
    store.write_bytes(STORE_LATEST, json.dumps(
        {"release_id": "r1", "file": file, "offset": 10, "seq": 9}).encode())
    with pytest.raises(ReleaseError, match="refused"):
        CheckpointSync(store, replica).sync("r1")
    assert not (replica / "rankers").exists()


def test_sync_refuses_a_checkpoint_that_does_not_load(tmp_path: Path) -> None:
    home, replica = tmp_path / "pub", tmp_path / "replica"
    store = LocalStore(tmp_path / "store")
    ref = checkpoint(home, "r1", 10)
    push_checkpoint(store, home, ref)
    good = store.read_bytes(f"rankers/{ref.file}")
    store.write_bytes(f"rankers/{ref.file}", good[: len(good) // 2])  # truncated
    sync = CheckpointSync(store, replica)

    with pytest.raises(ReleaseError, match="cannot be read"):
        sync.sync("r1")
    assert read_latest(replica) is None
    assert list((replica / "rankers" / "r1").iterdir()) == []  # the download is gone
    assert sync.sync("r1") is None  # not downloaded again before retry_failed_s

    store.write_bytes(f"rankers/{ref.file}", good)  # repaired: the next try installs it
    sync.retry_failed_s = 0.0
    assert sync.sync("r1") == ref and read_latest(replica) == ref


def test_a_checkpoint_trained_for_another_release_than_its_pointer_says_is_refused(
        tmp_path: Path) -> None:
    home, replica = tmp_path / "pub", tmp_path / "replica"
    store = LocalStore(tmp_path / "store")
    ref = checkpoint(home, "r2", 10)
    push_checkpoint(store, home, ref)
    # the r2 file copied under r1's name, and a pointer naming it as r1's
    store.write_bytes("rankers/r1/ckpt-000000000010.npz", store.read_bytes(f"rankers/{ref.file}"))
    store.write_bytes(STORE_LATEST, json.dumps({"release_id": "r1", "file":
                                                "r1/ckpt-000000000010.npz", "offset": 10,
                                                "seq": 2}).encode())
    with pytest.raises(ReleaseError, match="trained for release r2, not r1"):
        CheckpointSync(store, replica).sync("r1")
    assert read_latest(replica) is None


def test_replicas_of_a_store_or_a_registry_take_their_checkpoints_from_the_store(
        tmp_path: Path) -> None:
    from serving.checkpoint import open_checkpoint_sync
    from serving.settings import Settings

    store = str(tmp_path / "store")
    for source in ("store", "mlflow"):
        sync = open_checkpoint_sync(Settings(home=tmp_path / source, release_source=source,
                                             release_store=store))
        assert sync is not None and sync.store.url == LocalStore(Path(store)).url
        assert sync.home == tmp_path / source
    # the publisher's home serves its own checkpoints; a registry without a store has none
    assert open_checkpoint_sync(Settings(home=tmp_path, release_store=store)) is None
    assert open_checkpoint_sync(Settings(home=tmp_path, release_source="mlflow")) is None
