"""File names and paths: which files are images (by the extensions of `formats`), how a path is stored,
shown and excluded. The walker, the watcher, the store and every interface share these rules."""

from __future__ import annotations

import fnmatch
import os
import re

from nanodb.media.formats import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from nanodb.media.video import is_video_name

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """`path` names an object behind a URL (`s3://bucket/key.jpg`: media.remote), not a local file."""
    return bool(_URL.match(path))


# Folders nobody wants indexed: hidden ones, Synology and desktop thumbnail caches.
DEFAULT_EXCLUDES = (".*", "@eaDir", ".thumbnails", "__MACOSX")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_indexed_name(name: str) -> bool:
    """A file a scan indexes: an image (is_image_name) or a video (media.video)."""
    return is_image_name(name) or is_video_name(name)


def is_unsupported_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in UNSUPPORTED_IMAGE_EXTENSIONS


def absolute_path(path: str | os.PathLike) -> str:
    """How every path is stored and compared: absolute, `~` expanded, symlinks kept as named. A URL
    (`s3://bucket/key`, an object's path: media.remote) is kept as it is."""
    path = os.fspath(path)
    if is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def is_excluded(relative_parts: list[str], path: str, patterns: tuple[str, ...]) -> bool:
    """The one exclusion rule: a glob pattern matches a file or folder name on the way, or the full path."""
    return any(fnmatch.fnmatch(part, pat) for part in relative_parts for pat in patterns) or any(
        fnmatch.fnmatch(path, pat) for pat in patterns
    )


def printable(path: str) -> str:
    """A file name fit for one log or console line: newlines, control characters and undecodable
    bytes (surrogate escapes) shown as Python escapes, so no name can split or garble the output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)


OUTSIDE_ROOTS = "symlink leads outside the scanned folders"


def resolved_roots(roots) -> tuple[str, ...]:
    """The scanned folders (or files) as the filesystem resolves them: where a symlink must lead to stay inside."""
    return tuple(os.path.realpath(absolute_path(r)) for r in roots)


def is_under(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it (both absolute and normalised; no file system access)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def leads_inside(path: str, real_roots: tuple[str, ...]) -> bool:
    """`path`, every symlink on the way followed, is one of `real_roots` or lies below one."""
    real = os.path.realpath(path)
    return any(is_under(real, root) for root in real_roots)


def servable_path(path: str, roots: dict[str, bool]) -> bool:
    """May a stored file be sent? `roots`: the folders (or files) scanned or watched, each with whether
    symlinks out of it were followed (NanoDB.scan's follow_symlinks).

    Under a root scanned following symlinks: yes. Otherwise the file, resolved, must lie under a root,
    resolved; a file under no root (added by name with NanoDB.add) only when no symlink is on its way."""
    named_under = [root for root in roots if is_under(path, root)]
    if any(roots[root] for root in named_under):
        return True
    if not named_under and os.path.realpath(path) == path:
        return True
    return leads_inside(path, resolved_roots(roots))
