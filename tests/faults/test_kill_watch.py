"""kill -9 during watch churn and during compaction: the database always opens, holds exactly the items
of the last completed save (or compaction), its vectors match their files, and a restart with --watch
catches up with the folder."""

from __future__ import annotations

import random
import signal
import textwrap
import time

import numpy as np
import pytest
from helpers.churn import FolderChurn, check_caught_up, check_committed, source_photos
from helpers.killharness import kill_after, run_script_until_killed, start, write_config

from nanodb.database import NanoDB
from nanodb.storage.format import DATA_FILES

WATCH_SETTINGS = dict(autosave_every=8, autosave_seconds=1, settle_seconds=0.3,
                      compact_dead_fraction=0.05)  # compact at almost every save: deletes and renames leave dead rows


def restart_catches_up(args: list[str], log_path, churn: FolderChurn, rng: random.Random) -> None:
    """Start the watch again with a still folder: once its first scan is done, the index is the folder."""
    proc = start(args, log_path)
    try:
        deadline = time.monotonic() + 240
        while "scanned " not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()[-3000:]
    finally:
        proc.kill()
    check_caught_up(args[1], churn, rng)


def kill_during_watch_churn(tmp_path, trials: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    churn = FolderChurn(tmp_path / "watched", source_photos(96), seed, initial=20)
    config = write_config(tmp_path / "watch.yaml", **WATCH_SETTINGS)
    db_path = tmp_path / "db"
    args = ["--path", str(db_path), "--config", str(config), "--watch", str(churn.folder)]
    committed, outcomes, compactions = None, [], 0
    for trial in range(trials):
        # In turn: right after a compaction starts, during the churn after a save starts, at any moment.
        after, delay = [("nanodb.storage.store: compacting", rng.uniform(0, 0.02)),
                        ("nanodb.storage.store: saving", rng.uniform(0, 4.0)),
                        (None, rng.uniform(1.0, 15.0))][trial % 3]
        churn.start(every=0.15)
        try:
            run = kill_after(args, tmp_path / f"run{trial}.log", delay, after_line=after, give_up_s=240)
        finally:
            churn.stop()
        assert run.killed, f"the watch ended by itself: {run.log[-3000:]}"
        assert run.orphans == 0, "a decode worker outlived its killed watch"
        committed = check_committed(db_path, run, committed, churn, rng)
        compactions += run.log.count("nanodb.storage.store: compacted ")
        in_flight = run.saves()[1]
        during = f" inside a commit of {in_flight} rows" if in_flight is not None else ""
        outcomes.append(f"trial {trial}: killed{during}, {committed} rows committed, "
                        f"{len(run.saves()[0])} commits in this run")
    restart_catches_up(args, tmp_path / "restart.log", churn, rng)
    print("\n".join(outcomes), f"\nchurn: {churn.counts}, {compactions} compactions")
    assert compactions > 0, "no compaction ran: the test did not test it"
    return outcomes


@pytest.mark.slow  # random kill timings; one CI run found a stale vector after the restart (open bug)
@pytest.mark.timeout(400)
def test_kill_during_watch_churn_and_compaction_then_restart_catches_up(tmp_path):
    kill_during_watch_churn(tmp_path, trials=2, seed=11)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_kill_during_watch_churn_and_compaction_20_trials(tmp_path):
    kill_during_watch_churn(tmp_path, trials=21, seed=12)


# ---------------------------------------------------------------------------------------- compaction
# Each step of a compaction at which the child kills itself: half-way through each new data file,
# with the new manifest written but not renamed into place, right after the rename, and while the old
# generation's files are being removed.
COMPACTION_STEPS = [f"write{i}" for i in range(5)] + ["before_replace", "after_replace", "removing_old"]

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nanodb.database import NanoDB
    from helpers.killharness import kill_at

    db = NanoDB(sys.argv[1])
    rng = np.random.default_rng(7)
    db.add(rng.standard_normal((10, db.dim)), metadata={"batch": 1}, paths=[f"/a/{i}" for i in range(10)])
    db.save()
    db.add(rng.standard_normal((4, db.dim)), metadata={"batch": 2}, paths=[f"/b/{i}" for i in range(4)])
    db.delete(range(6))  # 6 of 14 rows dead: the next save compacts
    kill_at(sys.argv[2])
    db.save()
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("step", COMPACTION_STEPS)
def test_kill_inside_a_compaction_keeps_the_last_completed_save(tmp_path, empty_db_path, step):
    db_path = tmp_path / "db"
    run_script_until_killed(CHILD, empty_db_path, db_path, step)
    rng = np.random.default_rng(7)
    first, second = rng.standard_normal((10, 384)), rng.standard_normal((4, 384))
    compacted = step in ("after_replace", "removing_old")
    expected = np.vstack([first[6:], second]) if compacted else first
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    paths = [f"/a/{i}" for i in range(6 if compacted else 0, 10)] + [f"/b/{i}" for i in range(4 if compacted else 0)]
    with NanoDB(db_path) as db:  # opens for writing: the dead process's lock is gone
        assert db.store.rows == len(expected) and not (db.store.rows != len(db))
        assert np.allclose(db.vectors.astype(np.float32), expected, atol=2e-3)
        assert [db.path_of(i) for i in range(db.store.rows)] == paths
        assert db.validate().ok
        generation = db.store.manifest.generation
        assert generation == (1 if compacted else 0)
        db.add(np.ones((2, db.dim)), paths=["/c/0", "/c/1"])  # the next save works on top of it
        db.save()
    leftovers = [f.name for kind in DATA_FILES for f in db_path.glob(f"{kind}.*.*") if f".{generation}." not in f.name]
    assert not leftovers, f"files of another generation were left behind: {leftovers}"
    with NanoDB(db_path, read_only=True) as db:
        assert [db.path_of(i) for i in range(db.store.rows)] == paths + ["/c/0", "/c/1"]


def test_a_save_of_deletions_alone_and_a_compaction_to_nothing(tmp_path):
    """Found by the watch kill tests: a save with deletions but no new rows failed (an empty 2-D
    array cannot be viewed as bytes), so a watched folder's deletions stayed unsaved."""
    rng = np.random.default_rng(0)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.add(rng.standard_normal((10, db.dim)), paths=[f"/a/{i}" for i in range(10)])
        db.save()
        db.delete([0])  # 1 of 10 dead: below the compaction threshold, a plain save
        assert db.save()
    with NanoDB(tmp_path / "db", config="test") as db:
        assert db[0].deleted and len(db) == 9
        db.delete(range(1, 10))  # every row dead: compacted to an empty database
        assert db.save()
    with NanoDB(tmp_path / "db", config="test") as db:
        assert len(db) == db.store.rows == 0
