"""Replicas with homes of their own, serving what a publisher pushed to a release store or
registered in MLflow: real demo releases, the real encoder, the real publish step.

The S3 tests run the same contract through :class:`serving.objectstore.S3Store` against
moto's S3-API server (``moto_server``, a subprocess on 127.0.0.1 stopped by its PID): an
emulator standing in for an S3-compatible service. What they test is this code's S3 client
path (boto3 requests, keys under a prefix, listing, missing objects), not a real service's
consistency or durability.

The ranker tests run the nearline updater of the publisher's home with the store set: its
checkpoints reach replicas whose homes hold nothing but what they synced.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipelines.learning.nearline import NearlineUpdater
from pipelines.reliability import stage_copy
from pipelines.service import die_with_parent, free_port
from pipelines.steps import run_publish
from serving import failpoints
from serving.checkpoint import STORE_LATEST, read_latest, read_store_latest
from serving.objectstore import LocalStore, ObjectStore, open_store
from serving.ranker import Ranker
from serving.recommender import Recommender
from serving.release import read_pointer
from serving.release_sync import read_store_pointer, release_key
from serving.settings import Settings
from tests.conftest import click_stream, make_settings

pytestmark = pytest.mark.integration

QUERY = "espresso machine"


def publisher_settings(home: Path, store_url: str) -> Settings:
    return make_settings(home, release_store=store_url)


def publish_copy(settings: Settings, new_id: str) -> dict:
    """Publish a copy of the live release under ``new_id`` through the publish step (which
    pushes it to the settings' store)."""
    releases = settings.releases_dir
    live = read_pointer(releases)
    assert live is not None
    return run_publish(settings, stage_copy(releases, live.release_id, new_id))


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def replica(home: Path, encoder, watch: bool = False, **extra) -> Recommender:
    """A Recommender on ``home`` (empty: nothing but what it syncs) following ``extra``'s
    release source."""
    return Recommender.load(home, settings=make_settings(home, **extra), encoder=encoder,
                            watch=watch)


def assert_installed(home: Path, release_id: str) -> None:
    """The release is whole and read-only in the replica's home, no download left over."""
    bundle = home / "releases" / release_id
    assert (bundle / "manifest.json").is_file() and (bundle / "vectors.npy").is_file()
    assert all(not p.stat().st_mode & 0o222 for p in bundle.rglob("*") if p.is_file())
    assert not [p for p in (home / "releases" / ".staging").iterdir() if p.is_dir()]


def corrupt_one_byte(store: ObjectStore, key: str, tmp_path: Path) -> None:
    """Change one byte of object ``key`` in place in the store (as bit rot or a bad copy
    would)."""
    local = tmp_path / "corrupt.bin"
    store.get_file(key, local)
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0x01
    local.write_bytes(bytes(data))
    store.put_file(key, local)


def check_publish_and_follow(demo_copy: Path, replica_home: Path, store_url: str, encoder,
                             tmp_path: Path) -> None:
    """The contract on any store: the published release pushed, an empty replica serves it,
    a second release reaches the running replica through its watcher, a retried push does
    nothing, and a corrupted object is refused while the replica serves on."""
    pub = publisher_settings(demo_copy, store_url)
    first = read_pointer(pub.releases_dir)
    assert first is not None
    # the release already live here (a retried publish task) is pushed, not published again
    out = run_publish(pub, pub.releases_dir / first.release_id)
    assert out["went_live"] is False
    assert out["store"]["pointer_moved"] is True and out["store"]["pushed"] > 3
    store = open_store(store_url)
    assert read_store_pointer(store).release_id == first.release_id

    rec = replica(replica_home, encoder, watch=True, release_source="store",
                  release_store=store_url)
    try:
        assert rec.release_id == first.release_id
        assert rec.recommend(QUERY, k=3)
        assert_installed(replica_home, first.release_id)

        second = publish_copy(pub, "storecopy0000002")
        assert second["went_live"] and second["store"]["pointer_moved"]
        assert wait_for(lambda: rec.release_id == "storecopy0000002")
        assert rec.counters["syncs"] == 1 and rec.counters["sync_failures"] == 0
        assert read_pointer(replica_home / "releases").generation == 2
        assert_installed(replica_home, "storecopy0000002")
        assert rec.recommend(QUERY, k=3)
        # a retried publish of the same release pushes nothing
        again = run_publish(pub, pub.releases_dir / "storecopy0000002")
        assert again["store"]["pushed"] == 0 and not again["store"]["pointer_moved"]
    finally:
        rec.close()

    # a corrupted object: refused, counted, and the live release serves on
    rec = replica(replica_home, encoder, release_source="store", release_store=store_url)
    try:
        publish_copy(pub, "storecopy0000003")
        corrupt_one_byte(store, release_key("storecopy0000003", "vectors.npy"), tmp_path)
        assert rec.reload() is False
        assert rec.counters["sync_failures"] == 1
        assert rec.release_id == "storecopy0000002" and rec.recommend(QUERY, k=3)
        assert not (replica_home / "releases" / "storecopy0000003").exists()
        assert read_pointer(replica_home / "releases").release_id == "storecopy0000002"
        assert not [p for p in (replica_home / "releases" / ".staging").iterdir() if p.is_dir()]
    finally:
        rec.close()
    # a replica starting while the store names that release serves the one it has
    rec = replica(replica_home, encoder, release_source="store", release_store=store_url)
    try:
        assert rec.release_id == "storecopy0000002" and rec.counters["sync_failures"] == 1
    finally:
        rec.close()


def rank_of(rec: Recommender, query: str, item_id: str) -> int | None:
    ids = [r.item_id for r in rec.recommend(query, k=10)]
    return ids.index(item_id) + 1 if item_id in ids else None


def assert_same_parameters(a: Ranker, b: Ranker) -> None:
    left, right = a.to_arrays(), b.to_arrays()
    assert sorted(left) == sorted(right)
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def check_online_learning_reaches_replicas(demo_copy: Path, tmp_path: Path, store_url: str,
                                           encoder) -> None:
    """The updater of the publisher's home pushes its checkpoints; a running replica with an
    empty home of its own takes them at its next poll, and a new one starts with them: the
    same parameters as the updater's, the same results as the publisher's home."""
    pub = publisher_settings(demo_copy, store_url)
    first = read_pointer(pub.releases_dir)
    run_publish(pub, pub.releases_dir / first.release_id)  # the release into the store
    store = open_store(store_url)
    rec = replica(tmp_path / "replica", encoder, release_source="store",
                  release_store=store_url)
    shop = Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                            watch=False)
    try:
        assert rec.ranker_seq == 0 and rec.reload() is False  # nothing learned yet
        query = "coffee maker"
        target = rec.recommend(query, k=10)[6].item_id
        assert rank_of(rec, query, target) == 7
        shop.record_many(click_stream(shop, query, target, 30))
        updater = NearlineUpdater(pub, encoder)
        try:
            summary = updater.run_once()
            pushed = summary["store_push"]
            assert pushed["pushes"] == 1 and pushed["push_failures"] == 0
            local = read_latest(demo_copy)
            assert read_store_latest(store) == local and local.seq >= 1
            assert store.read_bytes(STORE_LATEST) == (demo_copy / "rankers" / "LATEST").read_bytes()

            assert rec.reload() is True  # the watcher's poll
            assert rec.ranker_seq == local.seq and rec.counters["ranker_syncs"] == 1
            assert rec.counters["ranker_sync_failures"] == 0
            synced = tmp_path / "replica" / "rankers" / local.file
            assert synced.read_bytes() == (demo_copy / "rankers" / local.file).read_bytes()
            assert_same_parameters(Ranker.load(synced), updater.ranker)
            assert rank_of(rec, query, target) < 7  # what the updater learned, served here
            assert shop.reload() is True
            assert ([r.item_id for r in rec.recommend(query, k=10)]
                    == [r.item_id for r in shop.recommend(query, k=10)])
            assert rec.reload() is False  # nothing changed: one read of the store's pointer

            # more clicks: the next checkpoint follows
            shop.record_many(click_stream(shop, query, target, 30, start_id=30))
            updater.run_once()
            newer = read_latest(demo_copy)
            assert newer.seq > local.seq and read_store_latest(store) == newer
            assert rec.reload() is True and rec.ranker_seq == newer.seq
        finally:
            updater.close()
        assert_same_parameters(Ranker.load(tmp_path / "replica" / "rankers" / newer.file),
                               updater.ranker)
        # a replica started now, its home empty, comes up with the trained ranker
        fresh = replica(tmp_path / "fresh", encoder, release_source="store",
                        release_store=store_url)
        try:
            assert fresh.ranker_seq == newer.seq
            assert ([r.item_id for r in fresh.recommend(query, k=10)]
                    == [r.item_id for r in rec.recommend(query, k=10)])
        finally:
            fresh.close()
    finally:
        rec.close()
        shop.close()


# -- a store on the local file system -----------------------------------------------------------


def test_the_updaters_checkpoints_reach_a_replica_with_an_empty_home(demo_copy, encoder,
                                                                     tmp_path):
    check_online_learning_reaches_replicas(demo_copy, tmp_path, (tmp_path / "store").as_uri(),
                                           encoder)


def test_a_replica_refuses_a_bad_store_pointer_and_another_releases_checkpoint(
        demo_copy, encoder, tmp_path, caplog):
    store_dir = tmp_path / "store"
    pub = publisher_settings(demo_copy, str(store_dir))
    live = read_pointer(pub.releases_dir).release_id
    run_publish(pub, pub.releases_dir / live)
    updater = NearlineUpdater(pub, encoder)
    updater.run_once()  # the untrained ranker's first checkpoint, pushed
    updater.close()
    store = LocalStore(store_dir)
    good = read_store_latest(store)
    rec = replica(tmp_path / "replica", encoder, release_source="store",
                  release_store=str(store_dir))
    rankers = tmp_path / "replica" / "rankers"
    try:
        assert rec.ranker_seq == good.seq
        before = [r.item_id for r in rec.recommend(QUERY, k=5)]
        # a pointer naming a file outside its release's folder: a checkpoint of this very
        # release that would load, but lies elsewhere
        store.put_file("rankers/elsewhere/ckpt-000000000001.npz",
                       demo_copy / "rankers" / good.file)
        store.write_bytes(STORE_LATEST, json.dumps(
            {"release_id": live, "file": "elsewhere/ckpt-000000000001.npz", "offset": 1,
             "seq": good.seq + 1}).encode())
        with caplog.at_level(logging.ERROR, logger="serving.recommender"):
            assert rec.reload() is False
        assert "not inside the folder of its release" in caplog.text
        assert rec.counters["ranker_sync_failures"] == 1 and not (rankers / "elsewhere").exists()
        assert rec.ranker_seq == good.seq and read_latest(tmp_path / "replica") == good
        assert [r.item_id for r in rec.recommend(QUERY, k=5)] == before

        # a checkpoint trained for another release: never taken, not even downloaded
        other = Ranker.initial("some-other-release", 384, rec.manifest.item_count)
        other.item_bias[:] = 5.0
        path = tmp_path / "other.npz"
        other.save(path)
        store.put_file("rankers/some-other-release/ckpt-000000000001.npz", path)
        store.write_bytes(STORE_LATEST, json.dumps(
            {"release_id": "some-other-release",
             "file": "some-other-release/ckpt-000000000001.npz", "offset": 1,
             "seq": good.seq + 2}).encode())
        assert rec.reload() is False and rec.counters["ranker_sync_failures"] == 1
        assert not (rankers / "some-other-release").exists()
        assert rec.ranker_seq == good.seq and read_latest(tmp_path / "replica") == good
        assert all(r.signals["item_bias"] == 0.0 for r in rec.recommend(QUERY, k=5))
    finally:
        rec.close()


def test_a_replica_switching_release_comes_up_with_the_ranker_trained_for_it(
        demo_copy, encoder, tmp_path):
    store_dir = tmp_path / "store"
    pub = publisher_settings(demo_copy, str(store_dir))
    first = read_pointer(pub.releases_dir).release_id
    run_publish(pub, pub.releases_dir / first)
    updater = NearlineUpdater(pub, encoder)
    try:
        updater.run_once()
        rec = replica(tmp_path / "replica", encoder, release_source="store",
                      release_store=str(store_dir))
        try:
            assert rec.ranker_seq == read_latest(demo_copy).seq
            publish_copy(pub, "storecopy0000002")
            updater.run_once()  # follows the release: the ranker carried over, published, pushed
            ref = read_latest(demo_copy)
            assert ref.release_id == "storecopy0000002"
            assert read_store_latest(LocalStore(store_dir)) == ref
            # one poll: the release and the checkpoint trained for it, swapped in together
            assert rec.reload() is True
            assert rec.release_id == "storecopy0000002" and rec.ranker_seq == ref.seq
            assert rec.counters["ranker_syncs"] == 1 and rec.counters["syncs"] == 1
            assert rec.reload() is False
        finally:
            rec.close()
    finally:
        updater.close()


def test_a_store_that_is_down_does_not_stop_the_updater(demo_copy, encoder, tmp_path):
    store_dir = tmp_path / "store"
    store_dir.write_text("a file where the store's directory should be: every access fails")
    pub = make_settings(demo_copy, release_store=str(store_dir), checkpoint_every_events=40)
    shop = Recommender.load(demo_copy, settings=make_settings(demo_copy), encoder=encoder,
                            watch=False)
    target = shop.recommend("coffee maker", k=10)[6].item_id
    shop.record_many(click_stream(shop, "coffee maker", target, 30))  # 240 events
    updater = NearlineUpdater(pub, encoder)
    try:
        summary = updater.run_once()
        assert summary["applied_total"] == 240
        local = read_latest(demo_copy)
        assert local.seq >= 6 and local.offset == updater.offset  # published here all along
        pushed = summary["store_push"]
        assert pushed["push_failures"] >= 1 and pushed["pushes"] == 0
        assert "cannot read rankers/LATEST" in pushed["last"]["error"]

        # the store is back: the newest checkpoint is pushed (not every one it missed)
        store_dir.unlink()
        assert updater.pusher.flush(30) is True
        assert read_store_latest(LocalStore(store_dir)) == local
        assert LocalStore(store_dir).list_keys("rankers/") == sorted(
            [f"rankers/{local.file}", STORE_LATEST])
        assert updater.pusher.stats()["pushes"] == 1
    finally:
        updater.close()
        shop.close()


def test_a_replica_with_an_empty_home_serves_and_follows_the_store(demo_copy, encoder,
                                                                    tmp_path):
    check_publish_and_follow(demo_copy, tmp_path / "replica", (tmp_path / "store").as_uri(),
                             encoder, tmp_path)


@pytest.mark.parametrize("point", ["store.files", "store.manifest"])
def test_a_push_that_dies_before_the_pointer_leaves_replicas_on_the_old_release(
        demo_copy, encoder, tmp_path, monkeypatch, point):
    store_dir = tmp_path / "store"
    pub = publisher_settings(demo_copy, str(store_dir))
    first = read_pointer(pub.releases_dir)
    run_publish(pub, pub.releases_dir / first.release_id)
    rec = replica(tmp_path / "replica", encoder, release_source="store",
                  release_store=str(store_dir))
    try:
        monkeypatch.setenv(failpoints.ENV, f"{point}:1:eio")
        failpoints.reset()
        with pytest.raises(OSError, match=f"injected at {point}"):
            publish_copy(pub, "storecopy0000002")
        monkeypatch.delenv(failpoints.ENV)
        failpoints.reset()
        # live here, its files (or all but the manifest) in the store, the store's pointer not
        assert read_pointer(pub.releases_dir).release_id == "storecopy0000002"
        assert LocalStore(store_dir).list_keys(release_key("storecopy0000002"))
        assert read_store_pointer(LocalStore(store_dir)).release_id == first.release_id
        assert rec.reload() is False
        assert rec.release_id == first.release_id and rec.counters["sync_failures"] == 0

        # the retried task finishes the push; the replica follows
        out = run_publish(pub, pub.releases_dir / "storecopy0000002")
        assert out["store"]["pointer_moved"] is True
        assert rec.reload() is True and rec.release_id == "storecopy0000002"
    finally:
        rec.close()


def test_a_replica_with_nothing_published_anywhere_says_so(tmp_path, encoder):
    from serving.errors import ReleaseError

    with pytest.raises(ReleaseError, match="no release has been published to store"):
        replica(tmp_path / "replica", encoder, release_source="store",
                release_store=str(tmp_path / "store"))


# -- an S3-API emulator -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """moto's S3-API server on 127.0.0.1:<free port>, stopped by its PID."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    server = Path(sys.executable).with_name("moto_server")
    with log_path.open("ab") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"moto_server exited: {log_path.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not answer within 30 s"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket; boto3 finds the endpoint and credentials in the standard variables."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"releases-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def test_the_updaters_checkpoints_reach_a_replica_through_the_s3_client(
        demo_copy, encoder, tmp_path, s3_bucket):
    check_online_learning_reaches_replicas(demo_copy, tmp_path,
                                           f"s3://{s3_bucket}/shop/prod", encoder)


def test_an_unreachable_s3_store_does_not_stop_the_updater(demo_copy, encoder, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail at once instead of retrying for seconds
    pub = make_settings(demo_copy, release_store="s3://nowhere/shop")
    updater = NearlineUpdater(pub, encoder)
    try:
        summary = updater.run_once()
        assert read_latest(demo_copy).seq == 1  # published here
        assert summary["store_push"]["push_failures"] >= 1
        assert summary["store_push"]["pushes"] == 0
        assert "Could not connect" in summary["store_push"]["last"]["error"]
    finally:
        updater.close()


def test_the_store_contract_through_the_s3_client(demo_copy, encoder, tmp_path, s3_bucket):
    check_publish_and_follow(demo_copy, tmp_path / "replica", f"s3://{s3_bucket}/shop/prod",
                             encoder, tmp_path)
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket)["Contents"]]
    assert "shop/prod/releases/CURRENT" in keys
    assert all(k.startswith("shop/prod/releases/") for k in keys)


# -- the MLflow registry ------------------------------------------------------------------------


def test_a_replica_serves_the_champion_and_follows_the_alias(demo_copy, encoder, tmp_path):
    from pipelines.registry import promote_version
    from pipelines.steps import run_register

    pub = make_settings(demo_copy)
    first = read_pointer(pub.releases_dir)
    one = run_register(pub, pub.releases_dir / first.release_id)
    assert one["champion"] is True

    home = tmp_path / "replica"
    rec = replica(home, encoder, release_source="mlflow",
                  mlflow_tracking_uri=pub.tracking_uri)
    try:
        assert rec.release_id == first.release_id and rec.recommend(QUERY, k=3)
        assert_installed(home, first.release_id)

        publish_copy(pub, "mlflowcopy000002")
        two = run_register(pub, pub.releases_dir / "mlflowcopy000002")
        assert two["champion"] is True and two["version"] == one["version"] + 1
        assert rec.reload() is True and rec.release_id == "mlflowcopy000002"
        assert_installed(home, "mlflowcopy000002")

        # champion moved back by hand: the release is here already, the pointer follows
        promote_version(pub, pub.model_name, one["version"])
        assert rec.reload() is True and rec.release_id == first.release_id
        assert read_pointer(home / "releases").generation == 3
        assert rec.counters["syncs"] == 2 and rec.counters["sync_failures"] == 0
        assert rec.reload() is False  # nothing moved
    finally:
        rec.close()


def test_publisher_and_replica_keep_only_the_newest_releases(demo_copy, encoder, tmp_path):
    """Retention on both sides: each release that goes live (published, or synced by a
    replica) leaves the live release and the newest ``keep_releases`` others; the store keeps
    every release."""
    store_url = (tmp_path / "store").as_uri()
    pub = make_settings(demo_copy, release_store=store_url, keep_releases=1)
    first = read_pointer(pub.releases_dir).release_id
    run_publish(pub, pub.releases_dir / first)
    replica_home = tmp_path / "replica"
    rec = replica(replica_home, encoder, release_source="store", release_store=store_url,
                  keep_releases=1)
    try:
        ids = [first]
        for n in range(2, 5):
            ids.append(f"keepcopy000000{n:02d}")
            out = publish_copy(pub, ids[-1])
            assert out["went_live"] and out["pruned"] == ids[-3:-2]
            assert rec.reload() and rec.release_id == ids[-1]
            assert rec.recommend(QUERY, k=3)
            for home in (demo_copy, replica_home):
                left = sorted(p.name for p in (home / "releases").iterdir()
                              if p.is_dir() and not p.name.startswith("."))
                assert left == sorted(ids[-2:]), (home, left)
        # the replica's old release went although a process served it until its reload
        assert not (replica_home / "releases" / ids[-3]).exists()
        store_ids = {key.split("/")[1] for key in open_store(store_url).list_keys("releases/")
                     if key.count("/") >= 2}
        assert set(ids) <= store_ids
    finally:
        rec.close()
