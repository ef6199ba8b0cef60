"""Stage 1, the directory walker: finds the image files under the scanned folders."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from nanodb.media.paths import (
    DEFAULT_EXCLUDES,
    absolute_path,
    is_excluded,
    is_image_name,
    is_unsupported_image_name,
    printable,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, normalised, symlinks kept as named
    size: int
    mtime: float


@dataclass
class WalkProblem:
    path: str
    reason: str


@dataclass
class DirectoryWalker:
    """Yields the image files under `roots` (folders or single files), each once.

    Skips excluded names (glob patterns matched against each file or folder name, or a full path),
    folders it has already entered (symlink loops), and anything that is not a regular file
    (FIFOs, sockets, devices: reading those would hang or never end). Unreadable folders, broken
    links and image files of a format nanodb cannot read are reported in `problems` and the walk goes on.
    """

    roots: list[str]
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    skip_dirs: tuple[str, ...] = ()  # absolute folders never entered (the database folder)
    problems: list[WalkProblem] = field(default_factory=list)

    def _problem(self, path: str, reason: str) -> None:
        log.warning("skipped %s: %s", printable(path), reason)
        self.problems.append(WalkProblem(path, reason))

    def __iter__(self) -> Iterator[FoundFile]:
        seen_dirs: set[tuple[int, int]] = set()
        seen_files: set[str] = set()
        skip = {os.path.abspath(d) for d in self.skip_dirs}
        for root in self.roots:
            root = absolute_path(root)
            try:
                st = os.stat(root)
            except OSError as e:
                self._problem(root, e.strerror or str(e))
                continue
            if stat.S_ISDIR(st.st_mode):
                stack = [root]
                while stack:
                    folder = stack.pop()
                    try:
                        dst = os.stat(folder)
                    except OSError as e:
                        self._problem(folder, e.strerror or str(e))
                        continue
                    if (dst.st_dev, dst.st_ino) in seen_dirs or folder in skip:
                        continue
                    seen_dirs.add((dst.st_dev, dst.st_ino))
                    try:
                        with os.scandir(folder) as it:
                            entries = sorted(it, key=lambda e: e.name)
                    except OSError as e:
                        self._problem(folder, e.strerror or str(e))
                        continue
                    subdirs = []
                    for entry in entries:
                        if is_excluded([entry.name], entry.path, self.excludes):
                            continue
                        try:
                            is_dir = entry.is_dir()  # follows symlinks; loops are cut by seen_dirs
                        except OSError:
                            is_dir = False
                        if is_dir:
                            subdirs.append(entry.path)
                        elif is_image_name(entry.name):
                            found = self._file(entry.path, seen_files)
                            if found:
                                yield found
                        elif is_unsupported_image_name(entry.name):
                            self._problem(entry.path, f"unsupported image format ({os.path.splitext(entry.name)[1]})")
                    stack.extend(reversed(subdirs))
            elif is_image_name(root) or stat.S_ISREG(st.st_mode):
                found = self._file(root, seen_files)
                if found:
                    yield found

    def _file(self, path: str, seen: set[str]) -> FoundFile | None:
        if path in seen:
            return None
        seen.add(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._problem(path, "broken link" if os.path.islink(path) else "vanished")
            return None
        except OSError as e:
            self._problem(path, e.strerror or str(e))
            return None
        if not stat.S_ISREG(st.st_mode):
            self._problem(path, "not a regular file")
            return None
        return FoundFile(path, st.st_size, st.st_mtime)
