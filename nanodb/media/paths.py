"""File names and paths: which files are images (by the extensions of `formats`), how a path is stored,
shown and excluded. The walker, the watcher, the store and every interface share these rules."""

from __future__ import annotations

import fnmatch
import os

from nanodb.media.formats import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS

# Folders nobody wants indexed: hidden ones, Synology and desktop thumbnail caches.
DEFAULT_EXCLUDES = (".*", "@eaDir", ".thumbnails", "__MACOSX")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_unsupported_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in UNSUPPORTED_IMAGE_EXTENSIONS


def absolute_path(path: str | os.PathLike) -> str:
    """How every path is stored and compared: absolute, `~` expanded, symlinks kept as named."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def is_excluded(relative_parts: list[str], path: str, patterns: tuple[str, ...]) -> bool:
    """The one exclusion rule: a glob pattern matches a file or folder name on the way, or the full path."""
    return any(fnmatch.fnmatch(part, pat) for part in relative_parts for pat in patterns) or any(
        fnmatch.fnmatch(path, pat) for pat in patterns
    )


def printable(path: str) -> str:
    """A file name fit for one log or console line: newlines, control characters and undecodable
    bytes (surrogate escapes) shown as Python escapes, so no name can split or garble the output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
