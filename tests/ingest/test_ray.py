"""nanodb on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a distributed
scan into a local database equals a local scan and survives a worker node killed mid-scan (the sharded
database: test_sharded.py). Needs the `ray` extra; the cluster tests are slow (a cluster and its CLIP actors take
tens of seconds to start on a small machine)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from helpers.ray_cluster import STORE_MB, assert_same_scan, options

from nanodb import NanoDB


@pytest.mark.slow
@pytest.mark.ray
def test_ray_scan_equals_a_local_scan(cluster, scanned_db, photo_tree, tmp_path):
    c, _ = cluster
    path, local_report = scanned_db
    with NanoDB(path, read_only=True) as reference, \
            NanoDB(tmp_path / "db", config="test", batch_size=4, ray=options(c)) as db:
        report = db.scan(photo_tree)
        assert (report.added, report.failed) == (local_report.added, local_report.failed)
        assert sorted(p for p, _ in report.failures) == sorted(p for p, _ in local_report.failures)
        assert_same_scan(db, reference)
        again = db.scan(photo_tree)  # unchanged files are skipped before anything is sent
        assert (again.added, again.updated, again.unchanged) == (0, 0, len(reference))


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_node_killed_mid_scan_loses_and_duplicates_nothing(cluster, scanned_db, photo_tree, tmp_path):
    c, workers = cluster
    path, _ = scanned_db
    doomed = c.add_node(num_cpus=3, object_store_memory=STORE_MB)
    c.wait_for_nodes()
    opts = options(c, clip_actors=3)  # spread: one CLIP actor on each worker node, the doomed one too

    async def scan_and_kill(db: NanoDB):
        task = asyncio.create_task(db.scan_async(photo_tree))
        while not db.active_scans or db.active_scans[0].added < 4:
            await asyncio.sleep(0.02)
        assert db.active_scans[0].added < 40  # killed mid-scan
        await asyncio.to_thread(c.remove_node, doomed, False)
        return await task

    with NanoDB(path, read_only=True) as reference, \
            NanoDB(tmp_path / "db", config="test", batch_size=2, ray=opts) as db:
        report = asyncio.run(scan_and_kill(db))
        assert report.added == len(reference)
        assert_same_scan(db, reference)


def test_without_ray_the_ray_flag_says_how_to_install(tmp_path, monkeypatch, capsys):
    from nanodb.interfaces.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main(["--path", str(tmp_path / "db"), "--config", "test", "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'nanodb[ray]'" in err and len(err.strip().splitlines()) == 1


def test_a_ray_batch_passes_on_every_frame_of_a_video_once():
    """A batch that came back passes on each item of each path sent once: a photo's one item, every
    frame of a video (they used to be cut to the first), nothing of a path not sent."""
    from nanodb.pipeline.ray_ingest import passed_on

    from nanodb.media.record import FileRecord

    def record(path: str, hash: bytes) -> FileRecord:
        return FileRecord(path=path, hash=hash)

    records = [record("/a.jpg", b"a"), record("/v.mp4", b"f1"), record("/v.mp4", b"f2"), record("/a.jpg", b"a"),
               record("/v.mp4", b"f1"), record("/other.jpg", b"o")]
    assert passed_on(["/a.jpg", "/v.mp4"], records) == [0, 1, 2]
