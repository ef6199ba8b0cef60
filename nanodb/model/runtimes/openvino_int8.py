"""The image tower in OpenVINO, quantized to int8 by NNCF's post-training quantization.

The tower does not choose its calibration images: a scan's CLIP stage (pipeline/embed.py) gathers a
sample spread over the scan's folders and calls `calibrate`, then checks every few batches against
`floating` and calls `fall_back` when a check falls short (synthetic images calibrate it badly: cosine
0.97 to float32 on real photos). A quantized tower is kept on disk beside the converted model, and used
only if, on its calibration images, its vectors stay within INT8_MIN_COSINE of floating point; otherwise
the tower stays in floating point, and says so once. Until a quantized tower is cached, it runs in the
model's float_precision."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nanodb.model.runtimes import runtime
from nanodb.model.runtimes.openvino_float import OpenVinoImageTower

if TYPE_CHECKING:
    from nanodb.model.clip import ClipModel

log = logging.getLogger(__name__)

INT8_MIN_COSINE = 0.995


@runtime("openvino", needs=("openvino", "nncf"), preferred=True, cpu=("int8",))
class Int8ImageTower(OpenVinoImageTower):
    """The OpenVINO tower, quantized once calibrated (see the module's docstring). Compiled for
    throughput: its batches split among the CPU's streams (openvino_float.Requests)."""

    STREAMS = True

    def __init__(self, clip: ClipModel):
        super().__init__(clip)
        self.floating_only = (self.int8_folder / "refused").is_file()  # refused here or by an earlier process
        self._float_request = None

    @property
    def int8_folder(self) -> Path:
        return self.float_xml.parent.with_name(self.float_xml.parent.name + "-int8")

    def model_xml(self) -> Path:
        """The quantized tower once one is cached, else the floating-point one."""
        quantized = self.int8_folder / "model.xml"
        return quantized if quantized.is_file() else self.float_xml

    @property
    def quantized(self) -> bool:
        """Whether this tower's vectors come from the int8 model."""
        return not self.floating_only and self.model_xml() != self.float_xml

    def floating(self, pixels: np.ndarray) -> np.ndarray:
        """The features of the floating-point tower, the reference the quantized one is checked against."""
        with self._lock:
            if not self.quantized:
                return self.infer(pixels)
            if self._float_request is None:
                self._float_request = self.compile(self.float_xml)
            return self._float_request.infer(pixels)

    def fall_back(self, why: str) -> None:
        """Run in floating point from now on, in this process and (remembered on disk) in later ones."""
        with self._lock:
            self.floating_only = True
            self._request = self.compile(self.float_xml)
        with tempfile.TemporaryDirectory(dir=self.int8_folder.parent, ignore_cleanup_errors=True) as tmp:
            (Path(tmp) / "refused").write_text(why + "\n")
            self._install(Path(tmp))

    def calibrate(self, pixels: np.ndarray) -> bool:
        """Quantize the tower on `pixels` (in a child process, nanodb.model.quantize); keep it, on disk
        and here, if its vectors of those images stay within INT8_MIN_COSINE of floating point, else stay
        in floating point for good. Returns whether the tower is quantized now."""
        log.warning("calibrating the int8 image tower on %d images (seconds to a minute)", len(pixels))
        self.int8_folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.int8_folder.parent, ignore_cleanup_errors=True) as tmp:
            np.save(Path(tmp) / "inputs.npy", self.normalized(pixels))
            done = subprocess.run([sys.executable, "-m", "nanodb.model.quantize", str(self.float_xml),
                                   str(Path(tmp) / "inputs.npy"), str(Path(tmp) / "model.xml")],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=child_env())
            (Path(tmp) / "inputs.npy").unlink()
            if done.returncode:
                why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                log.warning("cannot calibrate the int8 image tower (%s): it stays in floating point", why)
                return self.quantized
            quantized = self.compile(Path(tmp) / "model.xml")
            cosine = float(cosines(quantized.infer(pixels), self.floating(pixels)).min())
            if cosine < INT8_MIN_COSINE:
                log.warning("the int8 image tower is not faithful on these images (cosine %.4f to floating point, "
                            "under %.3f): it stays in floating point", cosine, INT8_MIN_COSINE)
                self.fall_back(f"cosine {cosine:.6f} on its {len(pixels)} calibration images")
                return False
            self._install(Path(tmp))
        with self._lock:
            self._request = self.compile(self.model_xml())
        return self.quantized

    def _install(self, folder: Path) -> None:
        """Make `folder` the int8 folder, replacing any earlier one (another process may be doing so too)."""
        old = self.int8_folder.with_name(f"{self.int8_folder.name}.old-{os.getpid()}")
        try:
            if self.int8_folder.exists():
                os.replace(self.int8_folder, old)
            os.replace(folder, self.int8_folder)
        except OSError:
            if not self.int8_folder.is_dir():
                raise
        shutil.rmtree(old, ignore_errors=True)

    def normalized(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC pixels -> the float NCHW input of the converted model."""
        x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255
        mean = np.asarray(self.mean, np.float32)[None, :, None, None]
        return (x - mean) / np.asarray(self.std, np.float32)[None, :, None, None]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def child_env() -> dict[str, str]:
    """This process's environment, with nanodb importable by a child started from any directory."""
    import nanodb

    root = str(Path(nanodb.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
