"""Hostile tar shards (issue 35): a member's bytes are bounded before they are read (a gzip bomb of zeros
took a scan to 8 GB resident), and every member a scan does not index says so, in few lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import REPO, coco_photos

from nanodb import NanoDB

MEMORY_MB = 100  # the decode memory limit of these tests: a tar member over a quarter of it is not read
BOMB_MEMBER = 300 << 20


class Zeros(io.RawIOBase):
    """`size` zero bytes, read as a file, never held whole."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def gzip_bomb(path: Path, members: int = 3, size: int = BOMB_MEMBER) -> Path:
    """A small .tar.gz holding `members` image-named members of `size` zeros each."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = size
            tar.addfile(info, io.BufferedReader(Zeros(size)))
    return path


MEASURE = r"""
import json, sys
from nanodb import NanoDB

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field + ":"))

db = NanoDB(sys.argv[1], config="test", decode_memory_mb=int(sys.argv[3]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
before = status("VmRSS")
report = db.scan(sys.argv[2])
print(json.dumps({"growth": status("VmHWM") - before, "failures": report.failures, "added": report.added}))
"""


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident memory from /proc")
def test_a_gzip_tar_bomb_is_refused_from_its_headers_without_being_held(tmp_path):
    """3 members of 300 MiB of zeros (a 4 MB .tar.gz): each is refused from its header, with one line,
    and the scanning process's peak resident memory grows by less than the memory limit."""
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 8 << 20
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "db"), str(bomb), str(MEMORY_MB)],
                         capture_output=True, text=True, timeout=280, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    members = [f"{bomb}#{i:03d}.jpg" for i in range(3)]
    reason = f"tar member too large ({BOMB_MEMBER >> 20} MiB; at most {MEMORY_MB // 4} MiB are read)"
    assert result["failures"] == [[m, reason] for m in members] and result["added"] == 0
    for m in members:
        assert run.stderr.count(f"skipped {m}: {reason}") == 1, run.stderr[-2000:]
    assert result["growth"] < MEMORY_MB << 20, f"the scan's peak memory grew by {result['growth'] >> 20} MiB"


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


def lines_naming(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_link_and_special_members_are_each_one_skipped_line(tmp_path, caplog):
    """Links (never followed), devices and FIFOs with an image's name are counted as skipped, one line
    each; a link where a caption would be is one 'ignored' line; the real image beside them is indexed."""
    shard = tmp_path / "shard.tar"
    kinds = {"001.jpg": (tarfile.SYMTYPE, "symbolic link"), "002.jpg": (tarfile.LNKTYPE, "hard link"),
             "003.png": (tarfile.CHRTYPE, "character device"), "004.png": (tarfile.BLKTYPE, "block device"),
             "005.jpg": (tarfile.FIFOTYPE, "FIFO")}
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "000.jpg", coco_photos(1)[0].read_bytes())
        for name, (kind, _) in kinds.items():
            add_member(tar, name, kind=kind, link="/etc/passwd" if kind == tarfile.SYMTYPE else "000.jpg")
        add_member(tar, "000.txt", kind=tarfile.SYMTYPE, link="/etc/passwd")
    with caplog.at_level(logging.WARNING), NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(str(shard))
        assert report.added == 1 and db[0].path == f"{shard}#000.jpg" and "caption" not in db[0].metadata
    assert dict(report.failures) == {f"{shard}#{name}": f"a {what} in the tar, not a file"
                                     for name, (_, what) in kinds.items()}
    assert report.summary().count("5 skipped") == 1
    for name in kinds:
        assert len(lines_naming(caplog, f"{shard}#{name}")) == 1
    assert lines_naming(caplog, f"{shard}#000.txt") == [f"ignored {shard}#000.txt: a symbolic link, not a file"]


def test_many_empty_members_are_counted_each_and_logged_in_a_few_lines(tmp_path, caplog):
    """1,000 empty image members (100,000 wrote 100,000 lines): each is counted as skipped; the first few
    are logged one by one, the rest in one line with their count and reason."""
    from nanodb.pipeline.report import MEMBER_LINES

    shard = tmp_path / "empty.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(1000):
            add_member(tar, f"{i:06d}.jpg")
        add_member(tar, "zzz.jpg", coco_photos(1)[0].read_bytes())
    with caplog.at_level(logging.WARNING), NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(str(shard))
        assert report.added == 1 and len(db) == 1
    assert len(report.failures) == 1000 and {reason for _, reason in report.failures} == {"empty file"}
    lines = lines_naming(caplog, str(shard))
    assert len(lines) == MEMBER_LINES + 1, lines[:20]
    assert lines[-1] == (f"skipped {1000 - MEMBER_LINES} more members of {shard}, not logged one by one: "
                         f"{1000 - MEMBER_LINES} empty file")


def test_members_read_and_not_decoded_are_bounded_in_bytes():
    """The shard's reader takes a member only once it fits beside those held; one alone always fits."""
    from nanodb.pipeline.decode import HeldBytes

    async def run() -> list[str]:
        held, steps = HeldBytes(100), []
        await held.take(60)
        second = asyncio.create_task(held.take(60))
        await asyncio.sleep(0.05)
        steps.append(f"waiting {not second.done()}, held {held.held}")
        held.give(60)
        await second
        steps.append(f"taken, held {held.held}")
        held.give(60)
        await held.take(500)  # larger than the limit, alone
        steps.append(f"alone, held {held.held}")
        return steps

    assert asyncio.run(run()) == ["waiting True, held 60", "taken, held 60", "alone, held 500"]
