"""nanodb on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a distributed
scan into a local database equals a local scan and survives a worker node killed mid-scan (the sharded
database: test_sharded.py). Needs the `ray` extra; the cluster tests are slow (a cluster and its CLIP actors take
tens of seconds to start on a small machine)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import coco_photos
from helpers.hostile_corpus import jpeg_time_bomb
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


@pytest.mark.slow
@pytest.mark.ray
def test_two_concurrent_ray_scans_with_new_files_in_one_finish_20_times_in_a_row(cluster, tmp_path):
    """Two --scan folders are two scans at once: they share one stage (two would hold every CPU of the
    cluster for their CLIP actors, leaving none to decode: the scans waited for ever)."""
    c, _ = cluster
    photos = coco_photos(26)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, some in ((a, photos[:3]), (b, photos[3:6])):
        folder.mkdir()
        for p in some:
            shutil.copy(p, folder)

    async def both(db: NanoDB):
        return await asyncio.wait_for(asyncio.gather(db.scan_async(a), db.scan_async(b)), 120)

    # one CLIP actor of 3 CPUs: the cluster's 6 CPUs hold one stage and its decode tasks, not two stages
    with NanoDB(tmp_path / "db", config="test", batch_size=4, ray=options(c, clip_actors=1, actor_cpus=3)) as db:
        for run in range(20):
            first, second = asyncio.run(both(db))
            assert (first.added, second.added) == ((3, 3) if run == 0 else (0, 1)), run
            shutil.copy(photos[6 + run], b)
        assert len(db) == 6 + 19


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_scan_of_decoder_bombs_ends_within_the_decode_limit(cluster, tmp_path):
    """Progressive-JPEG time bombs (a minute each to decode) are decoded on the cluster under the local
    decode workers' limit: each is skipped as too slow, the photos beside them indexed."""
    c, _ = cluster
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in coco_photos(5):
        shutil.copy(p, folder)
    for i in range(3):
        (folder / f"bomb{i}.jpg").write_bytes(jpeg_time_bomb())

    async def scan(db: NanoDB):
        return await asyncio.wait_for(db.scan_async(folder), 150)

    with NanoDB(tmp_path / "db", config="test", batch_size=4, decode_seconds=2, ray=options(c)) as db:
        report = asyncio.run(scan(db))
        assert report.added == 5
        assert sorted(os.path.basename(p) for p, _ in report.failures) == ["bomb0.jpg", "bomb1.jpg", "bomb2.jpg"]
        assert {reason for _, reason in report.failures} == {"took too long to decode (over 2 s)"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nanodb_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanodb", "--config", "test", *args]


def ray_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_USAGE_STATS_ENABLED": "0", **extra}


@pytest.mark.slow
@pytest.mark.ray
def test_ray_local_starts_its_own_cluster_despite_a_stale_address_file(tmp_path):
    """A Ray killed earlier leaves ray_current_cluster naming its dead address: `--ray local` is a new
    cluster on this machine, never that one (it used to try to join it for ever)."""
    pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{free_port()}")
        folder = tmp_path / "photos"
        folder.mkdir()
        for p in coco_photos(2):
            shutil.copy(p, folder)
        done = subprocess.run(nanodb_command("--path", str(tmp_path / "db"), "--ray", "local", "--scan", str(folder)),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                              env=ray_env(RAY_TMPDIR=temp))
        assert done.returncode == 0, done.stderr
        assert "2 added" in done.stderr
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_joining_a_dead_address_fails_with_one_line_naming_it(tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(nanodb_command("--path", str(tmp_path / "db"), "--ray", address),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=ray_env())
    assert done.returncode == 2
    assert address in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.fixture
def silent_listener():
    """A listening socket that never answers: a join to its address hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s


@pytest.fixture
def silent_address(silent_listener):
    return f"127.0.0.1:{silent_listener.getsockname()[1]}"


@pytest.mark.ray
def test_a_stop_signal_ends_a_hung_join_within_10_s(tmp_path, silent_listener, silent_address):
    pytest.importorskip("ray")
    proc = subprocess.Popen(nanodb_command("--path", str(tmp_path / "db"), "--ray", silent_address),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ray_env())
    try:
        silent_listener.settimeout(30)
        with contextlib.suppress(TimeoutError):  # it connects: joining now (nothing is ever answered)
            silent_listener.accept()[0].close()
        time.sleep(1)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        stderr = proc.communicate()[1]
    assert proc.returncode not in (0, -signal.SIGKILL, 134)
    assert silent_address in stderr and "Traceback" not in stderr


@pytest.mark.ray
def test_the_python_api_gives_up_a_hung_join_naming_the_address(silent_address):
    pytest.importorskip("ray")
    script = f"""
from nanodb.cluster import RayCluster, RayOptions
try:
    RayCluster(RayOptions(address={silent_address!r}, join_timeout_s=3)).connect()
except ValueError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ray_env())
    assert done.stdout.strip() == f"the Ray cluster at {silent_address} did not answer within 3 s"


def test_duplicates_of_a_sharded_database_say_they_are_not_available_not_to_pass_ray(empty_db_path, tmp_path,
                                                                                      capsys):
    """`duplicates` takes no --ray (near-duplicates need a join across shards): its error must not ask for it."""
    from nanodb.interfaces.cli import main
    from nanodb.storage.cluster_manifest import ClusterManifest, ShardLocation, write_cluster_manifest
    from nanodb.storage.format import read_manifest

    root = tmp_path / "sharded"
    write_cluster_manifest(root, ClusterManifest(read_manifest(empty_db_path), [ShardLocation(str(root / "s0"))]))
    assert main(["duplicates", "--path", str(root)]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and "--ray" not in err and len(err.strip().splitlines()) == 1


def test_concurrent_scans_get_one_ray_stage(monkeypatch):
    """Two scans starting at once (two --scan folders) share one stage: a stage each held the CPUs of two
    sets of CLIP actors, and the decode tasks waited for a CPU for ever."""
    import threading

    pytest.importorskip("ray")
    from nanodb.cluster import RayCluster, RayOptions

    cluster = RayCluster(RayOptions(address="local"))
    monkeypatch.setattr(cluster, "resources", lambda: time.sleep(0.2) or {"CPU": 2.0})  # as slow as asking Ray
    stages = []
    threads = [threading.Thread(target=lambda: stages.append(cluster.embed_stage(None, None, 1, 4))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stages[0] is stages[1]


def serve_then_sigterm(db, address: str, folder, before_signal=lambda: None) -> tuple[int, str]:
    """`nanodb --ray ADDRESS --server --scan FOLDER` until its scan is done, then SIGTERM: (exit status, stderr)."""
    command = nanodb_command("--path", str(db), "--ray", address, "--shards", "2", "--server", "--port",
                             str(free_port()), "--scan", str(folder))
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ray_env())
    lines = []
    try:
        while (line := proc.stderr.readline()) and "input ended" not in line:  # served, scanned
            lines.append(line)
        assert line, "".join(lines)
        before_signal()
        proc.send_signal(signal.SIGTERM)
        lines.append(proc.communicate(timeout=120)[1])
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, "".join(lines)


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_to_a_ray_server_saves_and_exits_0(cluster, tmp_path):
    """Ray's driver turns SIGTERM into a stack dump and an abort (exit 134) unless nanodb keeps its own
    handler: the server stops cleanly, saves, ends Ray, exits 0."""
    c, _ = cluster
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in coco_photos(3):
        shutil.copy(p, folder)
    status, stderr = serve_then_sigterm(tmp_path / "db", c.address, folder)
    assert status == 0, stderr
    assert "saved 3 items" in stderr and "SIGTERM received" not in stderr and "Traceback" not in stderr
    with NanoDB(tmp_path / "db", ray=options(c)) as db:
        assert len(db) == 3


@pytest.mark.slow
@pytest.mark.ray
def test_a_shard_folder_removed_under_a_ray_server_is_one_line_at_shutdown_never_an_abort(cluster, tmp_path):
    from nanodb.media.record import content_hash
    from nanodb.search.shard import shard_of

    c, _ = cluster
    folder = tmp_path / "photos"
    folder.mkdir()
    by_shard = [[p for p in coco_photos(16) if shard_of(bytes(content_hash(p.read_bytes())), 2) == n] for n in (0, 1)]
    for p in by_shard[0][:2] + by_shard[1][:1]:  # unsaved items on the shard whose folder goes
        shutil.copy(p, folder)
    status, stderr = serve_then_sigterm(tmp_path / "db", c.address, folder,
                                        lambda: shutil.rmtree(tmp_path / "db" / "shard-001"))
    assert status not in (0, 134, -signal.SIGABRT), stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "shard-001" in errors[0], stderr
