"""The image tower for a query image in a fresh process, without torch or open_clip: the OpenVINO
conversion that the process which loaded the model ran (runtimes/openvino_float.py), found again.

Building the model for one query image takes seconds to tens of seconds (torch, open_clip, the weights);
the converted tower compiles in under a second. A process that runs the image tower in OpenVINO records
where its conversion lies and the model's pixel steps in `cache_dir()/image/<model>-<key>.json` (the key
made as the text export's: model, weights, nanodb version, record format, OpenVINO version). A later
process uses it for a query image's vector only where it computes what the model would, in this
process and in the database's scans: the runtime and precision this process would run the tower in
(OpenVINO, float32 or bfloat16, on a CPU) are those the database's vectors were computed with (its
manifest's `precision`, e.g. 'bfloat16/openvino'), the weights are the database's, and the pixel steps
are open_clip's usual resize and centre crop (done in Pillow, model/preprocess.py). Anywhere else the
model is loaded, as before."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import nanodb
from nanodb.model.announce import announced
from nanodb.model.preprocess import Preprocessing, ResizeCenterCrop
from nanodb.model.runtimes import resolve_precision, runtimes_for
from nanodb.model.runtimes.openvino_float import INFERENCE_HINTS, OpenVinoImageTower, cache_dir
from nanodb.model.spec import ModelConfig, ModelLoadError, ModelSpec
from nanodb.model.text_export import unit_rows, weights_key

if TYPE_CHECKING:
    from nanodb.model.clip import ClipModel

log = logging.getLogger(__name__)

RECORD_FORMAT = 1  # raised when what a record holds changes


def record_file(spec: ModelSpec, openvino_version: str) -> Path | None:
    """Where the record of `spec`'s converted image tower lies (or would); None for a checkpoint file
    that is not there."""
    weights = weights_key(spec)
    if weights is None:
        return None
    parts = (spec.name, weights, nanodb.__version__, str(RECORD_FORMAT), openvino_version)
    return cache_dir() / "image" / f"{spec.name}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}.json"


def record_image_tower(clip: ClipModel) -> None:
    """Remember where `clip`'s image tower, converted to OpenVINO, lies, with its pixel steps (once per
    conversion); nothing for a tower run otherwise or a model whose pixel steps need open_clip."""
    tower = clip.image_tower
    if not isinstance(tower, OpenVinoImageTower) or not isinstance(clip.pixel_transform, ResizeCenterCrop):
        return
    import openvino as ov

    file = record_file(clip.spec, ov.__version__)
    if file is None:
        return
    record = {"weights_id": clip.spec.weights_id, "model_xml": str(tower.float_xml),
              "preprocessing": dataclasses.asdict(clip.preprocessing)}
    try:
        if file.is_file() and json.loads(file.read_text()) == record:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, file)  # atomic: readers see a whole record or none
    except (OSError, ValueError) as e:  # a cache: a query image then loads the model
        log.warning("cannot record the image tower of %s in %s (%s)", clip.spec.name, file, e)


class ExportedImageTower:
    """The image half of a ClipModel for a query image (`pixel_transform`, `encode_pixels`, `image_size`), from a
    recorded conversion of its tower: OpenVINO and Pillow, no torch."""

    def __init__(self, record: dict, precision: str):
        preprocessing = Preprocessing(**{**record["preprocessing"],
                                         **{k: tuple(v) for k, v in record["preprocessing"].items()
                                            if isinstance(v, list)}})
        self.pixel_transform = preprocessing.pixel_transform(None)  # a ResizeCenterCrop: no open_clip
        self.image_size = preprocessing.size
        self.tower = OpenVinoImageTower.converted(Path(record["model_xml"]), preprocessing.mean,
                                                  preprocessing.std, precision)
        self.precision_id = f"{precision}/openvino"

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, 3) from `pixel_transform` -> unit float32 vectors (N, dim)."""
        return unit_rows(self.tower(np.require(pixels, np.uint8, ["C", "W"])).astype(np.float32))


def exported_image_tower(config: ModelConfig, precision_id: str, weights_id: str) -> ExportedImageTower | None:
    """The recorded image tower of `config`'s model, where it computes the vectors that loading the model
    in this process would, and that the database's scans computed (`precision_id`, `weights_id`: its
    manifest's); else None, and the caller loads the model."""
    try:
        import openvino as ov
    except ImportError:
        return None
    if config.device == "cuda" or (config.device == "auto" and os.path.exists("/proc/driver/nvidia")):
        return None  # on a machine with a GPU, torch decides where the model runs
    try:
        precision = resolve_precision(config.precision, "cpu")
        runtime = runtimes_for(config.backend, "cpu", precision)[0]
    except ModelLoadError:
        return None
    if runtime.build is not OpenVinoImageTower or precision not in INFERENCE_HINTS:
        return None
    if precision_id != f"{precision}/openvino" or (file := record_file(config.spec, ov.__version__)) is None:
        return None
    try:
        record = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("the image tower record %s cannot be read (%s); loading the model", file, e)
        return None
    if record.get("weights_id") != weights_id or not Path(record.get("model_xml", "")).is_file():
        return None
    try:
        with announced(f"loading the image tower of {config.spec.name} (converted to OpenVINO)"):
            return ExportedImageTower(record, precision)
    except Exception as e:  # a damaged conversion fails in OpenVINO, its own way
        log.warning("the converted image tower %s cannot be loaded (%s); loading the model", record["model_xml"], e)
        return None
