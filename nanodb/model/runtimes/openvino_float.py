"""The image tower converted to OpenVINO, on the CPU in float32 or bfloat16 (its matrix kernels use the
CPU's bfloat16 units; torch's bfloat16 autocast gains less, see benchmarks/RESULTS.md)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nanodb.model.announce import announced
from nanodb.model.runtimes import runtime

if TYPE_CHECKING:
    from nanodb.model.clip import ClipModel

INFERENCE_HINTS = {"bfloat16": "bf16", "float32": "f32"}


def cache_dir() -> Path:
    """Where converted models are kept: $NANODB_CACHE, else ~/.cache/nanodb."""
    if os.environ.get("NANODB_CACHE"):
        return Path(os.environ["NANODB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanodb"


@runtime("openvino", needs=("openvino",), preferred=True, cpu=("float32", "bfloat16"))
class OpenVinoImageTower:
    """The model's image tower converted to OpenVINO, with the scaling and normalisation folded into
    the graph: uint8 pixels (N, H, W, 3) in, features out. The conversion (seconds to a minute) is
    cached on disk per model, weights and OpenVINO version; compiling the cached model is quick."""

    STREAMS = False  # compile for throughput: a batch split among the CPU's streams (see Requests)

    def __init__(self, clip: ClipModel):
        import openvino as ov

        self.setup(converted_tower(clip, ov), clip.preprocessing.mean, clip.preprocessing.std, clip.float_precision)

    @classmethod
    def converted(cls, float_xml: Path, mean, std, float_precision: str) -> OpenVinoImageTower:
        """The tower a process that loaded the model converted (`float_xml`), run without the model:
        the same vectors as the tower made from the model, with these pixel statistics and precision."""
        tower = cls.__new__(cls)
        tower.setup(float_xml, mean, std, float_precision)
        return tower

    def setup(self, float_xml: Path, mean, std, float_precision: str) -> None:
        """Run the converted tower `float_xml` on pixels of these statistics, in this precision."""
        import openvino as ov

        self._ov = ov
        self.mean, self.std = mean, std
        self._lock = threading.Lock()  # one infer request, used by one thread at a time
        self._float_hint = INFERENCE_HINTS[float_precision]
        self.float_xml = float_xml
        self._request = self.compile(self.model_xml())

    def model_xml(self) -> Path:
        """The converted model this tower runs."""
        return self.float_xml

    def compile(self, model_xml: Path) -> Requests:
        """Infer requests for the model at `model_xml` (float input) taking uint8 NHWC pixels."""
        ov = self._ov
        ppp = ov.preprocess.PrePostProcessor(ov.Core().read_model(model_xml))
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([255 * m for m in self.mean]).scale(
            [255 * s for s in self.std]
        )
        config = {"INFERENCE_PRECISION_HINT": self._float_hint}
        if self.STREAMS:
            config["PERFORMANCE_HINT"] = "THROUGHPUT"
        return Requests(ov.Core().compile_model(ppp.build(), "CPU", config))

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        return self._request.infer(pixels)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.infer(pixels)


class Requests:
    """A compiled model's infer requests, one per stream. Compiled for throughput, OpenVINO runs a few
    streams of a thread or more each (two of one thread on two cores): a batch is split among them and
    its parts run at once. Compiled for latency (its default), one request runs every thread in
    lockstep, and one thread held up by another process on its core stalls them all: under load, an
    int8 scan ran 32.2 images/s in two streams against 29.5 in one request (benchmarks/RESULTS.md)."""

    def __init__(self, compiled):
        streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [compiled.create_infer_request() for _ in range(max(1, streams))]

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, 3) -> features (N, dim)."""
        parts = np.array_split(pixels, min(len(self._requests), len(pixels)) or 1)
        if len(parts) == 1:
            return self._requests[0].infer({0: pixels})[0].copy()
        for request, part in zip(self._requests, parts, strict=False):
            request.start_async({0: part})
        out = []
        for request, _ in zip(self._requests, parts, strict=False):
            request.wait()
            out.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(out)


def converted_tower(clip: ClipModel, ov) -> Path:
    """The image tower as OpenVINO IR (model.xml + model.bin), converted now if not cached."""
    import torch

    spec = clip.spec
    weights = spec.weights_id
    if spec.is_file:  # a checkpoint rewritten in place keeps its name and maybe its size
        weights += f":{Path(spec.pretrained).stat().st_mtime_ns}"
    key = hashlib.sha256(f"{spec.name}|{weights}|{ov.__version__}|{torch.__version__}".encode()).hexdigest()[:16]
    folder = cache_dir() / "openvino" / f"{spec.name}-{key}"
    if not (folder / "model.xml").is_file():
        h, w = clip.preprocessing.size
        with announced(f"converting the image tower of {spec.name} to OpenVINO (once)"), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit tracing's deprecation notices, for this call only
            converted = ov.convert_model(
                clip.model.visual, example_input=torch.zeros(1, 3, h, w), input=[ov.PartialShape([-1, 3, h, w])]
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, ignore_cleanup_errors=True) as tmp:
            ov.save_model(converted, Path(tmp) / "model.xml", compress_to_fp16=False)
            try:
                os.replace(tmp, folder)  # atomic: another process may be converting the same model
            except OSError:
                if not (folder / "model.xml").is_file():
                    raise
    return folder / "model.xml"
