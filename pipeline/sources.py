"""Stage 1 beside the directory walker: sources that are not local folders.

- an fsspec URL prefix (`s3://bucket/photos/`): its objects, listed recursively, with the walker's rules
  (the same indexed extensions and exclusions; an image format nanodb cannot read is a problem line);
  each is a FoundFile whose path is its URL, with the object's size and LastModified (seconds).
- webdataset tar shards (`data/{00000..00099}.tar`, local or behind a URL, a brace range or list
  expanded here): each tar is one FoundFile (the tar's own size and mtime); the decode stage reads it in
  one pass and its image members become the items (`<tar>#<member>`: media.remote).

Listing errors (no such bucket, no credentials, no s3fs) raise SourceError with one line.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from nanodb.pipeline.walk import FoundFile, WalkProblem

from nanodb.media.paths import (
    DEFAULT_EXCLUDES,
    absolute_path,
    is_excluded,
    is_indexed_name,
    is_unsupported_image_name,
    is_url,
    printable,
)
from nanodb.media.remote import SourceError, filesystem, is_tar_name, object_stat, one_line, split_member

log = logging.getLogger(__name__)

MAX_SHARDS = 1_000_000  # names one brace pattern may expand to
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """`data/{00000..00002}.tar` -> data/00000.tar, data/00001.tar, data/00002.tar (zero padding kept);
    `{a,b}` -> a, b; nested and several groups expand in turn. A group of neither kind stays as it is."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    if r := _RANGE.fullmatch(body):
        a, b = r.groups()
        width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0")) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        if abs(hi - lo) >= MAX_SHARDS:
            raise SourceError(f"{pattern} names over {MAX_SHARDS:,} shards")
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    names = [name for item in items for name in expand_braces(head + item + tail)]
    if len(names) > MAX_SHARDS:
        raise SourceError(f"{pattern} names over {MAX_SHARDS:,} shards")
    return names


def shard_names(arg: str) -> list[str] | None:
    """The tar shards a scan argument names (a brace pattern expanded), None if it names no tars."""
    names = expand_braces(arg)
    return names if all(is_tar_name(n) for n in names) else None


def shard_pattern(first: str, last: str) -> str:
    """A scan argument naming tar shards from `first` to `last` (`d/shard-{0000..0041}.tar` where their
    names differ in one zero-padded number), else `first` alone."""
    a, b = (re.fullmatch(r"(.*?)(\d+)(\.(?:tar|tgz|tar\.gz))", name, re.IGNORECASE) for name in (first, last))
    if a and b and (a[1], a[3], len(a[2])) == (b[1], b[3], len(b[2])) and a[2] != b[2]:
        return f"{a[1]}{{{a[2]}..{b[2]}}}{a[3]}"
    return first


def is_source(arg: str) -> bool:
    """A scan argument for this module (a URL, tar shards), not for the directory walker."""
    return is_url(arg) or shard_names(arg) is not None


@dataclass
class SourceLister:
    """Yields the FoundFiles of URL prefixes and tar shards (`args`, scan arguments for which is_source).

    After the listing: `prefixes` (the URL prefixes listed whole: an indexed object under one that was
    not listed is gone), `gone_tars` (named shards with items, `indexed(tar)`, that no longer exist: they
    were removed, their members are dropped; a named shard that never was is a problem).
    """

    args: list[str]
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    problems: list[WalkProblem] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    gone_tars: list[str] = field(default_factory=list)
    indexed: Callable[[str], bool] = lambda tar: False

    def _problem(self, path: str, reason: str) -> None:
        log.warning("skipped %s: %s", printable(path), reason)
        self.problems.append(WalkProblem(path, reason))

    def __iter__(self) -> Iterator[FoundFile]:
        seen: set[str] = set()
        for arg in self.args:
            shards = shard_names(arg)
            found = self._shards(shards) if shards is not None else self._prefix(arg)
            for f in found:
                if f.path not in seen:
                    seen.add(f.path)
                    yield f

    def _prefix(self, url: str) -> Iterator[FoundFile]:
        """The indexed objects under a URL prefix (or the one object it names), in name order."""
        fs, root = filesystem(url)
        fs.invalidate_cache()  # a rescan lists anew: objects added or removed since
        try:
            listing = fs.find(root, detail=True, withdirs=False)
            if not listing:
                _check_bucket(fs, root)
        except SourceError:
            raise
        except FileNotFoundError:
            raise SourceError(f"cannot list {url}: no such bucket or prefix") from None
        except Exception as e:  # credentials, network, a denied listing: one line, not a traceback
            raise SourceError(f"cannot list {url}: {one_line(e)}") from None
        base = root.rstrip("/")
        self.prefixes.append(fs.unstrip_protocol(base))
        for key in sorted(listing):
            info = listing[key]
            if info.get("type", "file") != "file":
                continue
            path = fs.unstrip_protocol(key)
            parts = key[len(base):].strip("/").split("/") if key.startswith(base) else key.split("/")
            if (odd := odd_image_key(parts)) is not None:
                self._problem(path, odd)
                continue
            if is_excluded(parts, path, self.excludes):
                continue
            name = parts[-1]
            if is_indexed_name(name):
                size, mtime = object_stat(info)
                yield FoundFile(path, size, mtime)
            elif is_unsupported_image_name(name):
                self._problem(path, f"unsupported image format ({os.path.splitext(name)[1]})")

    def _shards(self, names: list[str]) -> Iterator[FoundFile]:
        for name in names:
            tar = name if is_url(name) else absolute_path(name)
            if split_member(tar + "#x") != (tar, "x"):  # its name would not split one way only
                self._problem(tar, "a tar shard's name may not hold '.tar#' (member paths would be ambiguous)")
            elif is_url(tar):
                yield from self._remote_tar(tar)
            else:
                try:
                    st = os.stat(tar)
                except FileNotFoundError:  # removed (its folder is there), or never was, or unmounted
                    if os.path.isdir(os.path.dirname(tar)) and self.indexed(tar):
                        self.gone_tars.append(tar)
                    else:
                        self._problem(tar, "no such tar shard")
                    continue
                except OSError as e:
                    self._problem(tar, e.strerror or str(e))
                    continue
                yield FoundFile(tar, st.st_size, st.st_mtime)

    def _remote_tar(self, url: str) -> Iterator[FoundFile]:
        fs, path = filesystem(url)
        fs.invalidate_cache()
        try:
            size, mtime = object_stat(fs.info(path))
        except FileNotFoundError:
            if self.indexed(url):
                self.gone_tars.append(url)
            else:
                self._problem(url, "no such tar shard")
            return
        except Exception as e:
            raise SourceError(f"cannot read {url}: {one_line(e)}") from None
        yield FoundFile(fs.unstrip_protocol(path), size, mtime)


def odd_image_key(parts: list[str]) -> str | None:
    """Why an object named like an image is not indexed though no exclusion names it, in a few words (its
    segments `parts`): a `.` or `..` segment (`a/../../etc/passwd.jpg`: as a path it names another file),
    or a name of only dots before its extension (`..jpg`: no name, and hidden). None for any other key."""
    name = parts[-1]
    stem, dot, ext = name.rpartition(".")
    dots_only = bool(dot) and not stem.strip(".") and is_indexed_name(f"x.{ext}")
    if not (dots_only or is_indexed_name(name)):
        return None
    if any(part in (".", "..") for part in parts):
        return "its key has a '.' or '..' segment: not indexed (as a path it would name another file)"
    return "its name is only dots before the extension: not indexed" if dots_only else None


def _check_bucket(fs, root: str) -> None:
    """An empty listing: fine for an emptied prefix of a bucket that exists; an error for a missing bucket."""
    bucket = root.strip("/").split("/")[0]
    if bucket and not fs.exists(bucket):
        raise SourceError(f"cannot list {fs.unstrip_protocol(root)}: no such bucket ({bucket})")
