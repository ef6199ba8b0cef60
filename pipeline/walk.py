"""Stage 1, the directory walker: finds the image files under the scanned folders."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from nanodb.media.formats import RAW_EXTENSIONS, RENDERING_EXTENSIONS
from nanodb.media.paths import (
    DEFAULT_EXCLUDES,
    OUTSIDE_ROOTS,
    absolute_path,
    is_excluded,
    is_indexed_name,
    is_unsupported_image_name,
    leads_inside,
    printable,
    resolved_roots,
)
from nanodb.media.remote import is_tar_name

log = logging.getLogger(__name__)

RAW_PAIRS = ("jpeg", "both")  # the raw_pairs setting: a RAW beside its JPEG (or export) is the JPEG, or both


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, normalised, symlinks kept as named
    size: int
    mtime: float


@dataclass
class WalkProblem:
    path: str
    reason: str


def paired_raw_names(names: list[str]) -> set[str]:
    """The camera RAW file names among `names` (one folder's files) that have a rendering of the same shot
    beside them: a JPEG, HEIF or other export (RENDERING_EXTENSIONS) of the same stem, in any letter case
    (IMG_0001.CR2 beside img_0001.jpg or IMG_0001.png)."""
    split = [os.path.splitext(n) for n in names]
    rendered = {stem.lower() for stem, ext in split if ext.lower() in RENDERING_EXTENSIONS}
    return {stem + ext for stem, ext in split if ext.lower() in RAW_EXTENSIONS and stem.lower() in rendered}


def has_rendering_beside(path: str) -> bool:
    """`path` is a camera RAW file with a JPEG, HEIF or other export of the same stem in its folder."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    if ext.lower() not in RAW_EXTENSIONS:
        return False
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    renderings = [n for n in names if (s := os.path.splitext(n))[0].lower() == stem.lower()
                  and s[1].lower() in RENDERING_EXTENSIONS]
    return any(os.path.isfile(os.path.join(folder, n)) for n in renderings)


@dataclass
class _Visited:
    """One walk's memory: folders entered (by device and inode: symlink loops) and files found."""

    skip_dirs: set[str]
    inside: tuple[str, ...]  # the resolved folders a symlink may lead into
    dirs: set[tuple[int, int]] = field(default_factory=set)
    files: set[str] = field(default_factory=set)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; loops are cut by _Visited.dirs
    except OSError:
        return False


@dataclass
class DirectoryWalker:
    """Yields the image files under `roots` (folders or single files), each once.

    Skips excluded names (glob patterns matched against each file or folder name, or a full path),
    folders it has already entered (symlink loops), and anything that is not a regular file
    (FIFOs, sockets, devices: reading those would hang or never end). Unless `follow_symlinks`, a symlink
    (to a file or a folder) that leads outside `bounds` (default: the roots) is skipped: a link dropped
    into a shared folder must not index, and so publish, a private file. Unreadable folders, broken
    links, such symlinks and image files of a format nanodb cannot read are reported in `problems` and
    the walk goes on. A root itself, named by the user, is always followed.

    A camera RAW file beside its JPEG, HEIF or export (PNG, TIFF...) of the same shot is left out (counted in
    `raw_left_out`) unless `index_paired_raw`: the pair is one item, the camera's or the user's rendering.
    """

    roots: list[str]
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    skip_dirs: tuple[str, ...] = ()  # absolute folders never entered (the database folder)
    follow_symlinks: bool = False
    bounds: tuple[str, ...] | None = None  # the folders symlinks may lead into, if not the roots
    problems: list[WalkProblem] = field(default_factory=list)
    index_paired_raw: bool = False
    raw_left_out: int = 0  # RAW files left out for the rendering beside them
    tars_left_out: int = 0  # tar files in the folders: read only when named (webdataset shards)
    tar_ends: tuple[str, ...] = ()  # the first and the last of them, for the summary's hint

    def _problem(self, path: str, reason: str) -> None:
        log.warning("skipped %s: %s", printable(path), reason)
        self.problems.append(WalkProblem(path, reason))

    def __iter__(self) -> Iterator[FoundFile]:
        inside = resolved_roots(self.roots if self.bounds is None else self.bounds)
        visited = _Visited(skip_dirs={os.path.abspath(d) for d in self.skip_dirs}, inside=inside)
        for root in self.roots:
            yield from self._walk_root(absolute_path(root), visited)

    def _walk_root(self, root: str, visited: _Visited) -> Iterator[FoundFile]:
        """A root folder's tree, or a root file (any regular file: named, so wanted)."""
        try:
            st = os.stat(root)
        except OSError as e:
            self._problem(root, e.strerror or str(e))
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self._walk_tree(root, visited)
        elif is_indexed_name(root) or stat.S_ISREG(st.st_mode):
            if found := self._file(root, visited.files):
                yield found

    def _walk_tree(self, root: str, visited: _Visited) -> Iterator[FoundFile]:
        """Depth first, each folder's entries in name order."""
        stack = [root]
        while stack:
            subdirs, files = [], []
            for entry in self._entries(stack.pop(), visited):
                if is_excluded([entry.name], entry.path, self.excludes) or self._leads_outside(entry, visited):
                    continue
                (subdirs if _is_dir(entry) else files).append(entry)
            paired = set() if self.index_paired_raw else paired_raw_names([e.name for e in files])
            for entry in files:
                if entry.name in paired:
                    self.raw_left_out += 1
                    log.info("left out %s: its camera's rendering beside it is indexed", printable(entry.path))
                elif found := self._image(entry, visited.files):
                    yield found
            stack.extend(reversed(subdirs))

    def _entries(self, folder: str, visited: _Visited) -> list[os.DirEntry]:
        """A folder's entries in name order; none if it is skipped, entered already or unreadable."""
        try:
            st = os.stat(folder)
        except OSError as e:
            self._problem(folder, e.strerror or str(e))
            return []
        if (st.st_dev, st.st_ino) in visited.dirs or folder in visited.skip_dirs:
            return []
        visited.dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            self._problem(folder, e.strerror or str(e))
            return []

    def _leads_outside(self, entry: os.DirEntry, visited: _Visited) -> bool:
        """A symlink out of the scanned folders, not to be followed: reported if it names an image or a folder.
        A broken link leads nowhere: the file checks report it as the broken link it is."""
        try:
            if (self.follow_symlinks or not entry.is_symlink() or not os.path.exists(entry.path)
                    or leads_inside(entry.path, visited.inside)):
                return False
        except OSError:
            return False  # unreadable: the checks that follow report it
        if is_indexed_name(entry.name) or _is_dir(entry):
            self._problem(entry.path, OUTSIDE_ROOTS)
        return True

    def _image(self, entry: os.DirEntry, seen: set[str]) -> FoundFile | None:
        """A folder entry that is an image file; an image format nanodb cannot read is a problem."""
        if is_indexed_name(entry.name):
            return self._file(entry.path, seen)
        if is_unsupported_image_name(entry.name):
            self._problem(entry.path, f"unsupported image format ({os.path.splitext(entry.name)[1]})")
        elif is_tar_name(entry.name):
            self.tars_left_out += 1
            self.tar_ends = (*self.tar_ends[:1], entry.path)
        return None

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
