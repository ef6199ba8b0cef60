"""Bytes from where large data sets live: objects behind an fsspec URL (`s3://bucket/key.jpg`) and the
members of webdataset tar shards (local or behind a URL). The media layer's other half of the one opener:
what this reads is bounded in size before a byte of it is read, then decoded by `opener.open_image` like
a local file's bytes.

Paths: an object is its URL; a tar member is `<tar>#<member>`, the tar as scanned (an absolute local
path, or a URL) and the member's name in the tar (`/data/shard-00001.tar#000123.jpg`,
`s3://bucket/shards/00001.tar#000123.jpg`). The tar part ends at the first `.tar#`, `.tgz#` or
`.tar.gz#` (any letter case); a tar whose own name holds one of these is refused when scanned, so
every such path splits one way only.

fsspec (and s3fs for S3) is the optional `s3` extra: imported only when a URL is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nanodb.media.opener import MAX_FILE_BYTES, FileBytes, ImageRejected, open_regular_file
from nanodb.media.paths import is_url

__all__ = ["is_url", "is_tar_name", "member_path", "split_member", "is_remote_item", "source_exists",
           "read_remote_bytes", "open_tar", "tar_members", "SourceError", "TarBroken", "TarMember"]

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
_MEMBER = re.compile(r"^(.*?\.(?:tar|tgz|tar\.gz))#(.+)$", re.IGNORECASE | re.DOTALL)
MEMBER_SEPARATOR = "#"
MAX_TAR_BYTES = 1 << 40  # a shard is read as a stream, never held: only its members are bounded
# A member is read whole by the scanning process (a shard is one stream) and held until a decode worker has
# it: its bound is far below a file's (which a limited worker reads itself). No real image member is larger.
MAX_MEMBER_BYTES = 256 << 20
MAX_METADATA_BYTES = 1 << 16  # a sample's caption (.txt) or .json beside its image; a larger one is ignored
CAPTION_KEY = "caption"


class SourceError(ValueError):
    """A bucket, prefix or shard that cannot be listed or opened (no such bucket, no credentials, no s3fs):
    the message is one line that says which and why."""


def is_tar_name(path: str) -> bool:
    """A tar shard, by its name: `.tar`, `.tgz`, `.tar.gz` (any letter case)."""
    return path.lower().endswith(TAR_SUFFIXES)


def member_path(tar: str, member: str) -> str:
    """The path of a tar's member: `<tar>#<member>`."""
    return f"{tar}{MEMBER_SEPARATOR}{member}"


def split_member(path: str) -> tuple[str, str] | None:
    """(tar, member) of a tar member's path, None for any other path."""
    m = _MEMBER.match(path)
    return (m.group(1), m.group(2)) if m else None


def is_remote_item(path: str | None) -> bool:
    """An item read from a URL or out of a tar shard: it has no local file of its own to send."""
    return path is not None and (is_url(path) or split_member(path) is not None)


def source_exists(path: str) -> bool:
    """A found file, object or tar member still there, as cheaply as can be told: a local file (or a local
    tar of a member) exists; an object behind a URL is taken to (asking would cost a request per item)."""
    if is_url(path):
        return True
    split = split_member(path)
    return os.path.exists(split[0] if split else path)


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL; SourceError when its protocol's package is missing.
    s3fs reads the standard AWS settings: credentials, AWS_ENDPOINT_URL (botocore >= 1.31), AWS_REGION."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise SourceError(f"reading {url} needs fsspec and s3fs: pip install 'nanodb[s3]'") from None
    try:
        return url_to_fs(url)
    except ImportError as e:
        raise SourceError(f"reading {url} needs a package for its protocol ({e}): pip install 'nanodb[s3]'") from None
    except ValueError as e:
        raise SourceError(f"cannot read {url}: {e}") from None


def object_stat(info: dict[str, Any]) -> tuple[int, float]:
    """(size, mtime in seconds) of an fsspec listing's entry (S3's LastModified, or a file system's mtime)."""
    size = int(info.get("size") or info.get("Size") or 0)
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return size, value.timestamp()
        if isinstance(value, (int, float)):
            return size, float(value)
        if isinstance(value, str):
            try:
                return size, datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
    return size, 0.0


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def remote_stat(url: str, max_bytes: int):
    """(fsspec filesystem, path within it, size, mtime) of an object checked before a byte of it is read;
    raises ImageRejected (no fsspec, gone, unreadable, empty, larger than `max_bytes`)."""
    try:
        fs, path = filesystem(url)
    except SourceError as e:
        raise ImageRejected(str(e)) from None
    try:
        size, mtime = object_stat(fs.info(path))
    except FileNotFoundError:
        raise ImageRejected("vanished") from None
    except Exception as e:  # credentials, network: the store's errors are of many kinds
        raise ImageRejected(f"unreadable: {one_line(e)}") from None
    if size == 0:
        raise ImageRejected("empty file")
    if size > max_bytes:
        raise ImageRejected(f"file too large ({size >> 20} MiB)")
    return fs, path, size, mtime


def read_remote_bytes(url: str, max_bytes: int = MAX_FILE_BYTES) -> FileBytes:
    """An object's bytes, at most `max_bytes` of them, its size checked (from the store's listing) before
    a byte is read; raises ImageRejected (gone, unreadable, empty, too large)."""
    fs, path, size, mtime = remote_stat(url, max_bytes)
    try:
        with fs.open(path, "rb") as f:
            data = f.read(size + 1)
    except Exception as e:
        raise ImageRejected(f"unreadable: {one_line(e)}") from None
    if len(data) > max_bytes:
        raise ImageRejected(f"file too large (over {max_bytes >> 20} MiB)")
    return FileBytes(data, size, mtime)


def open_tar(tar: str):
    """A tar shard opened for one sequential pass: (binary file, size, mtime). A local one through
    open_regular_file (a regular file, checked before a byte is read), a URL through fsspec.
    Raises ImageRejected."""
    if not is_url(tar):
        f, st = open_regular_file(tar, MAX_TAR_BYTES)
        return f, st.st_size, st.st_mtime
    fs, path, size, mtime = remote_stat(tar, MAX_TAR_BYTES)
    try:
        return fs.open(path, "rb", block_size=1 << 22), size, mtime
    except FileNotFoundError:
        raise ImageRejected("vanished") from None
    except Exception as e:
        raise ImageRejected(f"unreadable: {one_line(e)}") from None


@dataclass
class TarMember:
    """An image member of a tar shard: its bytes (None when refused: `reason`) and its sample's metadata,
    {"caption": the .txt} plus the fields of the .json beside it (same key)."""

    name: str
    data: bytes | None
    reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class TarBroken(Exception):
    """A shard that could not be read to its end; the members before the damage were yielded."""


def sample_key(name: str) -> tuple[str, str]:
    """A member name's webdataset key and extension: `dir/000123.seg.png` -> (`dir/000123`, `seg.png`)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower() if dot else ""


def _metadata(tar: str, name: str, data: bytes, ext: str) -> dict[str, Any]:
    """A .txt caption or a .json object's fields; anything else, or too large, or bad JSON: {} and a log line."""
    if len(data) > MAX_METADATA_BYTES:
        log.warning("ignored %s: metadata over %d KiB", member_path(tar, name), MAX_METADATA_BYTES >> 10)
        return {}
    text = data.decode("utf-8", errors="replace")
    if ext == "txt":
        return {CAPTION_KEY: text.strip()}
    try:
        value = json.loads(text)
    except ValueError as e:
        log.warning("ignored %s: not JSON (%s)", member_path(tar, name), e)
        return {}
    if not isinstance(value, dict):
        log.warning("ignored %s: not a JSON object", member_path(tar, name))
        return {}
    return value


def member_kind(info: tarfile.TarInfo) -> str:
    """What a tar member that is not a regular file is, in a few words."""
    kinds = (("symbolic link", info.issym), ("hard link", info.islnk), ("character device", info.ischr),
             ("block device", info.isblk), ("FIFO", info.isfifo))
    return next((name for name, test in kinds if test()), f"special member (type {info.type!r})")


def tar_members(tar: str, f, is_image, max_bytes: int = MAX_MEMBER_BYTES) -> Iterator[TarMember]:
    """The image members of a tar shard in one sequential pass over `f` (streaming: nothing is sought
    back, the shard is never held whole), each with its sample's caption and JSON. A member larger than
    `max_bytes` is refused from its header, before its bytes are read, and no read takes more than
    `max_bytes` of it. A link or special member with an image's name is refused (never followed).
    Members of one sample (one key) follow each other in a webdataset shard; a sample's images are
    yielded once the next key begins. A shard damaged partway raises TarBroken after the members before
    the damage."""
    images: list[TarMember] = []
    meta: dict[str, Any] = {}
    caption: dict[str, Any] = {}
    key = None

    def flush() -> list[TarMember]:
        for m in images:
            m.metadata = {**meta, **caption}
        return images

    try:
        with tarfile.open(fileobj=f, mode="r|*") as archive:
            for info in archive:
                if info.isdir():
                    continue
                k, ext = sample_key(info.name)
                if k != key:
                    yield from flush()
                    images, meta, caption, key = [], {}, {}, k
                if not info.isfile():
                    if is_image(info.name):
                        images.append(TarMember(info.name, None, f"a {member_kind(info)} in the tar, not a file"))
                    elif ext in ("txt", "json"):
                        log.warning("ignored %s: a %s, not a file", member_path(tar, info.name), member_kind(info))
                elif is_image(info.name):
                    if info.size == 0:
                        images.append(TarMember(info.name, None, "empty file"))
                    elif info.size > max_bytes:
                        images.append(TarMember(info.name, None, f"tar member too large ({info.size >> 20} MiB; "
                                                                 f"at most {max_bytes >> 20} MiB are read)"))
                    else:
                        images.append(TarMember(info.name, _read_member(archive, info, max_bytes)))
                elif ext in ("txt", "json") and info.size <= MAX_METADATA_BYTES:
                    (caption if ext == "txt" else meta).update(
                        _metadata(tar, info.name, _read_member(archive, info, MAX_METADATA_BYTES), ext))
                elif ext in ("txt", "json"):
                    log.warning("ignored %s: metadata over %d KiB", member_path(tar, info.name),
                                MAX_METADATA_BYTES >> 10)
    except (tarfile.TarError, EOFError, OSError, ValueError, ImageRejected) as e:
        yield from flush()  # the members read whole before the damage
        raise TarBroken(f"corrupt or truncated tar ({one_line(e)})") from None
    yield from flush()


def _read_member(archive: tarfile.TarFile, info: tarfile.TarInfo, max_bytes: int) -> bytes:
    """A regular member's bytes: one read of at most `max_bytes` + 1 (the header's size was checked
    against `max_bytes`; this read holds whatever the stream gives to that bound), exactly its size."""
    member = archive.extractfile(info)
    data = member.read(min(info.size, max_bytes) + 1) if member is not None else b""
    if len(data) > max_bytes:
        raise ImageRejected(f"member {info.name} is larger than its header says")
    if len(data) != info.size:
        raise EOFError(f"member {info.name} is truncated")
    return data
