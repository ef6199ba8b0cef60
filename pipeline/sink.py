"""What the ingestion engine writes into: a sink that keeps vectors by file path.

The pipeline is handed a sink (nanodb's item store is one) and a model; it never imports either's
module. Everything the walker, the appender and the watcher need of the database is here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from nanodb.media.record import FileRecord


class IndexSink(Protocol):
    path: str  # the database folder: never scanned or watched

    def unchanged_files(self, files: Iterable[tuple[str, int, float]]) -> set[str]:
        """The paths among `files` ((path, size, mtime)) indexed already with that size and modification
        time: no need to decode them again. Asked per chunk of a walk (a sharded sink asks its shards)."""

    def failed_before(self, files: Iterable[tuple[str, int, float]]) -> set[str]:
        """The paths among `files` that failed to decode before with that size and modification time:
        retried only when asked."""

    def remember_failure(self, path: str, size: int, mtime: float, reason: str) -> None:
        """A file that failed to decode, with the size and mtime it had (forgotten once it is indexed);
        its items indexed with another size or mtime are dropped (they describe bytes it no longer holds)."""

    def indexed_paths(self) -> list[str]:
        """The paths of every live item (a rescan drops the ones gone from their folder)."""

    def add_files(self, files: Sequence[FileRecord], vectors: np.ndarray | None) -> tuple[int, int]:
        """Add embedded files, replacing earlier items of the same paths; returns (added, updated).
        A file whose content is stored already gets that vector (`vectors` None: all are)."""

    def has_content(self, content_hash: bytes) -> bool:
        """A file with these exact bytes has a stored vector: it need not be embedded."""

    def metadata_of_content(self, content_hash: bytes) -> dict | None:
        """The metadata of the stored item with these exact bytes (its EXIF date: a copy's too), None
        when no item has them."""

    def add_known_file(self, file: FileRecord) -> int | None:
        """Index a file whose exact bytes are known with their stored vector; None if they are not."""

    def move_paths(self, moves: Iterable[tuple[str, str]]) -> int:
        """Re-point items to new file paths without re-embedding; returns how many moved."""

    def move_folder(self, old: str, new: str) -> int:
        """Re-point every item under folder `old` to the same place under `new`."""

    def forget(self, paths: Iterable[str]) -> int:
        """Drop the items of these files, and of every file under those that are folders."""

    @property
    def unsaved(self) -> int:
        """Changes not committed yet (the appender autosaves once there are enough)."""

    def save(self) -> bool:
        """Commit; raises on failure (a full disk) with everything kept in memory."""


class EmbeddingModel(Protocol):
    """What the CLIP stage needs of a model: uint8 model-input pixels in, unit vectors out."""

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...
