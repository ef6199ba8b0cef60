"""The image-tower runtimes: one file each in this folder, registered by name with `runtime`.

A runtime turns uint8 model-input pixels (N, H, W, 3) into image features (N, dim) (the ImageTower
protocol). Each declares its backend name (the --backend choices), the precisions it runs on each
device (the --precision choices), the modules it needs installed, and whether 'auto' prefers it. Every
module in this folder is imported here, so adding a runtime is adding its file."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from typing import TYPE_CHECKING, Protocol

import numpy as np

from nanodb.model.spec import ModelLoadError

if TYPE_CHECKING:
    from nanodb.model.clip import ClipModel


class ImageTower(Protocol):
    """uint8 model-input pixels (N, H, W, 3) -> float32 image features (N, dim), not yet unit length."""

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Runtime:
    backend: str
    precisions: dict[str, tuple[str, ...]]  # device -> the precisions it runs there
    needs: tuple[str, ...]  # modules that must be installed (pip names)
    preferred: bool  # 'auto' takes it before the others where it can run
    build: Callable[[ClipModel], ImageTower]

    def runs(self, precision: str, device: str) -> bool:
        return precision in self.precisions.get(device, ())

    def missing(self) -> list[str]:
        return [m for m in self.needs if find_spec(m) is None]


_registry: list[Runtime] = []


def runtime(backend: str, *, needs: tuple[str, ...] = (), preferred: bool = False, **precisions: tuple[str, ...]):
    """Register the decorated ImageTower factory (called with the ClipModel) as a runtime; keyword
    arguments name devices and the precisions it runs on each, e.g. cpu=("float32", "bfloat16")."""

    def register(build):
        for device, names in precisions.items():
            for name in names:
                if any(r.backend == backend and r.runs(name, device) for r in _registry):
                    raise ValueError(f"two runtimes of backend {backend} run precision {name} on {device}")
        _registry.append(Runtime(backend, precisions, needs, preferred, build))
        return build

    return register


def registered() -> list[Runtime]:
    """Every runtime, the preferred ones first."""
    return sorted(_registry, key=lambda r: not r.preferred)


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product units (AVX512-BF16 or AMX), from the Linux cpuinfo flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch finds no CUDA GPU")
    return device


def _device_name(device: str) -> str:
    return {"cpu": "a CPU", "cuda": "a CUDA GPU"}.get(device, device)


def _alternatives(device: str, runtimes: list[Runtime]) -> str:
    names = [p for p in PRECISIONS[1:] if any(r.runs(p, device) for r in runtimes)]
    return " or ".join(names) or "another device"


def resolve_precision(precision: str, device: str) -> str:
    """'auto' is float16 on a GPU, bfloat16 on a CPU with bfloat16 units, float32 elsewhere; any other
    must be run on `device` by some runtime."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "float16" if device == "cuda" else "bfloat16" if cpu_has_bfloat16() else "float32"
    if not any(r.runs(precision, device) for r in _registry):
        where = sorted({d for r in _registry for d in r.precisions if r.runs(precision, d)})
        raise ModelLoadError(f"precision {precision} runs on {' or '.join(map(_device_name, where))}; "
                             f"on {_device_name(device)} use {_alternatives(device, _registry)}")
    return precision


def float_precision(precision: str, device: str) -> str:
    """The floating-point arithmetic for what `precision` leaves in floating point (an int8 model's text
    tower, its unquantized layers, its image tower until calibrated): the precision itself when it is a
    float format, else the device's 'auto' one."""
    return precision if "float" in precision else resolve_precision("auto", device)


def runtimes_for(backend: str, device: str, precision: str) -> list[Runtime]:
    """The installed runtimes that may run the image tower, best first ('auto': every backend's); raises
    ModelLoadError saying what to change or install when there is none."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    named = [r for r in registered() if backend in ("auto", r.backend)]
    if backend != "auto" and not any(d == device for r in named for d in r.precisions):
        others = sorted({r.backend for r in _registry if r.precisions.get(device)})
        raise ModelLoadError(f"backend {backend} does not run on {_device_name(device)}; "
                             f"use backend {' or '.join(others)} with --device {device}")
    able = [r for r in named if r.runs(precision, device)]
    if not able:
        backends = sorted({r.backend for r in _registry if r.runs(precision, device)})
        raise ModelLoadError(f"precision {precision} runs on the {' or '.join(backends)} backend; "
                             f"with {backend} use {_alternatives(device, named)}")
    installed = [r for r in able if not r.missing()]
    if not installed:
        missing = able[0].missing()
        raise ModelLoadError(f"backend {able[0].backend} with precision {precision} needs {', '.join(missing)}: "
                             f"pip install {' '.join(missing)} (or use another backend or precision)")
    return installed


def resolve_backend(backend: str, device: str, precision: str = "float32") -> str:
    """'auto' is the preferred runtime that runs `precision` on `device` and is installed (OpenVINO for
    the image tower on a CPU when it is installed), torch otherwise."""
    return runtimes_for(backend, device, precision)[0].backend


def _widest_first(precision: str) -> tuple[int, str]:
    bits = re.search(r"\d+$", precision)
    return -int(bits.group()) if bits else 0, precision


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

PRECISIONS = ("auto", *sorted({p for r in _registry for ps in r.precisions.values() for p in ps}, key=_widest_first))
BACKENDS = ("auto", *sorted({r.backend for r in _registry}))
