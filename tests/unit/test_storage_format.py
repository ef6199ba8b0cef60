"""The manifest: older format versions are upgraded step by step when read, retired keys are dropped."""

from __future__ import annotations

import json

import pytest

from nanodb.storage import format as storage_format
from nanodb.storage.format import FORMAT_VERSION, MANIFEST, DatabaseError, Manifest, read_manifest, write_manifest


def write_raw(root, **fields):
    data = {**Manifest("ViT-S-32", "none", "none", 0, 8).__dict__, **fields}
    (root / MANIFEST).write_text(json.dumps(data))


def test_migrations_run_in_order_from_the_manifests_version(tmp_path, monkeypatch):
    ran = []

    def step(version):
        return lambda data: ran.append(version) or {**data, f"after_{version}": True}

    monkeypatch.setattr(storage_format, "MIGRATIONS", [(1, step(1)), (2, step(2))])
    monkeypatch.setattr(storage_format, "FORMAT_VERSION", 3)
    path = tmp_path / MANIFEST
    assert storage_format.upgraded({"version": 1}, path) == {"version": 3, "after_1": True, "after_2": True}
    assert ran == [1, 2]
    ran.clear()
    assert storage_format.upgraded({"version": 2}, path) == {"version": 3, "after_2": True} and ran == [2]
    with pytest.raises(DatabaseError, match="newer nanodb"):
        storage_format.upgraded({"version": 4}, path)
    with pytest.raises(DatabaseError, match="unknown format version 0"):
        storage_format.upgraded({"version": 0}, path)


def test_a_version_1_manifest_gets_the_compact_files(tmp_path):
    checksums = {kind: 7 for kind in ("vectors", "items", "paths", "meta", "deleted")}
    write_raw(tmp_path, version=1, checksums=checksums)
    m = read_manifest(tmp_path)
    assert m.version == FORMAT_VERSION and m.compact == 0
    assert m.checksums == {**checksums, "codes": 0, "scales": 0}


def test_the_retired_dtype_key_is_read_but_no_longer_written(tmp_path):
    write_raw(tmp_path, dtype="float16")  # what every nanodb before this one wrote
    m = read_manifest(tmp_path)
    assert m is not None and not hasattr(m, "dtype")
    write_manifest(tmp_path, m)
    assert "dtype" not in json.loads((tmp_path / MANIFEST).read_text())
