"""Settings as data: configs/default.yaml, then an optional user YAML, then explicit overrides."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass
class Settings:
    """Every setting, typed once; the values live once, in configs/default.yaml (a key missing there is
    an error at load, not a silent second default)."""

    model: str
    pretrained: str
    seed: int
    k: int
    batch_size: int
    workers: int
    autosave_every: int
    max_image_pixels: int
    decode_seconds: float
    decode_memory_mb: int
    device: str
    precision: str
    backend: str
    settle_seconds: float
    image_tower_idle_seconds: float
    autosave_seconds: float
    compact_dead_fraction: float
    follow_symlinks: bool
    raw_pairs: str

    @property
    def decode_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


def _read_yaml(source) -> dict[str, Any]:
    data = yaml.safe_load(source) or {}
    if not isinstance(data, dict):
        raise ValueError("a nanodb config must be a YAML mapping of key: value")
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


# configs/ sits beside the package in a checkout and inside it (nanodb/configs) in a wheel.
CONFIG_DIR = next(
    (d for d in (Path(__file__).parent / "configs", Path(__file__).parent.parent / "configs") if d.is_dir()),
    Path(__file__).parent / "configs",
)


def builtin_config(name: str) -> Path:
    """Path of a config shipped in configs/ (e.g. 'default', 'test')."""
    return CONFIG_DIR / f"{name}.yaml"


def load_settings(config: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Defaults from configs/default.yaml, updated by `config` (a file or a builtin name), then `overrides`.

    Overrides that are None are ignored, so argparse values can be passed straight through.
    """
    values = _read_yaml(builtin_config("default").read_text())
    if config is not None:
        path = Path(config)
        if not path.exists() and builtin_config(str(config)).exists():
            path = builtin_config(str(config))
        try:
            values.update(_read_yaml(path.read_text()))
        except OSError as e:
            raise ValueError(f"cannot read config {config}: {e.strerror}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
