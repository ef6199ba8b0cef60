"""What nanodb keeps of a file besides its vector, and the one content hash.

A `FileRecord` is the only form in which a file's record travels: from a decode worker (or a Ray task)
through the pipeline to the sink, and into the item store's table. The content hash identifies a file's
bytes (identical files share a vector, a watcher recognises a moved file, the server checks that a file
is still the one indexed); stored databases depend on it, so it stays blake2b-128 of the bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

NO_SIZE = -1  # the size recorded for an item added without a file (a vector, a PIL image)


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """One item's record. `path` is None for an item added without a file or label; `hash` is the content
    hash of the file's bytes, or of the added vector's (or pixels') bytes for an item without a file."""

    path: str | None
    hash: bytes
    size: int = NO_SIZE
    mtime: float = 0.0
    metadata: dict[str, Any] | None = None


def content_hash(data: bytes | bytearray | memoryview | Iterable[bytes]) -> bytes:
    """blake2b-128 of some bytes, given whole or as successive chunks (a file read piece by piece)."""
    digest = hashlib.blake2b(digest_size=16)
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        digest.update(chunk)
    return digest.digest()
