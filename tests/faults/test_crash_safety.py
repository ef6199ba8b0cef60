"""kill -9 during scans with autosave and inside saves: the database always opens, holds exactly the
items of the last completed save (vectors and paths aligned, vectors faithful to their files), and a
rescan catches up."""

from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest
from helpers.killharness import (
    assert_faithful,
    image_folder,
    kill_after,
    live_paths,
    run_script_until_killed,
    run_to_end,
    write_config,
)

from nanodb.database import NanoDB
from nanodb.storage.format import MANIFEST, read_manifest


def check_after_kill(db_path, run, folder_files, rng) -> int:
    """The database opens and holds exactly the last completed save (or the one in flight, if the kill
    landed after its commit point); returns its row count."""
    completed, in_flight = run.saves()
    if read_manifest(db_path) is None:  # killed before the new database's first commit
        assert not completed, run.log[-2000:]
        return 0
    with NanoDB(db_path, read_only=True) as db:
        allowed = {completed[-1] if completed else db.store.manifest.count} | ({in_flight} if in_flight else set())
        assert db.store.rows in allowed, f"holds {db.store.rows} rows; saves logged: {completed}, {in_flight}"
        paths = live_paths(db)
        assert len(paths) == len(set(paths)), "a file is indexed twice"
        assert set(paths) <= set(folder_files), "an item's path is not a scanned file"
        assert np.allclose(np.linalg.norm(db.vectors.astype(np.float32), axis=1), 1, atol=1e-2)
        assert_faithful(db, rng.sample(paths, min(3, len(paths))))
        return db.store.rows


def kill_trials(tmp_path, trials: int, images: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    folder_files = image_folder(tmp_path / "photos", images)
    config = write_config(tmp_path / "crash.yaml", autosave_every=4, follow_symlinks=True)  # links to shared photos
    db_path = tmp_path / "db"
    args = ["--path", str(db_path), "--config", str(config), "--scan", str(tmp_path / "photos"), "--autosave"]
    outcomes = []
    for trial in range(trials):
        # Most kills land while scanning and saving; some while starting up or creating the database.
        if trial % 4 == 3:
            run = kill_after(args, tmp_path / f"run{trial}.log", rng.uniform(0.5, 8.0))
        else:
            run = kill_after(args, tmp_path / f"run{trial}.log", rng.uniform(0, 2.0),
                             after_line="nanodb.storage.store: saving")
        rows = check_after_kill(db_path, run, folder_files, rng)
        assert run.orphans == 0, "a decode worker outlived its killed scan"
        in_flight = run.saves()[1]
        during = f" inside the save of {in_flight} rows" if in_flight else ""
        outcomes.append(f"trial {trial}: {'killed' if run.killed else 'finished'}{during}, {rows} rows committed")
    final = run_to_end(args, tmp_path / "rescan.log")
    assert final.returncode == 0, final.log[-3000:]
    with NanoDB(db_path, read_only=True) as db:
        assert sorted(live_paths(db)) == sorted(folder_files), "the rescan did not catch up"
        assert_faithful(db, rng.sample(folder_files, 5))
    print("\n".join(outcomes))
    return outcomes


@pytest.mark.timeout(300)
def test_kill_during_autosaving_scans_then_rescan_catches_up(tmp_path):
    kill_trials(tmp_path, trials=2, images=48, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_during_autosaving_scans_20_trials(tmp_path):
    outcomes = kill_trials(tmp_path, trials=20, images=400, seed=2)
    assert sum("killed" in o for o in outcomes) >= 15, outcomes


# Each step of a save at which the child kills itself: before/after each data file is appended, with
# the new manifest written but not yet renamed into place, and right after the rename.
SAVE_STEPS = [f"write{i}" for i in range(5)] + ["before_replace", "after_replace"]

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
    db.add(rng.standard_normal((7, db.dim)), metadata={"batch": 2}, paths=[f"/b/{i}" for i in range(7)])
    db.delete([3])
    kill_at(sys.argv[2])
    db.save()
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("step", SAVE_STEPS)
def test_kill_inside_a_save_keeps_the_last_completed_save(tmp_path, empty_db_path, step):
    db_path = tmp_path / "db"
    run_script_until_killed(CHILD, empty_db_path, db_path, step)
    rng = np.random.default_rng(7)
    first, second = rng.standard_normal((10, 384)), rng.standard_normal((7, 384))
    committed = step == "after_replace"
    with NanoDB(db_path) as db:  # opens for writing too: the dead process's lock is gone
        expected = np.vstack([first, second]) if committed else first
        expected /= np.linalg.norm(expected, axis=1, keepdims=True)
        assert db.store.rows == len(expected)
        assert np.allclose(db.vectors.astype(np.float32), expected, atol=2e-3)
        assert [db.path_of(i) for i in range(db.store.rows)] == [f"/a/{i}" for i in range(10)] + (
            [f"/b/{i}" for i in range(7)] if committed else [])
        assert db[3].deleted == committed
        assert db[0].metadata == {"batch": 1}
        # The next save overwrites whatever the killed save left past the committed lengths.
        db.add(np.ones((2, db.dim)), paths=["/c/0", "/c/1"])
        db.save()
    with NanoDB(db_path, read_only=True) as db:
        assert db.path_of(db.store.rows - 1) == "/c/1"
        assert (db_path / MANIFEST).exists()
