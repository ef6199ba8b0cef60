"""End-to-end: the console, scripted over stdin in a subprocess, prints what its committed snapshot says.

Queries by item index search stored float16 vectors only, so the output (order and similarities) is the
same on every machine. Paths are normalised. After a deliberate change of the console's output, rewrite
the snapshots with NANODB_UPDATE_SNAPSHOTS=1 and review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from nanodb import NanoDB

SNAPSHOTS = Path(__file__).parent / "snapshots"

SESSIONS = {
    "search_by_item": ["similar 0", "similar 7", "similar 11"],
    "bad_input": ["similar 999", "similar -1", "similar", "", "   ", "similar /no/such/photo.jpg"],
    "help_and_save": ["help", "save"],
}


@pytest.fixture(scope="module")
def vector_db(tmp_path_factory) -> Path:
    """12 items with fixed vectors and paths: 3 clusters of 4 near-identical directions."""
    path = tmp_path_factory.mktemp("snap") / "db"
    rng = np.random.default_rng(2024)
    with NanoDB(path, config="test") as db:
        centres = rng.standard_normal((3, db.dim))
        vectors = np.repeat(centres, 4, axis=0) + 0.3 * rng.standard_normal((12, db.dim))
        db.add(vectors, paths=[f"/photos/cluster{i // 4}/img{i:02d}.jpg" for i in range(12)])
        db.save()
    return path


@pytest.mark.parametrize("session", sorted(SESSIONS))
def test_console_output_matches_its_snapshot(vector_db, session, tmp_path):
    db = tmp_path / "db"
    subprocess.run(["cp", "-r", str(vector_db), str(db)], check=True)
    run = subprocess.run(
        [sys.executable, "-m", "nanodb", "--path", str(db), "--k", "3"],
        input="\n".join(SESSIONS[session]) + "\n", capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    output = run.stdout.replace(str(db), "<DB>")
    snapshot = SNAPSHOTS / f"console_{session}.txt"
    if os.environ.get("NANODB_UPDATE_SNAPSHOTS"):
        snapshot.write_text(output)
    assert output == snapshot.read_text(), f"console output differs from {snapshot.name}:\n{output}"
