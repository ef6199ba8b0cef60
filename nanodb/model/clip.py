"""The CLIP model: one factory that builds an open_clip model from a ModelConfig, its image tower run by
one of the registered runtimes (nanodb.model.runtimes)."""

from __future__ import annotations

import itertools
import logging
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from nanodb.media.opener import model_pixels, to_rgb
from nanodb.model.idle import return_freed_memory
from nanodb.model.image_export import record_image_tower
from nanodb.model.preprocess import Preprocessing
from nanodb.model.runtimes import (
    BACKENDS,
    PRECISIONS,
    ImageTower,
    float_precision,
    resolve_device,
    resolve_precision,
    runtimes_for,
)
from nanodb.model.spec import ModelConfig, ModelLoadError, ModelSpec, as_pretrained, looks_like_checkpoint
from nanodb.model.text_length import cuttable, encode_text_cut, needed_length

__all__ = ["ClipModel", "ModelConfig", "ModelLoadError", "ModelSpec", "load_model", "unload_model", "as_pretrained",
           "PRECISIONS",
           "BACKENDS", "hub_reachable"]

log = logging.getLogger(__name__)


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


def _check_weights(spec: ModelSpec) -> str | None:
    """The `pretrained` argument of open_clip for `spec`; raises ModelLoadError for an unknown model or tag."""
    import open_clip

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
    return pretrained


def create_open_clip(spec: ModelSpec, device: str):
    """open_clip's model and preprocess for `spec` (random weights drawn from its seed); raises
    ModelLoadError saying what to do instead when the weights cannot be had."""
    import open_clip
    import torch

    pretrained = _check_weights(spec)
    offline = pretrained is not None and not spec.is_file and not hub_reachable()
    try:
        with torch.random.fork_rng(devices=[]), (_offline_hub() if offline else nullcontext()), _quiet_open_clip():
            torch.manual_seed(spec.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=pretrained,
                                                                         device=device)
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
    return model, preprocess


class ClipModel:
    """An open_clip model with the image pre-processing split in two halves.

    `pixel_transform` (resize, crop, RGB) runs on PIL images in the decode workers and yields uint8
    pixels; `encode_pixels` does the rest (scale, normalise) batched in the image tower, then the
    forward pass. Together they equal open_clip's own `preprocess`, so stored vectors match the
    model's output for the file.

    The config's `precision` and `backend` choose how the forward passes run: float16 on a GPU;
    bfloat16 (or float32) on a CPU, the image tower in one of the registered runtimes (OpenVINO when
    installed, or quantized to int8). Vectors stay within cosine 0.999 of float32 ones (0.99 for
    int8), so databases built in any precision mix.
    """

    def __init__(self, config: ModelConfig):
        import open_clip

        self.config = config
        self.spec = config.spec
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        # the arithmetic of what `precision` leaves in floating point (all of it, but for int8)
        self.float_precision = float_precision(self.precision, self.device)
        runtimes = runtimes_for(config.backend, self.device, self.precision)
        model, self.preprocess = create_open_clip(self.spec, self.device)
        self.model = model.half() if self.precision == "float16" else model
        self.tokenizer = open_clip.get_tokenizer(self.spec.name)
        self.preprocessing = Preprocessing.of(open_clip.transform.PreprocessCfg(
            **open_clip.get_model_preprocess_cfg(model)))
        self.pixel_transform = self.preprocessing.pixel_transform(self.preprocess)
        self.image_size = self.preprocessing.size
        self.image_tower, self.backend = self._start_tower(runtimes)
        record_image_tower(self)  # a query image in a later process runs this tower without the model
        self._cut_text = cuttable(self.model)
        # which model this is, for the cache of text vectors (search/text_cache.py): this object, for a
        # checkpoint file may change on disk
        self.text_model_id = ("torch", config, self.precision, self.device, next(_instances))
        # int8: the tower's calibration and fidelity controls, which a scan drives (pipeline/fidelity.py)
        self.quantization = self.image_tower if self.precision == "int8" else None
        self.dim = int(self.encode_text(["x"]).shape[1])

    def _start_tower(self, runtimes) -> tuple[ImageTower, str]:
        """The first of `runtimes` that can run this model's image tower: with backend 'auto', one that
        cannot (e.g. a model OpenVINO cannot convert) passes to the next; the last one's failure is an error."""
        *fallible, last = runtimes
        for runtime, then in zip(fallible, runtimes[1:]):
            try:
                return runtime.build(self), runtime.backend
            except Exception as e:  # a converter or compiler may raise anything
                log.warning("backend %s cannot run the image tower of %s (%s); running it in %s",
                            runtime.backend, self.spec.name, e, then.backend)
        try:
            return last.build(self), last.backend
        except Exception as e:
            raise ModelLoadError(f"backend {last.backend} cannot run the image tower of {self.spec.name}: {e}") from e

    @property
    def precision_id(self) -> str:
        """How vectors are computed, e.g. 'bfloat16/openvino' (recorded in a database's manifest)."""
        return f"{self.precision}/{self.backend}"

    def autocast(self):
        """bfloat16 matrix products for the torch forward passes on a CPU."""
        import torch

        if self.float_precision == "bfloat16":
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return nullcontext()

    @staticmethod
    def _unit(features) -> np.ndarray:
        import torch

        features = torch.as_tensor(features).float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, 3) from `pixel_transform` -> unit float32 vectors (N, dim)."""
        return self._unit(self.image_tower(np.require(pixels, np.uint8, ["C", "W"])))

    def image_pixels(self, image) -> np.ndarray:
        """A PIL image as model-input uint8 pixels, as a decode worker makes them."""
        return model_pixels(to_rgb(image), self.pixel_transform)

    def encode_images(self, images) -> np.ndarray:
        """PIL images -> unit float32 vectors, through the same two halves as a scan."""
        return self.encode_pixels(np.stack([self.image_pixels(im) for im in images]))

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit float32 vectors (N, dim); a CLIP's text tower run on the tokens cut to the longest
        text (model/text_length.py), the same vectors as at the full context length."""
        import torch

        tokens = self.tokenizer(list(texts))
        with torch.no_grad(), self.autocast():
            if self._cut_text:
                return self._unit(encode_text_cut(self.model, tokens[:, :needed_length(tokens)].to(self.device)))
            return self._unit(self.model.encode_text(tokens.to(self.device)))

    def encode_each(self, texts: list[str]) -> np.ndarray:
        """Each text's vector as `encode_text([text])` gives it, bit for bit: one text a call (a batch's
        matrix products may take other kernels, which change the last bits)."""
        return np.concatenate([self.encode_text([text]) for text in texts])

    @staticmethod
    def text_key(text: str) -> str:
        """What a text's vector depends on, for the cache of text vectors: the text itself (a tokenizer
        of any kind reads it)."""
        return text


_cache: dict[ModelConfig, ClipModel] = {}
_instances = itertools.count()


def load_model(config: ModelConfig) -> ClipModel:
    """Build (once per process, until `unload_model`) the model `config` describes."""
    if config not in _cache:
        log.info("loading %s", config.spec.describe())
        _cache[config] = ClipModel(config)
    return _cache[config]


def unload_model(config: ModelConfig) -> None:
    """Forget the model `config` describes: its memory is freed once its users drop it (a server that
    encodes with the towers' exports holds no torch model)."""
    if _cache.pop(config, None) is not None:
        return_freed_memory()
        log.info("freed the model %s", config.spec.describe())
