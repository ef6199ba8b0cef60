"""What a scan's progress says while it runs: no ETA from a total the walk is still counting, and a
status line that keeps its counts, ETA and items when the terminal is narrower than it."""

from __future__ import annotations

import asyncio
import re
import shutil
import time

from nanodb.pipeline.report import ScanReport

from nanodb.database import NanoDB
from nanodb.interfaces.console import progress_line
from nanodb.service import IngestService


def report_at(found: int, done: int, seconds: float, walking: bool) -> ScanReport:
    report = ScanReport(found=found, added=done, embedded=done, walking=walking)
    report.started = time.monotonic() - seconds
    return report


def test_no_eta_is_guessed_from_the_files_found_so_far():
    """352 of 650 found so far (of 2,500): an ETA from 650 would say 0m08s; it says it is counting."""
    walking = report_at(650, 352, 10.0, walking=True).status()
    assert "352/650+ files" in walking and "ETA: counting files" in walking and "ETA 0m" not in walking
    walked = report_at(650, 352, 10.0, walking=False).status()
    assert "352/650 files" in walked and "ETA 0m08s" in walked  # 298 left at 35.2 images/s


def test_the_wait_line_keeps_counts_eta_and_items_however_narrow(tmp_path, empty_db_path):
    shutil.copytree(empty_db_path, tmp_path / "db")
    folder = "/mnt/nas/photos/" + "/".join(f"holidays-{year}-with-the-family" for year in range(2015, 2022))

    async def lines() -> dict[int, str]:
        with NanoDB(tmp_path / "db") as db:
            service = IngestService(db)
            report = report_at(2500, 352, 10.0, walking=False)
            report.queues = {"decode": asyncio.Queue(), "clip": asyncio.Queue()}
            running = asyncio.get_running_loop().create_future()
            service.scans.append((folder, report, running))
            db.active_scans.append(report)
            try:
                return {width: progress_line(db, service.status, width) for width in (80, 120, 160, 200, 400)}
            finally:
                db.active_scans.remove(report)
                running.cancel()
                await service.stop()

    shown = asyncio.run(lines())
    assert all(len(line) <= width for width, line in shown.items()), shown
    for width in (160, 200):  # where the line was cut before the ETA and the items: the path gives way
        assert re.search(r"352/2,500 \| scan /mnt/nas/.*….*-with-the-family: 352/2500 files, 35\.\d images/s, "
                         r"0 errors, ETA 1m\d\ds \| 0 items, 0 unsaved$", shown[width]), shown[width]
    assert re.search(r"scan /mnt.*…\S*family: 352/2500 files, .*, ETA 1m\d\ds", shown[120]), shown[120]
    assert folder in shown[400] and "queued: decode 0 clip 0" in shown[400]  # room for all: nothing left out
