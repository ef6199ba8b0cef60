"""The model's image preprocessing, split in two halves and derived from the model's own preprocess
config (open_clip's PreprocessCfg: size, mean, std, interpolation, resize mode).

`pixel_transform` runs on PIL images in the decode workers (resize, crop, RGB) and yields uint8 pixels;
the image-tower runtimes then scale and normalise with `mean` and `std`. Together they equal open_clip's
own preprocess. This module imports neither torch nor open_clip at import time: a decode worker
unpickles ResizeCenterCrop without them (torch would cost each worker about 500 MB)."""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_MARGIN = 2  # a JPEG decodes at reduced scale down to this multiple of the model's input size

# open_clip's interpolation names as PIL.Image.Resampling values (torchvision's PIL path uses these)
RESAMPLING = {"bicubic": 3, "bilinear": 2}


@dataclass(frozen=True)
class ResizeCenterCrop:
    """open_clip's usual pixel steps (torchvision Resize of the short side, CenterCrop, RGB) in plain
    Pillow, with torchvision's arithmetic, pixel for pixel: so decode workers need not import torch."""

    short_side: int
    crop: tuple[int, int]  # (height, width), at most short_side
    resample: int  # a PIL.Image.Resampling filter

    @property
    def draft_size(self) -> int:
        """The short side a JPEG may decode at (1/2, 1/4 or 1/8 DCT scaling) before the exact resize.
        Twice the input: a 12-megapixel photo decodes ~6x faster, and vectors stay within cosine
        0.998 of a full decode (at 1x, 0.996); a photo under twice the input decodes in full."""
        return DRAFT_MARGIN * self.short_side

    def __call__(self, image):
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.short_side * long / short)
        new_w, new_h = (self.short_side, new_long) if w <= h else (new_long, self.short_side)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self.resample)
        crop_h, crop_w = self.crop
        if (crop_w, crop_h) != (new_w, new_h):
            top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an image, from its preprocess config."""

    size: tuple[int, int]  # (height, width) of the model's input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str

    @classmethod
    def of(cls, config) -> Preprocessing:
        """From an open_clip PreprocessCfg (or an object with its fields)."""
        size = (config.size, config.size) if isinstance(config.size, int) else tuple(config.size)
        return cls(size, tuple(config.mean), tuple(config.std), config.interpolation, config.resize_mode)

    def pixel_transform(self, preprocess):
        """PIL image -> the model's input pixels (uint8 RGB, before scaling): Pillow alone for open_clip's
        usual square shortest-side resize and centre crop, else open_clip's own steps of `preprocess`
        before its last two (open_clip's eval transform always ends by making a tensor and normalising)."""
        height, width = self.size
        if self.resize_mode == "shortest" and height == width and self.interpolation in RESAMPLING:
            return ResizeCenterCrop(height, self.size, RESAMPLING[self.interpolation])
        return type(preprocess)(list(preprocess.transforms)[:-2])
