"""Crash-safety harness: run `python -m nanodb ...` in a subprocess, kill -9 it at a chosen or random
moment, and check what a killed process left behind. Written to be reused for any long-running
command (scans now; watch folders and compaction as they land): only the arguments change.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from helpers import DATA, REPO

SAVING = re.compile(r"(?:saving|compacting) .*: (\d+) items")  # a commit starts: its row count
SAVED = re.compile(r"saved .*: \d+ items|compacted .* kept")  # ... and ends


@dataclass
class KilledRun:
    """What one run did before it ended or was killed."""

    returncode: int
    killed: bool  # True when we killed it; False when it finished first
    log: str  # its stderr (run with -v, so every save is logged before and after)
    orphans: int = 0  # its child processes (decode workers) still alive 10 s after the kill

    def saves(self) -> tuple[list[int], int | None]:
        """Row counts of the completed saves, and of the save in flight when it died (None if none).

        Relies on NanoDB.save logging "saving PATH: N items" before and "saved ..." after each save, and
        on a compaction logging "compacting PATH: N items" before and "compacted ..." after.
        """
        completed, in_flight = [], None
        for line in self.log.splitlines():
            if m := SAVING.search(line):
                in_flight = int(m.group(1))
            elif SAVED.search(line) and in_flight is not None:
                completed.append(in_flight)
                in_flight = None
        return completed, in_flight


def nanodb_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanodb", "-v", *args]


def start(args: list[str], log_path: Path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    """Start `python -m nanodb -v ARGS` from the checkout; stderr goes to a file (a pipe could fill)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(nanodb_command(*args), cwd=REPO, env=env, stdin=stdin, stdout=stdout, stderr=log)


def kill_after(args: list[str], log_path: Path, delay: float, *, after_line: str | None = None,
               give_up_s: float = 120.0) -> KilledRun:
    """Run nanodb and SIGKILL it `delay` seconds after it starts, or after `after_line` first appears
    in its log (e.g. "saving", so the kill lands while it works rather than while it loads)."""
    proc = start(args, log_path)
    deadline = time.monotonic() + give_up_s
    if after_line is not None:
        while proc.poll() is None and after_line not in log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"nanodb never logged {after_line!r}: {log_path.read_text()[-2000:]}")
            time.sleep(0.01)
    try:
        proc.wait(timeout=delay)
        killed, children = False, []
    except subprocess.TimeoutExpired:
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:  # leave no stragglers on the machine, even when the test fails
        child.kill()
    return KilledRun(proc.returncode, killed, log_path.read_text(errors="replace"), len(alive))


def run_to_end(args: list[str], log_path: Path, timeout: float = 300.0) -> KilledRun:
    proc = start(args, log_path)
    proc.wait(timeout=timeout)
    return KilledRun(proc.returncode, False, log_path.read_text(errors="replace"))


def write_config(path: Path, **settings) -> Path:
    """A YAML config for the subprocess: the small random-weight test model, plus `settings`."""
    import yaml

    values = {"model": "ViT-S-32", "pretrained": "none", "batch_size": 4, "workers": 1, **settings}
    path.write_text(yaml.safe_dump(values))
    return path


def image_folder(dest: Path, count: int, source: str = "imagenet-sample/images") -> list[str]:
    """A folder of `count` links to real photos (the data is read-only and shared); their paths."""
    import pytest

    src = DATA / source
    if not src.is_dir():
        pytest.skip(f"real photos not found at {src} (the shared data folder sits next to the checkout)")
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.JPEG")) + sorted(src.glob("*.jpg"))
    paths = []
    for f in files[:count]:
        link = dest / f.name
        link.symlink_to(f)
        paths.append(str(link))
    return paths


def assert_faithful(db, paths: list[str], min_cosine: float = 0.999) -> None:
    """Each stored vector still matches the model's embedding of its file."""
    from PIL import Image

    for p in paths:
        i = db.index_of(p)
        assert i is not None, f"{p} is not indexed"
        with Image.open(p) as im:
            expected = db.model.encode_images([im])[0]
        cosine = float(db.vectors[i].astype(np.float32) @ expected)
        assert cosine >= min_cosine, f"{p}: stored vector has cosine {cosine:.4f} with its file's embedding"


def live_paths(db) -> list[str]:
    return [db.path_of(i) for i in range(db.store.rows) if db.has_item(i)]


def run_script_until_killed(script: str, db_template: Path, db_path: Path, step: str) -> None:
    """Copy an empty database, then run `script` (argv: db path, step) on it; it must die by SIGKILL
    at `step` of a save or compaction."""
    import shutil

    shutil.copytree(db_template, db_path)
    child = subprocess.run([sys.executable, "-c", script, str(db_path), step], cwd=REPO,
                           env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}, capture_output=True, text=True,
                           timeout=100)
    assert child.returncode == -9, child.stderr


def kill_at(step: str) -> None:
    """In a child process: die by SIGKILL at `step` of the next commit (a save or a compaction).

    Steps: "write{i}" (half of the i-th data file written), "before_replace" and "after_replace" (around
    the manifest's rename, the commit point), "removing_old" (a compaction deleting the old files).
    """
    import nanodb.storage.commit as storage
    import nanodb.storage.store as store

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    writes = []
    real_append, real_replace, real_remove = storage.append_at, os.replace, store.remove_other_generations

    def append_at(path, offset, data):
        if step == f"write{len(writes)}":
            whole = b"".join(bytes(memoryview(p).cast("B")) for p in storage.pieces(data))
            real_append(path, offset, whole[: len(whole) // 2])
            die()
        writes.append(path)
        real_append(path, offset, data)

    def replace(src, dst):
        if step == "before_replace":
            die()
        real_replace(src, dst)
        if step == "after_replace":
            die()

    def remove_other_generations(root, generation):
        if step == "removing_old":
            next(p for p in root.glob("vectors.*.*") if f".{generation}." not in p.name).unlink()
            die()
        real_remove(root, generation)

    storage.append_at = append_at
    storage.os.replace = replace
    store.remove_other_generations = remove_other_generations
