"""`cancel` (or `stop`) stops a running scan and stays in the console: what the scan indexed is kept,
and a later scan of the folder completes it, each file once."""

from __future__ import annotations

import asyncio
import shutil

from helpers.killharness import live_paths

from nanodb.database import NanoDB
from nanodb.interfaces.console import Console
from nanodb.service import IngestService


def test_cancel_stops_the_scan_and_a_rescan_completes_it(photo_tree, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photo_tree / "set0", folder)
    images = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() == ".jpg")

    async def session() -> tuple[list[str], list[str]]:
        lines: list[str] = []
        with NanoDB(tmp_path / "db", config="test") as db:
            service = IngestService(db)
            console = Console(db, 3, lines.append, service=service)
            assert await console.execute(f"scan {folder}")
            assert await console.execute("cancel")
            assert not db.active_scans and all(task.done() for _, _, task in service.scans)
            assert await console.execute("stop")  # the alias, with nothing left to stop
            assert await console.execute(f"scan {folder}")
            assert await console.execute("wait")
            await service.stop()
            return lines, live_paths(db)

    lines, paths = asyncio.run(session())
    assert lines[1].startswith(f"cancelled the scan of {folder}: scanned "), lines
    assert lines[2].startswith("scans stopped"), lines
    assert lines[3] == "no scan is running" or lines[3].startswith("no scan is running;"), lines
    assert sorted(paths) == images  # every photo once: nothing the cancelled scan added is duplicated
