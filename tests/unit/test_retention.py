"""Release retention: the live release, the one rankers/LATEST names and the newest ``keep``
others stay; older releases go whole, with their ranker checkpoints."""

from __future__ import annotations

import json
import os

import pytest

from serving.errors import ConfigurationError
from serving.release import Pointer, write_pointer
from serving.retention import prunable_releases, prune_releases


def _release(home, release_id, published_ns):
    folder = home / "releases" / release_id
    folder.mkdir(parents=True)
    (folder / "vectors.npy").write_bytes(b"x" * 64)
    os.chmod(folder / "vectors.npy", 0o444)  # published files are read-only
    manifest = folder / "manifest.json"
    manifest.write_text("{}")
    os.utime(manifest, ns=(published_ns, published_ns))
    ckpt = home / "rankers" / release_id
    ckpt.mkdir(parents=True)
    (ckpt / "ckpt-000000000001.npz").write_bytes(b"c")


@pytest.fixture
def home(tmp_path):
    # published in the order r1..r6; r4 is live; the updater's LATEST still names r2;
    # a release being built and a download in progress sit in .staging
    for i in range(1, 7):
        _release(tmp_path, f"r{i}", 10**18 + i * 10**9)
    write_pointer(tmp_path / "releases", Pointer("r4", 7))
    (tmp_path / "rankers" / "LATEST").write_text(json.dumps(
        {"release_id": "r2", "file": "r2/ckpt-000000000001.npz", "offset": 3, "seq": 1}))
    (tmp_path / "releases" / ".staging" / "r7").mkdir(parents=True)
    (tmp_path / "releases" / ".staging" / "r8.sync").mkdir()
    (tmp_path / "releases" / "not-a-release").mkdir()  # no manifest: not ours to delete
    return tmp_path


def _left(home):
    return sorted(p.name for p in (home / "releases").iterdir()
                  if p.is_dir() and not p.name.startswith("."))


def test_keeps_the_live_the_updaters_and_the_newest_releases(home):
    assert prunable_releases(home / "releases", 2, home) == ["r1", "r3"]
    assert prune_releases(home / "releases", 2, home, dry_run=True) == ["r1", "r3"]
    assert _left(home) == ["not-a-release", "r1", "r2", "r3", "r4", "r5", "r6"]

    assert prune_releases(home / "releases", 2, home) == ["r1", "r3"]
    assert _left(home) == ["not-a-release", "r2", "r4", "r5", "r6"]
    assert sorted(p.name for p in (home / "rankers").iterdir()) == ["LATEST", "r2", "r4", "r5",
                                                                    "r6"]
    # nothing half deleted is left, and what was being built or downloaded is untouched
    assert sorted(p.name for p in (home / "releases" / ".staging").iterdir()) == ["r7", "r8.sync"]
    assert prune_releases(home / "releases", 2, home) == []  # idempotent


def test_without_the_home_the_updaters_release_is_not_protected(home):
    assert prune_releases(home / "releases", 1) == ["r1", "r2", "r3", "r5"]
    assert _left(home) == ["not-a-release", "r4", "r6"]
    # checkpoints are the home's business: left alone without it
    assert (home / "rankers" / "r1").is_dir()


def test_nothing_goes_before_a_release_is_live_and_keep_is_at_least_one(tmp_path, home):
    _release(tmp_path / "fresh", "a", 1)
    assert prune_releases(tmp_path / "fresh" / "releases", 1, tmp_path / "fresh") == []
    assert prune_releases(tmp_path / "missing", 1) == []
    with pytest.raises(ConfigurationError, match="at least 1"):
        prune_releases(home / "releases", 0, home)
    assert len(_left(home)) == 7


def test_the_prune_command_names_what_goes_and_refuses_keep_zero(home, capsys):
    from pipelines.cli import main

    assert main(["--home", str(home), "prune", "--keep", "3", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["pruned"], out["keep"], out["dry_run"]) == (["r1"], 3, True)
    assert len(_left(home)) == 7
    assert main(["--home", str(home), "prune", "--keep", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["pruned"] == ["r1"]
    assert "r1" not in _left(home)
    assert main(["--home", str(home), "prune", "--keep", "0"]) != 0
    assert "at least 1" in capsys.readouterr().err
