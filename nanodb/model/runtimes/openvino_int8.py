"""The image tower in OpenVINO, quantized to int8 by NNCF's post-training quantization.

It is calibrated on the first batch of at least CALIBRATION_IMAGES of the user's own images it is given
(synthetic images calibrate it badly: cosine 0.97 to float32 on real photos, against 0.9995 for photos),
then kept on disk beside the converted model. It is used only if, on those images, its vectors stay
within INT8_MIN_COSINE of floating point; otherwise the tower stays in floating point, and says so once.
Until a quantized tower is cached, batches run in the model's float_precision."""

from __future__ import annotations

import logging
import os
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

CALIBRATION_IMAGES = 16
INT8_MIN_COSINE = 0.995


@runtime("openvino", needs=("openvino", "nncf"), preferred=True, cpu=("int8",))
class Int8ImageTower(OpenVinoImageTower):
    """The OpenVINO tower, quantized once calibrated (see the module's docstring)."""

    def __init__(self, clip: ClipModel):
        super().__init__(clip)
        self.calibrating = self.model_xml() == self.float_xml and not (self.int8_folder / "refused").is_file()

    @property
    def int8_folder(self) -> Path:
        return self.float_xml.parent.with_name(self.float_xml.parent.name + "-int8")

    def model_xml(self) -> Path:
        """The quantized tower once one is cached, else the floating-point one."""
        quantized = self.int8_folder / "model.xml"
        return quantized if quantized.is_file() else self.float_xml

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.calibrating and len(pixels) >= CALIBRATION_IMAGES:
                self.calibrating = False  # one try per process, whatever happens
                self.calibrate(pixels)
            return self.infer(pixels)

    def calibrate(self, pixels: np.ndarray) -> None:
        """Quantize the tower on `pixels` (in a child process, nanodb.model.quantize); keep it, on disk
        and here, if its vectors of those images stay within INT8_MIN_COSINE of floating point."""
        log.warning("calibrating the int8 image tower on the first %d images (once per model and machine, "
                    "seconds to a minute)", len(pixels))
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
                return
            quantized = self.compile(Path(tmp) / "model.xml")
            reference = self.infer(pixels)
            cosine = float(cosines(quantized.infer({0: pixels})[0], reference).min())
            if cosine < INT8_MIN_COSINE:
                log.warning("the int8 image tower is not faithful on these images (cosine %.4f to floating point, "
                            "under %.3f): it stays in floating point", cosine, INT8_MIN_COSINE)
                for f in Path(tmp).iterdir():
                    f.unlink()
                (Path(tmp) / "refused").write_text(f"cosine {cosine:.6f}\n")
            try:
                os.replace(tmp, self.int8_folder)  # atomic: another process may be calibrating too
            except OSError:
                if not self.int8_folder.is_dir():
                    raise
        if self.model_xml() != self.float_xml:
            self._request = self.compile(self.model_xml())

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
