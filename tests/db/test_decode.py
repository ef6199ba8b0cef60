"""Decode workers resize with Pillow alone, pixel for pixel as open_clip's torchvision transform does."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import coco_photos, data_dir
from PIL import Image

from nanodb.media.opener import to_rgb
from nanodb.model.clip import ClipModel, ModelConfig, ModelSpec
from nanodb.model.preprocess import ResizeCenterCrop


@pytest.fixture(scope="module")
def model():
    return ClipModel(ModelConfig(ModelSpec("ViT-S-32", "none")))


def test_decode_workers_use_the_pillow_transform(model):
    assert isinstance(model.pixel_transform, ResizeCenterCrop)


def test_pillow_transform_equals_open_clips_torchvision_steps(model):
    torchvision_steps = type(model.preprocess)(list(model.preprocess.transforms)[:-2])  # before tensor, normalise
    pillow = model.pixel_transform
    photos = [Image.open(p) for p in coco_photos(6)]
    photos += [Image.open(next(data_dir("caltech101").rglob("*.jpg")))]
    photos += [im.transpose(Image.Transpose.ROTATE_90) for im in photos[:3]]  # portrait
    photos += [photos[0].resize((100, 60)), photos[1].resize((224, 224)), photos[2].resize((225, 1000))]
    photos += [photos[3].convert("L"), photos[4].convert("RGBA")]
    for image in photos:
        rgb = to_rgb(image)
        np.testing.assert_array_equal(np.asarray(pillow(rgb)), np.asarray(torchvision_steps(rgb)), err_msg=str(image))
