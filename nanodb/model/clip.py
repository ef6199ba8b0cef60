"""The CLIP model: one factory that builds an open_clip model from a name and a pretrained tag or file."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanodb.media.opener import ResizeCenterCrop, model_pixels, to_rgb

log = logging.getLogger(__name__)


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


PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
BACKENDS = ("auto", "torch", "openvino")


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product units (AVX512-BF16 or AMX), from the Linux cpuinfo flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_precision(precision: str, device: str) -> str:
    """'auto' is float16 on a GPU, bfloat16 on a CPU with bfloat16 units, float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "float16" if device == "cuda" else "bfloat16" if cpu_has_bfloat16() else "float32"
    if precision == "float16" and device != "cuda":
        raise ModelLoadError("precision float16 needs a CUDA GPU; on a CPU use bfloat16 or float32")
    if precision == "int8" and device != "cpu":
        raise ModelLoadError("precision int8 runs on a CPU (with OpenVINO); on a GPU use float16")
    return precision


def cpu_float_precision() -> str:
    """The arithmetic of what runs in floating point on this CPU: bfloat16 where it has the units."""
    return "bfloat16" if cpu_has_bfloat16() else "float32"


def openvino_available() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def resolve_backend(backend: str, device: str, precision: str = "float32") -> str:
    """'auto' is OpenVINO for the image tower on a CPU when it is installed, torch otherwise."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "openvino" if device == "cpu" and openvino_available() else "torch"
    elif backend == "openvino" and device != "cpu":
        raise ModelLoadError("backend openvino runs on the CPU; use backend torch with --device cuda")
    elif backend == "openvino" and not openvino_available():
        raise ModelLoadError("backend openvino is not installed: pip install openvino (or use backend torch)")
    if precision == "int8" and backend != "openvino":
        raise ModelLoadError("precision int8 runs on the openvino backend (pip install openvino); "
                             "with torch use bfloat16 or float32")
    if precision == "int8" and not nncf_available():
        raise ModelLoadError("precision int8 needs nncf: pip install nncf (or use precision bfloat16)")
    return backend


def nncf_available() -> bool:
    from importlib.util import find_spec

    return find_spec("nncf") is not None


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch finds no CUDA GPU")
    return device


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_hub():
    """Use only locally cached weights: without this, huggingface_hub retries an unreachable host for ~45 s."""
    import huggingface_hub.constants as hf

    saved = hf.HF_HUB_OFFLINE
    hf.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf.HF_HUB_OFFLINE = saved


@contextmanager
def _quiet_open_clip():
    """open_clip logs its own (root-logger) errors and warnings on load; ours say what to do instead."""
    if log.isEnabledFor(logging.INFO):
        yield
        return
    before = logging.root.manager.disable  # the caller's own setting, put back after
    logging.disable(max(before, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(before)


class ClipModel:
    """An open_clip model with the image pre-processing split in two halves.

    `pixel_transform` (resize, crop, RGB) runs on PIL images in the decode workers and yields uint8
    pixels; `encode_pixels` does the rest (scale, normalise) batched, then the forward pass. Together
    they equal open_clip's own `preprocess`, so stored vectors match the model's output for the file.

    `precision` and `backend` choose how the forward passes run: float16 on a GPU; bfloat16 (or
    float32) on a CPU, the image tower through OpenVINO when installed (its matrix kernels use the
    CPU's bfloat16 units; torch's bfloat16 autocast gains less, see benchmarks/RESULTS.md), or that
    tower quantized to int8 (OpenVinoImageTower). Vectors stay within cosine 0.999 of float32 ones
    (0.99 for int8), so databases built in any precision mix.
    """

    def __init__(self, spec: ModelSpec, device: str = "auto", precision: str = "auto", backend: str = "auto"):
        import open_clip
        import torch

        self.spec = spec
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.backend = resolve_backend(backend, self.device, self.precision)
        if spec.name not in open_clip.list_models():
            raise ModelLoadError(
                f"unknown model {spec.name!r}; choose one of open_clip.list_models(), e.g. ViT-B-32, ViT-L-14-336"
            )
        pretrained = None if spec.random_weights else spec.pretrained
        if pretrained and not spec.is_file:
            tags = open_clip.list_pretrained_tags_by_model(spec.name)
            if pretrained not in tags:
                raise ModelLoadError(
                    f"unknown pretrained tag {pretrained!r} for {spec.name}; known tags: {', '.join(tags) or 'none'}; "
                    "or pass a local checkpoint file, or 'none' for random weights"
                )
        if spec.is_file and not Path(spec.pretrained).is_file():
            raise ModelLoadError(f"checkpoint file not found: {spec.pretrained}")
        offline = pretrained is not None and not spec.is_file and not hub_reachable()
        try:
            with torch.random.fork_rng(devices=[]), (_offline_hub() if offline else nullcontext()), _quiet_open_clip():
                torch.manual_seed(spec.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=pretrained, device=self.device
                )
        except Exception as e:  # open_clip raises RuntimeError/OSError/ValueError depending on the failure
            if spec.is_file and not looks_like_checkpoint(spec.pretrained):
                raise ModelLoadError(
                    f"{spec.pretrained} is not a model checkpoint: pass an open_clip weights file "
                    f"(open_clip_pytorch_model.bin or .safetensors), a pretrained tag, or none"
                ) from e
            if spec.is_file:
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelLoadError(f"cannot load checkpoint {spec.pretrained} into {spec.name}: {why}") from e
            why = "no network connection to the model hub" if offline else str(e).splitlines()[0]
            raise ModelLoadError(
                f"cannot get the weights {spec.name}/{pretrained}: {why}. Download open_clip_pytorch_model.bin "
                f"for that tag on a connected machine and pass it with --pretrained /path/to/file "
                f"(or --pretrained none for random weights, for testing)"
            ) from e
        model.eval()
        self.model = model.half() if self.precision == "float16" else model
        self.tokenizer = open_clip.get_tokenizer(spec.name)
        self.preprocess = preprocess
        steps = list(preprocess.transforms)
        split = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        self.pixel_transform = pillow_transform(steps[:split]) or type(preprocess)(steps[:split])
        normalize = steps[-1]
        self._mean = torch.tensor(normalize.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(normalize.std, device=self.device).view(1, 3, 1, 1)
        self.image_size = tuple(model.visual.image_size) if hasattr(model.visual, "image_size") else (224, 224)
        self._image_tower = None
        if self.backend == "openvino":
            try:
                self._image_tower = OpenVinoImageTower(self, normalize.mean, normalize.std)
            except Exception as e:  # a model OpenVINO cannot convert still runs, in torch
                if backend == "openvino" or self.precision == "int8":
                    raise ModelLoadError(f"OpenVINO cannot run the image tower of {spec.name}: {e}") from e
                log.warning("OpenVINO cannot convert %s (%s); running it in torch", spec.name, e)
                self.backend = "torch"
        with torch.no_grad():
            self.dim = int(self.encode_text(["x"]).shape[1])

    @property
    def precision_id(self) -> str:
        """How vectors are computed, e.g. 'bfloat16/openvino' (recorded in a database's manifest)."""
        return f"{self.precision}/{self.backend}"

    def _autocast(self):
        """bfloat16 matrix products for the torch forward passes on a CPU."""
        import torch

        if self.precision == "bfloat16" or (self.precision == "int8" and cpu_float_precision() == "bfloat16"):
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return nullcontext()

    def _finish(self, features) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, 3) from `pixel_transform` -> unit float32 vectors (N, dim)."""
        import torch

        pixels = np.require(pixels, np.uint8, ["C", "W"])
        if self._image_tower is not None:
            return self._finish(torch.from_numpy(self._image_tower(pixels)))
        with torch.no_grad():
            x = torch.from_numpy(np.require(pixels, np.uint8, ["C", "W"])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div(255)
            x = (x - self._mean) / self._std
            if self.precision == "float16":
                x = x.half()
            with self._autocast():
                return self._finish(self.model.encode_image(x))

    def image_pixels(self, image) -> np.ndarray:
        """A PIL image as model-input uint8 pixels, as a decode worker makes them."""
        return model_pixels(to_rgb(image), self.pixel_transform)

    def encode_images(self, images) -> np.ndarray:
        """PIL images -> unit float32 vectors, through the same two halves as a scan."""
        return self.encode_pixels(np.stack([self.image_pixels(im) for im in images]))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad(), self._autocast():
            tokens = self.tokenizer(list(texts)).to(self.device)
            return self._finish(self.model.encode_text(tokens))


def cache_dir() -> Path:
    """Where converted models are kept: $NANODB_CACHE, else ~/.cache/nanodb."""
    if os.environ.get("NANODB_CACHE"):
        return Path(os.environ["NANODB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanodb"


# int8: the image tower quantized by NNCF's post-training quantization, calibrated on the first batch of
# at least CALIBRATION_IMAGES of the user's own images it is given (synthetic images calibrate it badly:
# cosine 0.97 to float32 on real photos, against 0.9995 for photos), then kept on disk beside the
# converted model. It is used only if, on those images, its vectors stay within INT8_MIN_COSINE of
# float32; otherwise the tower stays in floating point, and says so once.
CALIBRATION_IMAGES = 16
INT8_MIN_COSINE = 0.995


class OpenVinoImageTower:
    """The model's image tower converted to OpenVINO, with the scaling and normalisation folded into
    the graph: uint8 pixels (N, H, W, 3) in, features out. The conversion (seconds to a minute) is
    cached on disk per model, weights and OpenVINO version; compiling the cached model is quick.

    With precision int8, until a quantized tower is cached, batches run in floating point and the
    first batch large enough calibrates one (see CALIBRATION_IMAGES)."""

    def __init__(self, clip: ClipModel, mean, std):
        import openvino as ov

        self._ov = ov
        self._mean, self._std = mean, std
        self._lock = threading.Lock()  # one infer request, used by one thread at a time
        self._float_hint = {"bfloat16": "bf16", "float32": "f32"}[
            cpu_float_precision() if clip.precision == "int8" else clip.precision]
        self._xml = self._converted(clip, ov)
        self._int8_folder = self._xml.parent.with_name(self._xml.parent.name + "-int8")
        self.calibrating = False
        if clip.precision == "int8" and (self._int8_folder / "model.xml").is_file():
            self._request = self._compile(ov.Core().read_model(self._int8_folder / "model.xml"))
        else:
            self._request = self._compile(ov.Core().read_model(self._xml))
            self.calibrating = clip.precision == "int8" and not (self._int8_folder / "refused").is_file()

    def _compile(self, model):
        """An infer request for `model` (float input) taking uint8 NHWC pixels."""
        ov = self._ov
        ppp = ov.preprocess.PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        ppp.input().preprocess().convert_element_type(ov.Type.f32).mean([255 * m for m in self._mean]).scale(
            [255 * s for s in self._std]
        )
        compiled = ov.Core().compile_model(ppp.build(), "CPU", {"INFERENCE_PRECISION_HINT": self._float_hint})
        return compiled.create_infer_request()

    def _normalized(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC pixels -> the float NCHW input of the converted model."""
        x = pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255
        mean = np.asarray(self._mean, np.float32)[None, :, None, None]
        return (x - mean) / np.asarray(self._std, np.float32)[None, :, None, None]

    def _calibrate(self, pixels: np.ndarray) -> None:
        """Quantize the tower on `pixels` (in a child process, nanodb/quantize.py); keep it, on disk and
        here, if its vectors of those images stay within INT8_MIN_COSINE of floating point."""
        import subprocess
        import sys
        import tempfile

        log.warning("calibrating the int8 image tower on the first %d images (once per model and machine, "
                    "seconds to a minute)", len(pixels))
        self._int8_folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._int8_folder.parent, ignore_cleanup_errors=True) as tmp:
            np.save(Path(tmp) / "inputs.npy", self._normalized(pixels))
            done = subprocess.run([sys.executable, "-m", "nanodb.model.quantize", str(self._xml),
                                   str(Path(tmp) / "inputs.npy"), str(Path(tmp) / "model.xml")],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=_child_env())
            (Path(tmp) / "inputs.npy").unlink()
            if done.returncode:
                why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                log.warning("cannot calibrate the int8 image tower (%s): it stays in floating point", why)
                return
            quantized = self._compile(self._ov.Core().read_model(Path(tmp) / "model.xml"))
            reference = self._request.infer({0: pixels})[0].copy()
            cosine = float(_cosines(quantized.infer({0: pixels})[0], reference).min())
            if cosine < INT8_MIN_COSINE:
                log.warning("the int8 image tower is not faithful on these images (cosine %.4f to floating point, "
                            "under %.3f): it stays in floating point", cosine, INT8_MIN_COSINE)
                for f in Path(tmp).iterdir():
                    f.unlink()
                (Path(tmp) / "refused").write_text(f"cosine {cosine:.6f}\n")
            try:
                os.replace(tmp, self._int8_folder)  # atomic: another process may be calibrating too
            except OSError:
                if not self._int8_folder.is_dir():
                    raise
        if (self._int8_folder / "model.xml").is_file():
            self._request = self._compile(self._ov.Core().read_model(self._int8_folder / "model.xml"))

    @staticmethod
    def _converted(clip: ClipModel, ov) -> Path:
        """The image tower as OpenVINO IR (model.xml + model.bin), converted now if not cached."""
        import hashlib
        import tempfile

        import torch

        spec = clip.spec
        weights = spec.weights_id
        if spec.is_file:  # a checkpoint rewritten in place keeps its name and maybe its size
            weights += f":{Path(spec.pretrained).stat().st_mtime_ns}"
        key = hashlib.sha256(f"{spec.name}|{weights}|{ov.__version__}|{torch.__version__}".encode()).hexdigest()[:16]
        folder = cache_dir() / "openvino" / f"{spec.name}-{key}"
        if not (folder / "model.xml").is_file():
            log.info("converting the image tower of %s to OpenVINO (once)", spec.describe())
            h, w = clip.image_size
            with torch.no_grad(), warnings.catch_warnings():
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

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            if self.calibrating and len(pixels) >= CALIBRATION_IMAGES:
                self.calibrating = False  # one try per process, whatever happens
                self._calibrate(pixels)
            return self._request.infer({0: pixels})[0].copy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _child_env() -> dict[str, str]:
    """This process's environment, with nanodb importable by a child started from any directory."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def pillow_transform(steps) -> ResizeCenterCrop | None:
    """The Pillow-only equivalent of open_clip's usual resize + crop + RGB steps, if that is what they are."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    if len(steps) != 3 or not isinstance(steps[0], Resize) or not isinstance(steps[1], CenterCrop):
        return None
    resize, crop, convert = steps
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    filters = {InterpolationMode.BICUBIC: 3, InterpolationMode.BILINEAR: 2}  # PIL.Image.Resampling values
    crop_h, crop_w = crop.size
    if (
        len(size) != 1
        or resize.max_size is not None
        or resize.interpolation not in filters
        or type(convert).__name__ != "MaybeConvertMode"
        or getattr(convert, "mode", None) != "RGB"
        or max(crop_h, crop_w) > size[0]
    ):
        return None
    return ResizeCenterCrop(size[0], (crop_h, crop_w), filters[resize.interpolation])


def as_pretrained(value: str) -> str:
    """A checkpoint file is remembered by absolute path; tags and 'none' as they are."""
    if value and value.lower() != "none" and (os.sep in value or os.path.isfile(value)):
        return os.path.abspath(os.path.expanduser(value))
    return "none" if not value or value.lower() == "none" else value


_cache: dict[tuple[ModelSpec, str, str, str], ClipModel] = {}


def load_model(spec: ModelSpec, device: str = "auto", precision: str = "auto", backend: str = "auto") -> ClipModel:
    """Build (once per process) the model for `spec`."""
    key = (spec, device, precision, backend)
    if key not in _cache:
        log.info("loading %s", spec.describe())
        _cache[key] = ClipModel(spec, device, precision, backend)
    return _cache[key]
