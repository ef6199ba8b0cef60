"""Snapshot tests: an output compared with its committed file under tests/e2e/snapshots.

After a deliberate change of an output, rewrite the files with NANODB_UPDATE_SNAPSHOTS=1 and review
the diff before committing it."""

from __future__ import annotations

import os

from helpers import REPO

SNAPSHOTS = REPO / "tests" / "e2e" / "snapshots"


def assert_matches_snapshot(name: str, output: str) -> None:
    snapshot = SNAPSHOTS / name
    if os.environ.get("NANODB_UPDATE_SNAPSHOTS"):
        snapshot.write_text(output)
    assert snapshot.is_file(), f"no snapshot {name}: write it with NANODB_UPDATE_SNAPSHOTS=1, then review it"
    assert output == snapshot.read_text(), f"the output differs from the snapshot {name}:\n{output}"
