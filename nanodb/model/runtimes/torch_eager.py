"""The image tower in torch, eagerly: any device, float32, bfloat16 (autocast) or float16 (a GPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nanodb.model.runtimes import runtime

if TYPE_CHECKING:
    from nanodb.model.clip import ClipModel


@runtime("torch", cpu=("float32", "bfloat16"), cuda=("float32", "bfloat16", "float16"))
class TorchImageTower:
    """Scales and normalises the pixels on the model's device, then runs open_clip's encode_image."""

    def __init__(self, clip: ClipModel):
        import torch

        self.clip = clip
        self.mean = torch.tensor(clip.preprocessing.mean, device=clip.device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.preprocessing.std, device=clip.device).view(1, 3, 1, 1)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        clip = self.clip
        with torch.no_grad():
            x = torch.from_numpy(pixels).to(clip.device).permute(0, 3, 1, 2).float().div(255)
            x = (x - self.mean) / self.std
            if clip.precision == "float16":
                x = x.half()
            with clip.autocast():
                return clip.model.encode_image(x).float().cpu().numpy()
