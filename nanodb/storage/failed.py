"""The files a scan could not read, remembered in the database folder (`failed.json`) with the size and
modification time they had: a rescan retries only those that changed since (or all of them when asked),
so a folder holding one broken file does not load the model at every rescan.

It is a cache, not data: written whole and atomically (a temporary file, fsynced, then renamed), apart
from the manifest and the data files. Lost, unreadable or from another version, it only means that the
failed files are tried once more.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from nanodb.media.paths import is_url, printable
from nanodb.media.remote import split_member
from nanodb.storage.commit import replace_file

log = logging.getLogger(__name__)

FAILED = "failed.json"
FAILED_VERSION = 1


class FailedFiles:
    """path -> (size, mtime, reason) of each file that failed, in memory, written by `write`."""

    def __init__(self, root: Path, *, new: bool = False):
        """`new`: the record of a new database, empty (a file left from another one is not read)."""
        self.file = root / FAILED
        self.entries: dict[str, tuple[int, float, str]] = {} if new else self._read()
        self.changed = new and self.file.exists()  # replaced at the first write

    def _read(self) -> dict[str, tuple[int, float, str]]:
        try:
            data = json.loads(self.file.read_bytes())
            if data.get("version") != FAILED_VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            files = data["files"].items()
            return {str(p): (int(size), float(mtime), str(reason)) for p, (size, mtime, reason) in files}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("%s is unreadable (%s): the files that failed before are tried again", self.file, e)
            return {}

    def unchanged(self, path: str, size: int, mtime: float) -> bool:
        """`path` failed before with this very size and mtime: trying it again would fail again."""
        entry = self.entries.get(path)
        return entry is not None and entry[0] == size and entry[1] == mtime

    def add(self, path: str, size: int, mtime: float, reason: str) -> None:
        if self.entries.get(path) != (size, mtime, reason):
            self.entries[path] = (size, mtime, reason)
            self.changed = True

    def discard(self, paths: Iterable[str | None]) -> None:
        """Files indexed now: no longer failed."""
        for p in paths:
            if p is not None and self.entries.pop(p, None) is not None:
                self.changed = True

    def write(self) -> None:
        """Write the record if it changed, without the files that are gone since."""
        if not self.changed:
            return
        for p in [p for p in self.entries if _gone(p)]:
            del self.entries[p]
        files = {p: [size, mtime, reason] for p, (size, mtime, reason) in self.entries.items()}
        replace_file(self.file, json.dumps({"version": FAILED_VERSION, "files": files}).encode())
        self.changed = False
        log.info("remembered %d files that failed in %s", len(files), printable(str(self.file)))


def _gone(path: str) -> bool:
    """A local file, or the local tar shard of a member, that no longer exists. An object behind a URL is
    kept (a video in a bucket fails the same at every rescan: it is retried only once it changes)."""
    member = split_member(path)
    local = member[0] if member else path
    return not is_url(local) and not os.path.lexists(local)
