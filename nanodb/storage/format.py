"""The database folder: append-only binary files committed by an atomically replaced manifest.

Layout of a database folder (format version 2)::

    nanodb.json           manifest: model, dim, committed item count and byte lengths, generation
    vectors.G.f16         float16 vectors, row i is item i (count x dim, little-endian)
    codes.G.u8            the compact copy searched first: 8-bit codes of each row (count x dim, see
                          nanodb.storage.index.quantize_rows)
    scales.G.f32          per row of the compact copy: its step and two error bounds (count x 3 float32)
    items.G.bin           fixed-size item records (ITEM_DTYPE): size, mtime, content hash, offsets
    paths.G.bin           file paths, os.fsencode()d bytes, concatenated
    meta.G.jsonl          per-item JSON metadata (only for items that have some), concatenated
    deleted.G.bin         int64 indices of deleted items (tombstones)
    .lock                 the pid of the one process that has the database open for writing (which
                          holds an flock on the folder itself)

G is the generation, bumped when a compaction rewrites the files without deleted items. A version 1
folder (no compact copy) opens as is: its compact copy is computed at opening and written by the next
save, which commits version 2.

A save appends what was added since the last save to each file (at the committed length, which
overwrites anything a crashed save left behind), fsyncs, then replaces nanodb.json. So a save costs
time in proportion to the new items, and a kill at any moment leaves the last committed manifest
pointing at complete data. Opening maps the vectors, their compact copy and the item table (read
on demand, pages shared with the page cache; a compact copy over 64 MiB is then read into memory by
a background thread, as the fast pass scans it faster there) and reads the paths, metadata and
deletions with one binary read each: no per-item parsing.

Damage detection: each file's CRC-32 is in the manifest. A file of at most VERIFY_AT_OPEN_BYTES is
checked when the database opens (a damaged one is refused, naming it); a larger one (from about 65K
vectors at dim 512) is checked by a background thread right after (FileCheck), so opening 10M
vectors stays under a second. Until that check has passed, a save that rewrites every byte (a
compaction) waits for it; once it has failed, searches and saves raise the DatabaseError naming the
file, and `--validate` waits for the check and reports it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import stat
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanodb.storage.index import quantize_rows

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
VERIFY_AT_OPEN_BYTES = 64 << 20  # larger files are checked after opening (at ~2 GB/s: ~30 ms each)
CHECK_CHUNK = 8 << 20
MANIFEST = "nanodb.json"
DATA_FILES = ("vectors", "items", "paths", "meta", "deleted", "codes", "scales")
COMPACT_FILES = ("codes", "scales")  # added by format version 2
SCALES_BYTES = 12  # bytes per row of scales.G.f32
LOCK = ".lock"

ITEM_DTYPE = np.dtype(
    [
        ("path_off", "<u8"),
        ("path_len", "<u4"),
        ("meta_len", "<u4"),
        ("meta_off", "<u8"),
        ("size", "<i8"),  # file size in bytes, -1 for items added from memory
        ("mtime", "<f8"),  # file modification time (seconds), 0 for items added from memory
        ("hash", "V16"),  # blake2b-128 of the file's bytes (or of the vector for added items)
    ]
)


class DatabaseError(RuntimeError):
    """A database folder that cannot be opened or written; the message names the file and the fix."""


@dataclass
class Manifest:
    model: str
    pretrained: str
    weights_id: str
    seed: int
    dim: int
    count: int = 0
    generation: int = 0
    paths_bytes: int = 0
    meta_bytes: int = 0
    deleted: int = 0
    saved_at: float = 0.0
    version: int = FORMAT_VERSION
    dtype: str = "float16"
    # How the model computed the vectors (ClipModel.precision_id); any precision can search them.
    precision: str = "float32/torch"
    compact: int = 0  # rows whose compact copy (codes, scales) is committed: count, or 0 before version 2
    # CRC-32 of the committed bytes of each data file, extended at each save (cost ~ new bytes), so a
    # corrupted file is caught at opening. None when a writer did not record them (then not checked).
    checksums: dict[str, int] | None = field(default_factory=lambda: dict.fromkeys(DATA_FILES, 0))

    def file(self, root: Path, kind: str) -> Path:
        ext = {"vectors": "f16", "items": "bin", "paths": "bin", "meta": "jsonl", "deleted": "bin",
               "codes": "u8", "scales": "f32"}[kind]
        return root / f"{kind}.{self.generation}.{ext}"



def read_manifest(root: Path) -> Manifest | None:
    """The committed manifest, None if the folder holds no database."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DatabaseError(f"{path} is corrupted ({e}); {REPAIR_HINT}") from None
    if not isinstance(data, dict):
        raise DatabaseError(f"{path} is corrupted (not a JSON object); {REPAIR_HINT}")
    version = data.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise DatabaseError(
            f"{path} was written by a newer nanodb (format version {version}); this nanodb reads version "
            f"{FORMAT_VERSION}: upgrade nanodb"
        )
    if version == 1 and isinstance(data.get("checksums"), dict):  # no compact copy yet: none committed
        data["checksums"] = {**dict.fromkeys(COMPACT_FILES, 0), **data["checksums"]}
    if version not in (1, FORMAT_VERSION):
        raise DatabaseError(f"{path} has an unknown format version {version!r}; {REPAIR_HINT}")
    data["version"] = FORMAT_VERSION  # written as version 2 by the next save
    try:
        manifest = Manifest(**data)
    except TypeError as e:
        raise DatabaseError(f"{path} is not a nanodb manifest ({e}); {REPAIR_HINT}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DatabaseError(f"{path} is corrupted ({problem}); {REPAIR_HINT}")
    return manifest


REPAIR_HINT = "run `nanodb --path DB --repair` to keep what is consistent, then rescan your folders"


def _manifest_problem(m: Manifest) -> str | None:
    """What is wrong with a parsed manifest's fields, if anything."""
    for name in ("model", "pretrained", "weights_id"):
        if not isinstance(getattr(m, name), str):
            return f"{name} is not a string"
    for name in ("seed", "dim", "count", "generation", "paths_bytes", "meta_bytes", "deleted", "compact"):
        value = getattr(m, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name} is not a non-negative whole number"
    if m.dim == 0:
        return "dim is 0"
    if m.deleted > m.count:
        return "more deleted items than items"
    if m.compact not in (0, m.count):
        return "compact is neither 0 nor count"
    if m.checksums is not None and (
        not isinstance(m.checksums, dict)
        or set(m.checksums) != set(DATA_FILES)
        or not all(isinstance(v, int) for v in m.checksums.values())
    ):
        return "checksums are malformed"
    return None


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest: the commit point of a save."""
    manifest.saved_at = time.time()
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest.__dict__, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)


def fsync_dir(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_exact(
    path: Path, nbytes: int, into: memoryview | None = None, checksum: int | None = None
) -> bytes | memoryview:
    """Read the first `nbytes` of a data file, or fail naming the file: never a silent partial load.
    With `checksum`, the bytes must have that CRC-32 (a corrupted file is refused, not loaded)."""
    try:
        with open(path, "rb") as f:
            if into is not None:
                got = f.readinto(into) if nbytes else 0
                data = into
            else:
                data = f.read(nbytes)
                got = len(data)
    except FileNotFoundError:
        if nbytes == 0:
            return b"" if into is None else into
        raise DatabaseError(f"{path} is missing; the database is damaged: {REPAIR_HINT}") from None
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror}") from None
    _check_got(path, got, nbytes)
    if checksum is not None and zlib.crc32(data) != checksum:
        raise _corrupted(path)
    return data


def check_length(path: Path, nbytes: int) -> None:
    """Fail naming the file unless it holds at least its `nbytes` committed bytes (before mapping it)."""
    try:
        got = path.stat().st_size
    except FileNotFoundError:
        if nbytes == 0:
            return
        raise DatabaseError(f"{path} is missing; the database is damaged: {REPAIR_HINT}") from None
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror}") from None
    _check_got(path, got, nbytes)


def _check_got(path: Path, got: int, nbytes: int) -> None:
    if got < nbytes:
        raise DatabaseError(
            f"{path} is truncated ({got} of {nbytes} committed bytes); the database is damaged: {REPAIR_HINT}"
        )


def _corrupted(path: Path) -> DatabaseError:
    return DatabaseError(f"{path} is corrupted (its checksum does not match); {REPAIR_HINT}")


def file_crc(fd: int, nbytes: int, stop: threading.Event | None = None) -> int | None:
    """CRC-32 of the first `nbytes` of an open file, read in chunks (never mapped: the pages read are
    not counted in this process's memory). None when `stop` was set first."""
    crc, buf = 0, bytearray(min(CHECK_CHUNK, max(nbytes, 1)))
    view = memoryview(buf)
    offset = 0
    while offset < nbytes:
        if stop is not None and stop.is_set():
            return None
        got = os.preadv(fd, [view[: min(len(buf), nbytes - offset)]], offset)
        if got == 0:
            break  # shorter than committed: cannot match
        crc = zlib.crc32(view[:got], crc)
        offset += got
    return crc


def verify_file(path: Path, nbytes: int, checksum: int) -> None:
    """Refuse a data file whose first `nbytes` do not have CRC-32 `checksum`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if nbytes == 0:
            return
        raise DatabaseError(f"{path} is missing; the database is damaged: {REPAIR_HINT}") from None
    try:
        if file_crc(fd, nbytes) != checksum:
            raise _corrupted(path)
    finally:
        os.close(fd)


class FileCheck:
    """The checksums of big data files, checked by a background thread after opening.

    The files are opened at once, so a compaction that deletes them meanwhile changes nothing. `error`
    is the DatabaseError naming the first corrupted file, once found."""

    def __init__(self, files: list[tuple[Path, int, int]]):
        self.error: DatabaseError | None = None
        self._stop = threading.Event()
        self._open: list[tuple[Path, int, int, int]] = []
        try:
            for path, nbytes, checksum in files:
                self._open.append((path, os.open(path, os.O_RDONLY), nbytes, checksum))
        except OSError:
            self._close_all()
            raise
        self._thread = threading.Thread(target=self._run, name="nanodb-checksums", daemon=True)
        if self._open:
            self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            for path, fd, nbytes, checksum in self._open:
                crc = file_crc(fd, nbytes, self._stop)
                if crc is None:
                    return
                if crc != checksum:
                    self.error = _corrupted(path)
                    log.error("%s", self.error)
                    return
            log.info("checksums of %d big files verified in %.1f s", len(self._open), time.perf_counter() - started)
        except OSError as e:
            self.error = DatabaseError(f"cannot read {path} to verify it: {e.strerror}")
            log.error("%s", self.error)
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for _, fd, _, _ in self._open:
            try:
                os.close(fd)
            except OSError:
                pass
        self._open = []

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Block until every file is checked; raise the DatabaseError of a corrupted one."""
        if self._thread.ident is not None:
            self._thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()


class Chunks:
    """A data file's bytes made piece by piece when iterated (each time anew), so a compaction of 10M
    rows never holds a second copy of the vectors: see ItemStore's compaction."""

    def __init__(self, make: Callable[[], object]):
        self._make = make

    def __iter__(self):
        return iter(self._make())


def pieces(data) -> list | Chunks:
    """The byte pieces of `data`: a bytes-like object is one piece."""
    return data if isinstance(data, Chunks) else [data]


def crc_of(data, crc: int = 0) -> int:
    """CRC-32 of `data` (bytes-like or Chunks), continued from `crc`."""
    for piece in pieces(data):
        crc = zlib.crc32(memoryview(piece).cast("B"), crc)
    return crc


def append_at(path: Path, offset: int, data: bytes | memoryview | Chunks) -> None:
    """Write `data` at `offset` (the committed length), drop anything after it, and fsync."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        end = offset
        for piece in pieces(data):
            view = memoryview(piece).cast("B")
            end += len(view)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        os.ftruncate(fd, end)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace a data file (fsynced), never rewriting it in place: a process that has it
    mapped keeps the old bytes (shrinking a mapped file would crash that process)."""
    tmp = path.with_name(path.name + ".tmp")
    append_at(tmp, 0, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class WriteLock:
    """An exclusive flock on the database folder itself, so two writers never interleave their saves.

    The lock is taken on the folder's own file descriptor: deleting `.lock` (which only records the
    holder's pid, for the error message) cannot let a second writer in."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise DatabaseError(f"cannot open the database folder {self.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseError(
                f"{self.root} is open for writing by another process (pid {self._holder()}); "
                "stop it first, or open this one read-only"
            ) from None
        try:
            self._record_pid()
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _holder(self) -> str:
        try:
            return self.path.read_bytes()[:32].decode(errors="replace").strip() or "?"
        except OSError:
            return "?"

    def _record_pid(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise DatabaseError(
                    f"cannot open {self.root} for writing ({e.strerror}: {self.path}); "
                    "open it read-only (--read-only) to search it"
                ) from None
            raise DatabaseError(f"cannot create {self.path}: {e.strerror}") from None
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@dataclass
class RepairReport:
    """What `repair` kept of a damaged database."""

    committed: int  # items the old manifest committed (or rows found in the files, if it was unreadable)
    kept: int  # the longest consistent prefix, now committed
    deleted: int  # tombstones, those of damaged paths included
    manifest_rebuilt: bool  # the manifest was unreadable and was rebuilt from the data files
    damaged_paths: int = 0  # items whose stored path could not be trusted, now deleted

    def summary(self) -> str:
        how = "rebuilt the manifest from the data files; " if self.manifest_rebuilt else ""
        lost = self.committed - self.kept
        doubtful = self.damaged_paths
        return (
            f"repair: {how}kept {self.kept} of {self.committed} items"
            + (f" ({lost} damaged items dropped)" if lost else "")
            + (f"; deleted {doubtful} item{'s' if doubtful != 1 else ''} with a damaged path" if doubtful else "")
            + "; rescan your folders to add back anything missing"
        )


def repair(root: Path, fallback: Callable[[], Manifest]) -> RepairReport:
    """Commit the longest consistent prefix of the items in the data files.

    An item is consistent when its record points inside the path and metadata files, its metadata
    parses, and its vector is finite and unit length. The manifest is kept if readable (nothing past
    its committed count is resurrected), else rebuilt from `fallback()` (model and dim) and the data
    files of the latest generation. The compact copy is rebuilt from the kept vectors. When the paths
    file cannot be vouched for (its checksum does not match, or there is none), the items whose path
    is in doubt are deleted (see `doubtful_paths`), so that a rescan adds their files back once
    instead of beside a garbled ghost. The caller holds the write lock.
    """
    try:
        committed = read_manifest(root)
    except DatabaseError:
        committed = None
    rebuilt = committed is None
    m = fallback() if rebuilt else Manifest(**committed.__dict__)
    if rebuilt:
        m.generation = max((int(p.name.split(".")[1]) for p in root.glob("vectors.*.f16")
                            if p.name.split(".")[1].isdigit()), default=0)
    files = {kind: m.file(root, kind) for kind in DATA_FILES}
    raw = {kind: files[kind].read_bytes() if files[kind].exists() else b"" for kind in DATA_FILES}
    rows = min(len(raw["vectors"]) // (m.dim * 2), len(raw["items"]) // ITEM_DTYPE.itemsize)
    if not rebuilt:
        rows = min(rows, m.count)
    vectors = np.frombuffer(raw["vectors"], "<f2", rows * m.dim).reshape(rows, m.dim).astype(np.float32)
    items = np.frombuffer(raw["items"], ITEM_DTYPE, rows)
    path_end = items["path_off"].astype(np.uint64) + items["path_len"]
    meta_end = items["meta_off"].astype(np.uint64) + items["meta_len"]
    norms = np.linalg.norm(vectors, axis=1)
    ok = (path_end <= len(raw["paths"])) & (meta_end <= len(raw["meta"])) & (np.abs(norms - 1) < 0.01)
    for i in np.flatnonzero(ok & (items["meta_len"] > 0)):
        try:
            ok[i] = isinstance(json.loads(raw["meta"][int(items["meta_off"][i]) : int(meta_end[i])]), dict)
        except ValueError:
            ok[i] = False
    kept = int(np.argmin(ok)) if not ok.all() else rows
    deleted = np.frombuffer(raw["deleted"], "<i8", len(raw["deleted"]) // 8)
    if not rebuilt:
        deleted = deleted[: m.deleted]
    deleted = np.unique(deleted[(deleted >= 0) & (deleted < kept)]).astype("<i8")
    crc = committed.checksums if committed else None
    paths_intact = crc is not None and len(raw["paths"]) >= committed.paths_bytes and (
        zlib.crc32(raw["paths"][: committed.paths_bytes]) == crc["paths"]
    )
    doubtful = [] if paths_intact else doubtful_paths(items[:kept], raw["paths"], deleted)
    deleted = np.union1d(deleted, np.asarray(doubtful, "<i8")).astype("<i8")

    codes, scales = quantize_rows(np.frombuffer(raw["vectors"], "<f2", kept * m.dim).reshape(kept, m.dim))
    m.count, m.deleted, m.compact = kept, len(deleted), kept
    m.paths_bytes = int(path_end[:kept].max()) if kept else 0
    m.meta_bytes = int(meta_end[:kept].max()) if kept else 0
    committed_bytes = {
        "vectors": raw["vectors"][: kept * m.dim * 2],
        "items": raw["items"][: kept * ITEM_DTYPE.itemsize],
        "paths": raw["paths"][: m.paths_bytes],
        "meta": raw["meta"][: m.meta_bytes],
        "deleted": deleted.tobytes(),
        "codes": codes.tobytes(),
        "scales": scales.astype("<f4").tobytes(),
    }
    for kind in ("deleted", *COMPACT_FILES):  # new files: a reader may have the old ones mapped
        replace_file(files[kind], committed_bytes[kind])
    m.checksums = {kind: zlib.crc32(data) for kind, data in committed_bytes.items()}
    if rebuilt and (root / MANIFEST).exists():
        os.replace(root / MANIFEST, root / (MANIFEST + ".damaged"))
    write_manifest(root, m)
    return RepairReport(committed.count if committed else rows, kept, len(deleted), rebuilt, len(doubtful))


def doubtful_paths(items: np.ndarray, paths: bytes, deleted: np.ndarray) -> list[int]:
    """The live items of files whose stored path a damaged paths file leaves in doubt.

    A path is trusted when it is a clean absolute path (NUL-free, normalised, as scans store them)
    and either its file is there with the recorded size and mtime, or it lies in a missing folder
    that holds other items' files too (an unmounted disk, a moved folder: nothing to decide now).
    Any other item has a garbled path, or its file is gone or changed (which a rescan would drop or
    re-embed anyway): deleting it loses nothing a rescan does not bring back. Of several items with
    one path, only the last that matches its file is trusted. Items added from memory carry a label,
    not a file path: nothing to check it against and nothing would re-add them, so they are kept.
    """
    live = np.ones(len(items), bool)
    live[deleted] = False
    rows_of: dict[bytes, list[int]] = {}
    for i in np.flatnonzero(live & (items["size"] >= 0) & (items["path_len"] > 0)):
        off = int(items["path_off"][i])
        rows_of.setdefault(paths[off : off + int(items["path_len"][i])], []).append(int(i))
    doubtful: list[int] = []
    in_missing: dict[bytes, list[int]] = {}  # first missing component of a path -> rows
    exists = functools.cache(os.path.lexists)
    for path, rows in rows_of.items():
        if not path.startswith(b"/") or b"\0" in path or os.path.normpath(path) != path:
            doubtful += rows
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None
        matching = [i for i in rows if st is not None and stat.S_ISREG(st.st_mode)
                    and st.st_size == items["size"][i] and st.st_mtime == items["mtime"][i]]
        if matching:
            doubtful += [i for i in rows if i != matching[-1]]
        elif st is None and len(rows) == 1:
            missing, parent = path, os.path.dirname(path)
            while parent != missing and not exists(parent):
                missing, parent = parent, os.path.dirname(parent)
            in_missing.setdefault(missing, []).append(rows[0])
        else:
            doubtful += rows
    doubtful += [rows[0] for rows in in_missing.values() if len(rows) == 1]
    return sorted(doubtful)


def committed_lengths(m: Manifest) -> dict[str, int]:
    """The committed byte length of each data file."""
    return {
        "vectors": m.count * m.dim * 2,
        "items": m.count * ITEM_DTYPE.itemsize,
        "paths": m.paths_bytes,
        "meta": m.meta_bytes,
        "deleted": m.deleted * 8,
        "codes": m.compact * m.dim,
        "scales": m.compact * SCALES_BYTES,
    }


def check_unchanged(root: Path, committed: Manifest) -> None:
    """Refuse to write when the manifest on disk is not the one this process committed last: another
    process saved meanwhile (the lock was bypassed), and writing now would destroy what it saved."""
    try:
        on_disk = read_manifest(root)
    except DatabaseError as e:
        raise DatabaseError(f"refusing to save: {e}") from None
    if on_disk is None or on_disk.__dict__ != committed.__dict__:
        raise DatabaseError(
            f"refusing to save to {root}: another process changed it since this one opened it; nothing was "
            "written: reopen the database and add your changes again"
        )


def commit_append(root: Path, committed: Manifest, new: Manifest, appended: dict[str, bytes | memoryview]) -> None:
    """A save: append to each data file at its committed length (overwriting what a crashed save left
    there), extend the checksums, fsync, then replace the manifest, the commit point. Refused before
    anything is written when another process committed since `committed`."""
    check_unchanged(root, committed)
    if committed.checksums is not None:
        new.checksums = {
            kind: zlib.crc32(memoryview(appended[kind]).cast("B"), committed.checksums[kind]) for kind in DATA_FILES
        }
    lengths = committed_lengths(committed)
    for kind in DATA_FILES:
        append_at(committed.file(root, kind), lengths[kind], appended[kind])
    write_manifest(root, new)


def commit_generation(root: Path, committed: Manifest, new: Manifest,
                      data: dict[str, bytes | memoryview | Chunks]) -> None:
    """A compaction: write every data file of `new.generation` from scratch, fsynced, then replace the
    manifest. Files left by a compaction that crashed before its manifest are simply overwritten; the
    old generation stays committed until the manifest names the new one. Refused, like commit_append,
    when another process committed since `committed`."""
    check_unchanged(root, committed)
    new.checksums = {kind: crc_of(data[kind]) for kind in DATA_FILES}
    for kind in DATA_FILES:
        append_at(new.file(root, kind), 0, data[kind])
    write_manifest(root, new)


def remove_other_generations(root: Path, generation: int) -> None:
    """Delete data files of generations other than the committed one: the old files of a finished
    compaction, or the partial files of one that crashed. Called only with the write lock held."""
    for kind in DATA_FILES:
        for path in root.glob(f"{kind}.*.*"):
            parts = path.name.split(".")
            if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) != generation:
                path.unlink(missing_ok=True)
