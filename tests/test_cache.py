"""Cache keys, manifest integrity, schema checks, list and clean."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend import cache
from backend.cli import main


def _fake_build(root, name, complete=True, schema=cache.SCHEMA_VERSION):
    folder = root / name
    manifest = cache.new_manifest(
        name, {"model": {"spec": "mini"}}, "python -m backend build --atoms 64"
    )
    manifest["schema_version"] = schema
    (folder / "codes").mkdir(parents=True)
    np.save(folder / "codes" / "a.npy", np.arange(10))
    (folder / "codes" / "b.txt").write_text("hello")
    cache.write_manifest(folder, manifest)
    cache.record_stage(folder, manifest, "encode", ["codes/a.npy", "codes/b.txt"], 1.5)
    if complete:
        manifest["complete"] = True
        cache.write_manifest(folder, manifest)
    return folder, manifest


def test_key_depends_on_values_not_order():
    a = cache.cache_key({"model": "mini", "sae": {"k": 32, "n_atoms": 2048}})
    b = cache.cache_key({"sae": {"n_atoms": 2048, "k": 32}, "model": "mini"})
    c = cache.cache_key({"model": "mini", "sae": {"k": 16, "n_atoms": 2048}})
    assert a == b
    assert a != c
    assert len(a) == 16


def test_intact_stage_is_done_and_damage_is_detected(tmp_path):
    folder, manifest = _fake_build(tmp_path, "k1")
    assert cache.stage_done(folder, manifest, "encode")
    assert cache.open_cache(folder)["key"] == "k1"

    # Same size, one byte different: only the checksum can tell.
    data = bytearray((folder / "codes" / "b.txt").read_bytes())
    data[0] ^= 1
    (folder / "codes" / "b.txt").write_bytes(bytes(data))
    assert not cache.stage_done(folder, manifest, "encode")
    with pytest.raises(cache.DamagedCacheError, match="b.txt.*checksum"):
        cache.open_cache(folder)

    (folder / "codes" / "a.npy").unlink()
    problems = cache.damaged_files(folder, manifest, ["codes/a.npy"])
    assert problems == ["codes/a.npy (missing)"]


def test_truncated_file_is_damaged(tmp_path):
    folder, manifest = _fake_build(tmp_path, "k1")
    path = folder / "codes" / "a.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(cache.DamagedCacheError, match="a.npy.*size"):
        cache.open_cache(folder)


def test_incompatible_schema_names_the_rebuild_command(tmp_path):
    folder, _ = _fake_build(tmp_path, "old", schema=cache.SCHEMA_VERSION - 1)
    with pytest.raises(cache.IncompatibleCacheError) as err:
        cache.open_cache(folder)
    assert "python -m backend build --atoms 64" in str(err.value)
    assert f"version {cache.SCHEMA_VERSION}" in str(err.value)


def test_unfinished_and_unreadable(tmp_path):
    folder, _ = _fake_build(tmp_path, "partial", complete=False)
    with pytest.raises(cache.CacheError, match="unfinished"):
        cache.open_cache(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(cache.CacheError, match="not valid JSON"):
        cache.read_manifest(bad)


def test_list_and_clean(tmp_path, capsys):
    _fake_build(tmp_path, "done")
    _fake_build(tmp_path, "partial", complete=False)
    _fake_build(tmp_path, "old", schema=0)
    status = {e.key: e.status for e in cache.list_caches(tmp_path)}
    assert status == {"done": "complete", "partial": "partial", "old": "incompatible"}
    assert cache.latest_cache(tmp_path) == tmp_path / "done"

    assert main(["cache", "--root", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "partial" in out

    assert main(["cache", "--root", str(tmp_path), "clean", "--dry-run"]) == 0
    assert (tmp_path / "partial").exists()
    assert main(["cache", "--root", str(tmp_path), "clean"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]

    with pytest.raises(cache.CacheError, match="no cache folder named nope"):
        cache.clean(tmp_path, ["nope"])
    cache.clean(tmp_path, ["done"])
    assert list(tmp_path.iterdir()) == []


def test_verify_command(tmp_path, capsys):
    folder, _ = _fake_build(tmp_path, "k1")
    assert main(["cache", "--root", str(tmp_path), "verify"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["checksums"]["codes/b.txt"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["cache", "--root", str(tmp_path), "verify", "k1"]) == 1
    assert "FAILED" in capsys.readouterr().out
