"""Gemma 3's image processor steps (resize, rescale, normalize) in torch, on the model's device.

``transformers``' processor runs them image by image through PIL on one CPU core: 2.6 s for 85
slices of 512 x 512 on this project's machine (31 ms a slice; bench/pixels.py), near what the GPU
needs for a whole study (bench/RESULTS.md). The same steps on a batch of slices on a GPU are one
resize of 67 MB of uint8 pixels.

The result equals the processor's to within one of 255 levels: its resize works on uint8 images,
and torch's antialiased bilinear resize is PIL's filter (checked in tests/test_medgemma.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


def _bilinear(resample) -> bool:
    """Whether a processor's ``resample`` (PIL's code 2, or an enum named BILINEAR) is bilinear."""
    return str(getattr(resample, "name", resample)).lower() in ("bilinear", "2")


@dataclass(frozen=True)
class PixelSteps:
    """What the processor does to an RGB uint8 image: resize to ``size`` (bilinear), multiply by
    ``rescale``, then subtract ``mean`` and divide by ``std`` per channel."""

    size: tuple[int, int]
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, image_processor) -> PixelSteps:
        """The steps of a loaded Gemma 3 image processor; a setting done otherwise is an error naming it."""
        p = image_processor
        unsupported = [name for name, wrong in (
            ("do_pan_and_scan", bool(getattr(p, "do_pan_and_scan", False))),
            ("do_resize", not p.do_resize), ("do_rescale", not p.do_rescale), ("do_normalize", not p.do_normalize),
            ("resample", not _bilinear(p.resample))) if wrong]
        if unsupported:
            raise ValueError(f"the checkpoint's image processor sets {', '.join(unsupported)} differently from "
                             f"MedGemma's (bilinear resize, rescale, normalize, no pan and scan); Readout does not "
                             f"reproduce that")
        return cls((int(p.size["height"]), int(p.size["width"])), float(p.rescale_factor),
                   tuple(map(float, p.image_mean)), tuple(map(float, p.image_std)))

    def __call__(self, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """``[N, 3, height, width]`` float32 pixel values of ``N`` equal-sized ``H x W x 3`` uint8 images."""
        x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)  # the processor resizes uint8 images
        mean = torch.tensor(self.mean, device=device)[:, None, None]
        std = torch.tensor(self.std, device=device)[:, None, None]
        return (x * self.rescale - mean) / std
