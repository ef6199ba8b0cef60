"""A sharded database on a real multi-node Ray cluster (ray.cluster_utils.Cluster on this machine): its
items live in shard actors, each owning a store folder; it scans, searches, filters, collapses,
validates, reopens and survives lost nodes exactly as one local store would."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers.ray_cluster import STORE_MB, assert_same_scan, options

from nanodb import NanoDB
from nanodb.media.record import content_hash
from nanodb.search.local import LocalSearcher
from nanodb.search.request import Filters, SearchRequest
from nanodb.search.sharded import ShardedSearcher, ShardedStore
from nanodb.storage.format import DatabaseError

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def row_key(r) -> tuple:
    """A result as comparable across two databases whose item numbers differ: what it is and how similar."""
    return r.path, (r.metadata or {}).get("time"), round(r.similarity, 6)


def same_results(sharded, local, sharded_db, local_db) -> None:
    """The same items in the same order with the same similarities, and the same copies collapsed."""
    assert [[row_key(r) for r in row] for row in sharded] == [[row_key(r) for r in row] for row in local]
    for srow, lrow in zip(sharded, local):
        for mine, theirs in zip(srow, lrow):
            assert sorted(map(sharded_db.path_of, mine.duplicates)) == sorted(map(local_db.path_of, theirs.duplicates))


def random_vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)


def saved_sharded(path, c, vectors, shards: int, folder: str) -> NanoDB:
    """A sharded database of `vectors`, labelled FOLDER/i.jpg, saved, open."""
    db = NanoDB(path, config="test", ray=options(c, shards=shards))
    db.add(vectors, paths=[f"{folder}/{i}.jpg" for i in range(len(vectors))])
    db.save()
    return db


def twin_databases(tmp_path, c, vectors, paths, metadata=None, deleted=()):
    """The same items added to a 3-shard database and to a local one, the `deleted` paths deleted."""
    sharded = NanoDB(tmp_path / "sharded", config="test", ray=options(c, shards=3))
    local = NanoDB(tmp_path / "local", config="test")
    for db in (sharded, local):
        for lo in range(0, len(vectors), 500):  # in batches, as a pipeline would add them
            db.add(vectors[lo:lo + 500], paths=paths[lo:lo + 500],
                   metadata=None if metadata is None else metadata[lo:lo + 500])
        db.delete([db.index_of(p) for p in deleted])
        db.save()
    return sharded, local


def test_a_sharded_scan_equals_a_local_scan_and_the_coordinator_holds_no_items(cluster, scanned_db, photo_tree,
                                                                                  tmp_path):
    c, _ = cluster
    path, local_report = scanned_db
    with NanoDB(path, read_only=True) as reference:
        with NanoDB(tmp_path / "db", config="test", batch_size=4, ray=options(c, shards=3)) as db:
            assert isinstance(db.store, ShardedStore)
            report = db.scan(photo_tree)
            assert (report.added, report.failed) == (local_report.added, local_report.failed)
            assert_same_scan(db, reference)
            db.save()
            again = db.scan(photo_tree)  # the shards tell which files are unchanged
            assert (again.added, again.updated, again.unchanged) == (0, 0, len(reference))
            # files that failed to decode are remembered on the shards (only the broken link fails again)
            assert (again.failed_before, again.failed) == (local_report.failed - 1, 1)
        # the folder holds the cluster manifest and the shards' store folders, nothing per item
        assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["cluster.json", "shard-000", "shard-001",
                                                                      "shard-002"]
        counts = [json.loads((tmp_path / "db" / f"shard-{s:03d}" / "nanodb.json").read_text())["count"]
                  for s in range(3)]
        assert sum(counts) == len(reference) and min(counts) > 0  # spread by content hash
        with NanoDB(tmp_path / "db", ray=options(c)) as reopened:  # reconnects the shards
            assert_same_scan(reopened, reference)
            assert reopened.validate().ok
            first = next(iter(reference))
            hit = reopened.search(first.vector.astype(np.float32), k=1)[0]
            assert hit.path == first.path and hit.similarity > 0.999
            assert reopened.search(f"#{hit.index}", k=1)[0].index == hit.index  # an item as the query


def test_sharded_search_equals_local_search_on_1000_queries_with_each_filter_and_collapsed(cluster, tmp_path):
    c, _ = cluster
    rng = np.random.default_rng(7)
    n = 3000
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    vectors[1000:1100] = vectors[2900:3000]  # identical content: one shard, ties to the lower index
    vectors[400:410] = vectors[5]
    paths = [f"/photos/{'2023' if i % 2 else '2024'}/img{i}.{('jpg', 'png', 'webp')[i % 3]}" for i in range(n)]
    queries = np.concatenate([rng.standard_normal((900, 384)), vectors[1000:1100]]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sharded, local = twin_databases(tmp_path, c, vectors, paths, deleted=paths[::11])
    searches = [{}, {"folder": "2023"}, {"types": ["png"]}, {"folder": "/photos/2024", "types": "webp"},
                {"collapse_duplicates": True}, {"min_similarity": 0.05},
                {"folder": "2024", "collapse_duplicates": True, "min_similarity": 0.0}]
    with sharded, local:
        for named in searches:
            same_results(sharded.search(queries, k=10, **named), local.search(queries, k=10, **named), sharded, local)
        collapsed = sharded.search(vectors[5], k=3, collapse_duplicates=True)[0]
        assert sorted(sharded.path_of(i) for i in [collapsed.index, *collapsed.duplicates]) == \
            sorted(paths[i] for i in [5, *range(400, 410)] if i % 11)
        assert len(sharded) == len(local) and sharded.validate().ok


def test_sharded_search_collapses_a_videos_frames_like_the_local_searcher(cluster, tmp_path):
    """A video's frames go to one shard (routed by the video's path) and are one result, its best frame."""
    c, _ = cluster
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((600, 384)).astype(np.float32)
    clip = [i % 6 if i % 3 else None for i in range(600)]  # two rows in three: frames of four videos
    paths = [f"/v/clip{v}.mp4" if v is not None else f"/p/{i}.jpg" for i, v in enumerate(clip)]
    metadata = [{"time": float(i)} if v is not None else None for i, v in enumerate(clip)]
    queries = np.concatenate([rng.standard_normal((10, 384)), vectors[[1, 2, 350]]]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sharded, local = twin_databases(tmp_path, c, vectors, paths, metadata)
    with sharded, local:
        for named in [{}, {"collapse_duplicates": True}, {"folder": "/v"}]:
            results = sharded.search(queries, k=8, **named)
            same_results(results, local.search(queries, k=8, **named), sharded, local)
            for row in results:
                videos = [r.path for r in row if r.path.endswith(".mp4")]
                assert len(videos) == len(set(videos)) and len(row) == (4 if named.get("folder") else 8), named


def test_requests_searched_together_on_shards_get_their_lone_results(cluster, tmp_path):
    """The query batcher's pass on a sharded database (search_each): every shard answers all the requests in
    one call, each with its own k, filters, minimum similarity and collapse, merged as each alone; a bad
    filter fails its own request only."""
    c, _ = cluster
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((900, 384)).astype(np.float32)
    vectors[300:320] = vectors[7]  # copies: one shard
    paths = [f"/photos/{'2023' if i % 2 else '2024'}/img{i}.{('jpg', 'png')[i % 2]}" for i in range(900)]
    queries = np.concatenate([rng.standard_normal((11, 384)), vectors[[7]]]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    filters = [Filters(folder="2023"), Filters(since="not a date"), Filters(types=["jpg"]), Filters(folder="/photos")]
    requests = [SearchRequest(q, k=1 + 3 * j, filters=filters[j % 4], collapse=j % 3 == 2,
                              min_similarity=0.1 if j % 5 == 2 else None, vectors=q[None])
                for j, q in enumerate(queries)]  # the last: item 7's copies, collapsed
    sharded, local = twin_databases(tmp_path, c, vectors, paths)
    with sharded, local:
        together = ShardedSearcher(sharded.store).search_each(requests)
        for request, answer in zip(requests, together):
            if request.filters.since is not None:
                assert "not a date" in str(answer)
                continue
            same_results(answer, LocalSearcher(local.store).search(request), sharded, local)
            same_results(answer, ShardedSearcher(sharded.store).search(request), sharded, sharded)
        assert len(together[-1][0][0].duplicates) == 20


def test_deletes_moves_and_forgets_reach_the_shards_that_hold_the_items(cluster, tmp_path):
    c, _ = cluster
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((300, 384)).astype(np.float32)
    paths = [f"/a/{i}.jpg" for i in range(300)]
    sharded, local = twin_databases(tmp_path, c, vectors, paths)
    with sharded, local:
        for db in (sharded, local):
            assert db.store.move_folder("/a", "/b") == 300
            assert db.forget(["/b/7.jpg", "/b/8.jpg"]) == 2
            db.delete([db.index_of("/b/9.jpg")])
            db.store.remember_failure("/b/10.jpg", 1, 1.0, "cut short")  # changed, unreadable now: stale
            db.save()
        assert sorted(i.path for i in sharded) == sorted(i.path for i in local)
        assert "/b/10.jpg" not in {i.path for i in sharded}
        same_results(sharded.search(vectors[:20], k=5), local.search(vectors[:20], k=5), sharded, local)


def test_a_node_killed_mid_scan_and_mid_search_then_everything_is_exact(cluster, scanned_db, photo_tree, tmp_path):
    """Shard folders on shared storage: a dead node's shards restart on another node and reload their
    folders; the rescan catches up what they had not saved, nothing indexed twice."""
    c, _ = cluster
    path, _ = scanned_db
    doomed = c.add_node(num_cpus=3, object_store_memory=STORE_MB)
    c.wait_for_nodes()

    async def scan_and_kill(db: NanoDB):
        task = asyncio.create_task(db.scan_async(photo_tree))
        while not db.active_scans or db.active_scans[0].added < 6:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(c.remove_node, doomed, False)
        return await task

    with NanoDB(path, read_only=True) as reference, \
            NanoDB(tmp_path / "db", config="test", batch_size=2, autosave=True,
                   ray=options(c, shards=3, clip_actors=3)) as db:
        db.settings.autosave_every = 8
        asyncio.run(scan_and_kill(db))
        db.scan(photo_tree)  # catches up what a restarted shard had not saved
        assert_same_scan(db, reference)
        queries = np.stack([i.vector for i in reference]).astype(np.float32)
        expected = [[r.path for r in row] for row in reference.search(queries, k=5)]
        doomed = c.add_node(num_cpus=3, object_store_memory=STORE_MB)
        c.wait_for_nodes()
        db.save()
        for i in range(6):
            if i == 2:
                c.remove_node(doomed, False)  # between searches: the next ones wait for the restarts
            assert [[r.path for r in row] for row in db.search(queries, k=5)] == expected


def test_reopen_after_the_coordinator_is_killed_keeps_what_the_shards_saved(cluster, tmp_path):
    c, _ = cluster
    script = f"""
import numpy as np, sys, time
from nanodb import NanoDB
from nanodb.cluster import RayOptions
db = NanoDB({str(tmp_path / 'db')!r}, config="test", ray=RayOptions(address={c.address!r}, shards=3))
v = np.random.default_rng(1).standard_normal((500, 384)).astype(np.float32)
db.add(v[:300], paths=[f"/s/{{i}}" for i in range(300)])
db.save()
db.add(v[300:], paths=[f"/u/{{i}}" for i in range(200)])  # never saved
print("ready", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":  # Ray's own lines come first
            pass
        assert line.strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 60
    while True:  # the dead driver's shard actors are ended by Ray, which releases their folders
        try:
            db = NanoDB(tmp_path / "db", ray=options(c))
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    with db:
        assert sorted(i.path for i in db) == sorted(f"/s/{i}" for i in range(300))
        v = np.random.default_rng(1).standard_normal((300, 384)).astype(np.float32)
        assert [row[0].path for row in db.search(v[:5], k=1)] == [f"/s/{i}" for i in range(5)]


def test_a_damaged_shard_is_refused_with_the_repair_hint_and_repair_mends_it(cluster, tmp_path):
    c, _ = cluster
    saved_sharded(tmp_path / "db", c, random_vectors(200, 4), 2, "/x").close()
    vectors_file = next((tmp_path / "db" / "shard-001").glob("vectors.*.f16"))
    with open(vectors_file, "r+b") as f:  # a torn write: the last item's vector is cut short
        f.truncate(vectors_file.stat().st_size - 100)
    with pytest.raises(DatabaseError, match="--repair") as refused:
        NanoDB(tmp_path / "db", ray=options(c))
    assert "shard-001" in str(refused.value) and "\n" not in str(refused.value)  # one line, naming the shard
    report = NanoDB.repair(tmp_path / "db")
    assert report.committed == 200 and report.kept == 199
    with NanoDB(tmp_path / "db", ray=options(c)) as db:
        assert len(db) == 199 and db.validate().ok


def test_a_shard_whose_folder_is_lost_with_its_node_is_named_in_a_one_line_error(cluster, tmp_path):
    """A shard on a node's own disk cannot come back elsewhere: searches answer which shard is missing."""
    import ray

    c, workers = cluster
    vectors = random_vectors(300, 6)
    with saved_sharded(tmp_path / "db", c, vectors, 3, "/y") as db:
        nodes = ray.get([a.node.remote() for a in db.store.actors])
        by_id = {n.node_id: n for n in c.list_all_nodes() if n is not c.head_node}
        lost = next(s for s, n in enumerate(nodes) if n in by_id)
        folder = tmp_path / "db" / f"shard-{lost:03d}"
        folder.rename(tmp_path / "elsewhere")  # the disk goes with the node
        c.remove_node(by_id[nodes[lost]], False)
        workers[workers.index(by_id[nodes[lost]])] = c.add_node(num_cpus=3, object_store_memory=STORE_MB)
        with pytest.raises(DatabaseError, match=f"shard-{lost:03d}") as missing:
            db.search(vectors[0], k=3)
        assert "\n" not in str(missing.value)


def test_the_http_api_serves_a_sharded_database(cluster, tmp_path):
    """The server is a thin layer over NanoDB: searches, items, thumbnails and stats work on the shards."""
    import shutil

    import httpx
    from helpers import coco_photos

    from nanodb.interfaces.server import start_server

    c, _ = cluster
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in coco_photos(10):
        shutil.copy(src, photos / src.name)
    with NanoDB(tmp_path / "db", config="test", ray=options(c, shards=3)) as db:
        db.scan(photos)
        db.save()
        server = start_server(db, "127.0.0.1", 0)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                found = client.get("/api/search/text", params={"q": "a dog on a beach", "k": 5}).json()["results"]
                assert [r["path"] for r in found] == [r.path for r in db.search(text="a dog on a beach", k=5)]
                top = found[0]["index"]
                assert client.get(f"/api/items/{top}/thumbnail").headers["content-type"] == "image/jpeg"
                assert client.get(f"/api/items/{top}/original").content == (photos / found[0]["path"].split("/")[-1]
                                                                            ).read_bytes()
                assert client.get("/api/stats").json()["items"] == 10
                same = client.get(f"/api/search/item/{top}", params={"k": 1}).json()["results"]
                assert same[0]["index"] == top
                not_yet = client.get("/api/duplicates")  # not sharded yet: said so
                assert not_yet.status_code == 501 and "sharded" in not_yet.json()["error"]
        finally:
            server.stop()


def test_a_watch_keeps_a_sharded_database_in_step_with_its_folder(cluster, tmp_path):
    """New, renamed, modified (its new content may land on another shard) and deleted files: each path
    is in the database once, as in the folder."""
    import shutil

    from helpers import coco_photos
    from helpers.background import BackgroundService, wait_for

    c, _ = cluster
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = coco_photos(12)
    for src in sources[:4]:
        shutil.copy(src, photos / src.name)
    db = NanoDB(tmp_path / "db", config="test", autosave=True, ray=options(c, shards=3))
    bg = BackgroundService(db, [photos])

    def in_step() -> bool:
        paths = bg.query(lambda: [i.path for i in db])
        return len(paths) == len(set(paths)) and set(paths) == {str(p) for p in photos.glob("*.jpg")}

    def holds(path, digest: str) -> bool:
        return bg.query(lambda: (i := db.index_of(path)) is not None and db[i].hash == digest)

    try:
        assert bg.ready.wait(180), "the first scan of the watched folder did not finish"
        assert in_step()
        shutil.copy(sources[4], photos / "new.jpg")
        wait_for(in_step, 60, "a new image")
        (photos / "new.jpg").rename(photos / "renamed.jpg")
        wait_for(in_step, 60, "a renamed image")
        for src in sources[5:9]:  # modified in place: new content, routed anew
            shutil.copy(src, photos / "renamed.jpg")
            wait_for(functools.partial(holds, photos / "renamed.jpg", content_hash(src.read_bytes()).hex()), 60,
                     "a modified image")
            assert in_step()
        (photos / sources[0].name).unlink()
        wait_for(in_step, 60, "a deleted image")
    finally:
        bg.stop()
        db.save()
        db.close()


def test_a_shard_actor_killed_mid_scan_loses_nothing_the_scan_counted(cluster, scanned_db, photo_tree, tmp_path):
    """The shard's appends it had not saved die with it; the coordinator sends them again to the restarted
    actor, so every item the scan reports as added is in the database when it ends, with no rescan."""
    import ray

    c, _ = cluster
    path, _ = scanned_db

    async def scan_and_kill(db: NanoDB):
        task = asyncio.create_task(db.scan_async(photo_tree))
        while not db.active_scans or db.active_scans[0].added < 8:
            await asyncio.sleep(0.02)
        assert db.active_scans[0].added < 30  # killed mid-scan
        ray.kill(db.store.actors[0], no_restart=False)  # as kill -9 of its process: Ray restarts it
        return await task

    with NanoDB(path, read_only=True) as reference, \
            NanoDB(tmp_path / "db", config="test", batch_size=2, ray=options(c, shards=3)) as db:
        report = asyncio.run(scan_and_kill(db))
        assert report.added == len(reference)
        assert_same_scan(db, reference)
        db.save()
        expected = sorted(i.path for i in reference)
    with NanoDB(tmp_path / "db", ray=options(c)) as reopened:  # and saved
        assert sorted(i.path for i in reopened) == expected


def test_a_restarted_shard_with_more_unsaved_items_than_kept_is_a_one_line_error(cluster, tmp_path, monkeypatch):
    """Past JOURNAL_MAX_ITEMS the coordinator cannot send a restarted shard what it lost: it says so, once,
    instead of carrying on without those items."""
    import ray

    from nanodb.search import sharded

    c, _ = cluster
    monkeypatch.setattr(sharded, "JOURNAL_MAX_ITEMS", 50)
    with NanoDB(tmp_path / "db", config="test", ray=options(c, shards=1)) as db:
        db.add(random_vectors(40, 7), paths=[f"/k/{i}.jpg" for i in range(40)])
        db.save()
        db.add(random_vectors(60, 8), paths=[f"/u/{i}.jpg" for i in range(60)])  # more than it keeps
        actor = db.store.actors[0]
        before = ray.get(actor.call.remote(None, "info"))[0]
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 120
        while True:  # the kill is asynchronous: the next write must reach the restarted instance
            with contextlib.suppress(ray.exceptions.RayActorError):
                if ray.get(actor.call.remote(None, "info"), timeout=30)[0] != before:
                    break
            assert time.monotonic() < deadline, "the shard actor was not restarted"
            time.sleep(0.2)
        with pytest.raises(DatabaseError, match="shard 0 .*restarted and lost") as lost:
            db.add(random_vectors(1, 9), paths=["/after.jpg"])
        assert "\n" not in str(lost.value)
        db.add(random_vectors(1, 9), paths=["/after.jpg"])  # said once: the shard goes on with what it saved
        assert len(db) == 41
