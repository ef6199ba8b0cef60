"""End-to-end: the console, scripted over stdin in a subprocess, prints what its committed snapshot says.

Queries by item index search stored float16 vectors only (see the `vector_db` fixture), so the output
is the same on every machine. Paths are normalised. After a deliberate change of the console's output,
rewrite the snapshots with NANODB_UPDATE_SNAPSHOTS=1 and review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO
from helpers.snapshots import assert_matches_snapshot

SESSIONS = {
    "search_by_item": ["similar 0", "similar 7", "similar 11"],
    "bad_input": ["similar 999", "similar -1", "similar", "", "   ", "similar /no/such/photo.jpg"],
    "help_and_save": ["help", "save"],
    # every command but the searches; `quit` ends the session, so the last line never runs
    "commands": ["status", "pause", "status", "resume", "wait", "validate", "save", "SIMILAR 4", "quit",
                 "similar 0"],
    "bad_commands": ["scan", "scan /no/such/folder", "open", "open cat", "open 99", "open 0", "clear",
                     "./missing.jpg", "~/no-such-photo.png", "missing.png", "similar 1.5", "similar 'no such.jpg'"],
}


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
    assert_matches_snapshot(f"console_{session}.txt", run.stdout.replace(str(db), "<DB>"))
