"""A watched folder under continuous churn, and the checks that a database kept up with it.

`FolderChurn` adds, deletes, renames and modifies real photos (copies: the sources are read-only)
and remembers every content each path ever had, so that a database killed at any moment can be
checked against what the folder held at some point: `check_committed` after a kill, `check_caught_up`
once the churn has stopped and the watcher or a rescan had time to see it.
"""

from __future__ import annotations

import random
import shutil
import threading
from pathlib import Path

import numpy as np

from helpers import PHOTOS, coco_photos, data_dir
from helpers.killharness import KilledRun, live_paths

ACTIONS = ("add", "delete", "rename", "modify")


def source_photos(count: int) -> list[Path]:
    """The repository's photos; more than it holds come from the optional shared COCO set (or skip)."""
    if count <= len(list(PHOTOS.glob("*.jpg"))):
        return coco_photos(count)
    return sorted(data_dir("coco-val2017/images").glob("*.jpg"))[:count]


class FolderChurn:
    def __init__(self, folder: Path, sources: list[Path], seed: int, initial: int, keep_between=(10, 40)):
        self.folder, self.sources, self.rng = folder, sources, random.Random(seed)
        self.low, self.high = keep_between
        self.versions: dict[str, list[Path]] = {}  # path -> every source photo it ever held
        self.counts = dict.fromkeys(ACTIONS, 0)
        self.serial = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(initial):
            self.add()

    def files(self) -> list[Path]:
        return sorted(self.folder.rglob("*.jpg"))

    def _write(self, path: Path, in_place: bool) -> None:
        """Copy a random photo to `path`: in place (as `cp` does), or to a hidden file renamed over it
        (as editors and downloaders do)."""
        src = self.rng.choice(self.sources)
        self.versions.setdefault(str(path), []).append(src)
        if in_place:
            shutil.copyfile(src, path)
        else:
            tmp = path.with_name("." + path.name + ".part")
            shutil.copyfile(src, tmp)
            tmp.replace(path)

    # ------------------------------------------------------------------ actions
    def add(self) -> None:
        self.serial += 1
        sub = self.folder / ("" if self.serial % 3 else f"d{self.serial % 4}")
        sub.mkdir(exist_ok=True)
        self._write(sub / f"p{self.serial:05d} {'é' if self.serial % 5 == 0 else ''}.jpg", self.serial % 2 == 0)
        self.counts["add"] += 1

    def delete(self) -> None:
        self.rng.choice(self.files()).unlink()
        self.counts["delete"] += 1

    def rename(self) -> None:
        old = self.rng.choice(self.files())
        self.serial += 1
        new = old.with_name(f"r{self.serial:05d}-{old.name}"[:80])
        old.rename(new)
        self.versions.setdefault(str(new), []).extend(self.versions[str(old)][-1:])
        self.counts["rename"] += 1

    def modify(self) -> None:
        self._write(self.rng.choice(self.files()), self.rng.random() < 0.5)
        self.counts["modify"] += 1

    def step(self) -> None:
        """One random change; adds and deletes keep the folder between its bounds."""
        n = len(self.files())
        action = "add" if n <= self.low else "delete" if n >= self.high else self.rng.choice(ACTIONS)
        getattr(self, action)()

    @property
    def operations(self) -> int:
        return sum(self.counts.values())

    # ------------------------------------------------------------------ in the background
    def start(self, every: float = 0.2) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(self.rng.uniform(0, 2 * every)):
            self.step()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def assert_vectors_match_some_version(db, paths: list[str], versions: dict[str, list[Path]],
                                      min_cosine: float = 0.999) -> None:
    """Each stored vector is the model's embedding of one of the contents its path ever held."""
    from PIL import Image

    for p in paths:
        stored = db.vectors[db.index_of(p)].astype(np.float32)
        candidates = list(dict.fromkeys(versions[p]))
        best = max(float(stored @ db.model.encode_images([Image.open(src)])[0]) for src in candidates)
        assert best >= min_cosine, f"{p}: stored vector has cosine {best:.4f} with every content it ever had"


def check_committed(db_path: Path, run: KilledRun, committed_before: int | None, churn: FolderChurn,
                    rng: random.Random, sample: int = 3) -> int:
    """After a kill: the database opens and holds exactly the last completed save (or the one in flight,
    if the kill landed after its commit point), with no path twice and faithful vectors. Its row count."""
    from nanodb.database import NanoDB

    completed, in_flight = run.saves()
    with NanoDB(db_path, read_only=True) as db:
        last = completed[-1] if completed else committed_before
        allowed = ({last} if last is not None else set()) | ({in_flight} if in_flight is not None else set())
        assert not allowed or db.store.rows in allowed, (
            f"holds {db.store.rows} rows; before this run {committed_before}, saves logged {completed}, "
            f"in flight {in_flight}")
        paths = live_paths(db)
        assert len(paths) == len(set(paths)), "a file is indexed twice"
        assert set(paths) <= set(churn.versions), "an item's path was never in the folder"
        assert_vectors_match_some_version(db, rng.sample(paths, min(sample, len(paths))), churn.versions)
        return db.store.rows


def check_caught_up(db_path: Path, churn: FolderChurn, rng: random.Random, sample: int = 5) -> None:
    """The database holds exactly the folder's files, each with the vector of its current content."""
    from nanodb.database import NanoDB

    with NanoDB(db_path, read_only=True) as db:
        paths = live_paths(db)
        on_disk = {str(p) for p in churn.files()}
        assert len(paths) == len(set(paths)), "a file is indexed twice"
        assert set(paths) == on_disk, (f"missing {sorted(on_disk - set(paths))[:5]}, "
                                       f"stale {sorted(set(paths) - on_disk)[:5]}")
        current = {p: churn.versions[p][-1:] for p in paths}
        assert_vectors_match_some_version(db, rng.sample(paths, min(sample, len(paths))), current)
