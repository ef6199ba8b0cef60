"""nanodb on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a distributed
scan equals a local one, survives a worker node killed mid-scan, and sharded search equals local
exact search. Needs the `ray` extra; the cluster tests are slow (a cluster and its CLIP actors take
tens of seconds to start on a small machine)."""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import pytest

from nanodb import NanoDB
from nanodb.cluster import RayOptions

STORE_MB = 100 * 2**20


@pytest.fixture(scope="module")
def cluster():
    """A head node that only coordinates (no CPUs) and two 3-CPU worker nodes; torn down after."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never report to the network
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False, object_store_memory=STORE_MB,
        # a killed node is found dead in seconds, not Ray's default half minute
        _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 4}))
    workers = [c.add_node(num_cpus=3, object_store_memory=STORE_MB) for _ in range(2)]
    try:
        ray.init(address=c.address, logging_level="WARNING")
        c.wait_for_nodes()
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def options(c, **kw) -> RayOptions:
    return RayOptions(address=c.address, **{"clip_actors": 2, **kw})


def assert_same_scan(db: NanoDB, reference: NanoDB) -> None:
    """Same count and paths, one row per file (nothing appended twice), same vectors (cosine 0.999)."""
    assert len(db) == len(reference)
    assert db.store.rows == len(db)
    assert sorted(item.path for item in db) == sorted(item.path for item in reference)
    for item in reference:
        mine = db[db.index_of(item.path)]
        cosine = float(mine.vector.astype(np.float32) @ item.vector.astype(np.float32))
        assert cosine > 0.999, item.path


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


@pytest.mark.slow
@pytest.mark.ray
def test_sharded_search_equals_local_exact_search_on_1000_queries(cluster, tmp_path):
    c, _ = cluster
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((3000, 384)).astype(np.float32)
    vectors[1000:1100] = vectors[2900:3000]  # exact ties across shards: the lower index comes first
    with NanoDB(tmp_path / "db", config="test", ray=options(c, shards=3)) as db:
        db.add(vectors)
        db.save()
        queries = np.concatenate([rng.standard_normal((900, 384)), vectors[1000:1100]]).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)

        def check():
            sharded = db.search(queries, k=10)
            with NanoDB(tmp_path / "db", read_only=True) as local:
                expected = local.search(queries, k=10)
            assert [[(r.index, r.similarity) for r in row] for row in sharded] == \
                   [[(r.index, r.similarity) for r in row] for row in expected]

        check()
        db.delete(range(0, 3000, 7))  # the shards follow deletions and appends
        db.add(vectors[:50])
        db.save()
        check()


def test_without_ray_the_ray_flag_says_how_to_install(tmp_path, monkeypatch, capsys):
    from nanodb.interfaces.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert main(["--path", str(tmp_path / "db"), "--config", "test", "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'nanodb[ray]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.ray
def test_sharded_search_filters_and_collapses_like_the_local_searcher(cluster, tmp_path):
    """Filtered and collapsed searches used to leave the shards silently for the local store: now each
    shard keeps the rows the filters allow and copies are collapsed after the exact merge, same results."""
    c, _ = cluster
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((600, 384)).astype(np.float32)
    vectors[400:410] = vectors[5]  # copies of one content, on two shards
    paths = [f"/photos/{'2023' if i % 2 else '2024'}/img{i}.{('jpg', 'png', 'webp')[i % 3]}" for i in range(600)]
    queries = np.concatenate([rng.standard_normal((20, 384)), vectors[[5, 7, 400]]]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    searches = [{"folder": "2023"}, {"types": ["png"]}, {"folder": "/photos/2024", "types": "webp"},
                {"collapse_duplicates": True}, {"folder": "2024", "collapse_duplicates": True, "min_similarity": 0.0}]
    with NanoDB(tmp_path / "db", config="test", ray=options(c, shards=3)) as db:
        db.add(vectors, paths=paths)
        db.delete(range(0, 600, 11))
        db.save()

        def not_here(*args, **kwargs):
            raise AssertionError("searched in this process, not on the shards")

        db.store.index.search = not_here
        with NanoDB(tmp_path / "db", read_only=True) as local:
            for named in searches:
                sharded = db.search(queries, k=10, **named)
                expected = local.search(queries, k=10, **named)
                assert [[(r.index, r.similarity, r.duplicates) for r in row] for row in sharded] == \
                       [[(r.index, r.similarity, r.duplicates) for r in row] for row in expected], named
            collapsed = db.search(vectors[5], k=3, collapse_duplicates=True)[0]
        assert sorted([collapsed.index, *collapsed.duplicates]) == [5, *range(400, 407), 408, 409]  # 407 deleted


@pytest.mark.slow
@pytest.mark.ray
def test_sharded_search_collapses_a_videos_frames_like_the_local_searcher(cluster, tmp_path):
    """A video's frames, spread over the shards, are one result (its best frame) after the merge,
    exactly as in the local searcher (search.local.answer, which the shards' merge reuses)."""
    c, _ = cluster
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((600, 384)).astype(np.float32)
    clip = [i % 6 if i % 3 else None for i in range(600)]  # two rows in three: frames of four videos
    paths = [f"/v/clip{v}.mp4" if v is not None else f"/p/{i}.jpg" for i, v in enumerate(clip)]
    metadata = [{"time": float(i)} if v is not None else None for i, v in enumerate(clip)]
    vectors[[100, 350, 550]] = vectors[1] + 0.01 * rng.standard_normal(384)  # near a frame, on every shard
    queries = np.concatenate([rng.standard_normal((10, 384)), vectors[[1, 2, 350]]]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with NanoDB(tmp_path / "db", config="test", ray=options(c, shards=3)) as db:
        db.add(vectors, paths=paths, metadata=metadata)
        db.save()
        with NanoDB(tmp_path / "db", read_only=True) as local:
            for named in [{}, {"collapse_duplicates": True}, {"folder": "/v"}]:
                sharded = db.search(queries, k=8, **named)
                expected = local.search(queries, k=8, **named)
                assert [[(r.index, r.similarity, r.duplicates) for r in row] for row in sharded] == \
                       [[(r.index, r.similarity, r.duplicates) for r in row] for row in expected], named
                for row in sharded:
                    videos = [r.path for r in row if r.path.endswith(".mp4")]
                    assert len(videos) == len(set(videos)), named
                    assert len(row) == (4 if named.get("folder") else 8), named


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
