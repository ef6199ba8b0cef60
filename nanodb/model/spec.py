"""What model a database embeds with (ModelSpec: the embedding space) and how this process runs it
(ModelConfig: that spec plus device, precision and backend), made once and passed to every loader."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanodb.config import Settings


class ModelLoadError(RuntimeError):
    """The model or its weights could not be loaded; the message says what to do instead."""


_digests: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file, computed once per (path, size, mtime) in this process."""
    path = os.path.abspath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """A PyTorch file (zip or legacy pickle) or a safetensors file, judged from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return True
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    return 0 < header_len < 100_000_000 and head[8:9] == b"{"


def as_pretrained(value: str) -> str:
    """A checkpoint file is remembered by absolute path; tags and 'none' as they are."""
    if value and value.lower() != "none" and (os.sep in value or os.path.isfile(value)):
        return os.path.abspath(os.path.expanduser(value))
    return "none" if not value or value.lower() == "none" else value


@dataclass(frozen=True)
class ModelSpec:
    """What identifies the embedding space of a database: model name, weights and (for random weights) seed.

    A checkpoint file is identified by a digest of its bytes, not by where it lies: the same weights
    from any path are the same model."""

    name: str
    pretrained: str  # an open_clip tag, a checkpoint file path, or "none"
    seed: int = 0

    @property
    def random_weights(self) -> bool:
        return self.pretrained.lower() in ("none", "")

    @property
    def is_file(self) -> bool:
        return not self.random_weights and (os.sep in self.pretrained or Path(self.pretrained).is_file())

    @property
    def weights_id(self) -> str:
        """Stable id of the weights: the tag, 'none@seed', or 'sha256:' and a checkpoint file's digest."""
        if self.random_weights:
            return f"none@{self.seed}"
        if self.is_file:
            if not Path(self.pretrained).is_file():
                raise ModelLoadError(f"checkpoint file not found: {self.pretrained}")
            return f"sha256:{weights_digest(self.pretrained)}"
        return self.pretrained

    def has_weights(self, weights_id: str) -> bool:
        """These are the weights `weights_id` names (also an id of nanodb before 0.2: a checkpoint's
        file name and size)."""
        if weights_id.startswith("file:") and self.is_file and Path(self.pretrained).is_file():
            p = Path(self.pretrained)
            return weights_id == f"file:{p.name}:{p.stat().st_size}"
        return self.weights_id == weights_id

    def describe(self, weights_id: str | None = None) -> str:
        """Name and weights; with `weights_id` (a file's), its digest too, to tell two files apart."""
        what = f"random weights, seed {self.seed}" if self.random_weights else self.pretrained
        if weights_id and weights_id.startswith("sha256:"):
            what += f", weights {weights_id[:19]}"
        return f"{self.name} ({what})"


@dataclass(frozen=True)
class ModelConfig:
    """The one description of a model to load: its embedding space (`spec`) and how to run it here.

    `device`, `precision` and `backend` stay as asked ('auto' included) and are resolved by the process
    that loads the model, so a Ray actor on a GPU node picks its own. They may differ between opens of a
    database; the spec may not."""

    spec: ModelSpec
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"

    @classmethod
    def from_settings(cls, settings: Settings, model: str | None = None, pretrained: str | None = None,
                      seed: int | None = None) -> ModelConfig:
        """The model the arguments name (else the settings'), run as the settings say."""
        spec = ModelSpec(model or settings.model, as_pretrained(pretrained or settings.pretrained),
                         settings.seed if seed is None else seed)
        return cls(spec, settings.device, settings.precision, settings.backend)

    def with_spec(self, spec: ModelSpec) -> ModelConfig:
        """Another model, run the same way."""
        return dataclasses.replace(self, spec=spec)
