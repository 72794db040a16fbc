"""Key images: one PNG per finding, its box drawn on the middle slice of the box.

The picture carries the finding's label and nothing else: no names, IDs or dates, so it can go
into logs, tickets and reports that must not hold patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX_COLOUR = (255, 200, 0)  # amber: stands out on grey in every window
BOX_WIDTH_PX = 2
MIN_SIDE_PX = 384

#: (centre, width) in HU, and the words of a label that choose each window. Soft tissue words
#: come first: "pericardial effusion" and "liver mass" belong to the soft tissue window.
_WINDOWS: tuple[tuple[tuple[float, float], tuple[str, ...]], ...] = (
    ((400.0, 1800.0), ("bone", "vertebra", "rib", "lytic", "sclerotic", "osseous", "fracture")),
    ((40.0, 400.0), ("heart", "cardi", "pericard", "liver", "hepat")),
    ((-600.0, 1500.0), ("lung", "pulmonary", "nodule", "mass", "pleura", "effusion", "pneumothorax")),
)
_SOFT_TISSUE = (40.0, 400.0)
_TEXT_MARGIN_PX = 4


def window_for_label(label: str) -> tuple[float, float]:
    """The (centre, width) HU window that suits a finding's label; soft tissue when unsure."""
    text = label.lower()
    for window, words in _WINDOWS:
        if any(word in text for word in words):
            return window
    return _SOFT_TISSUE


def write_key_image(path: Path, hu: np.ndarray, box: Sequence[int], label: str) -> None:
    """Write a PNG of the box's key slice with the box outlined and the label in a corner.

    Parameters
    ----------
    path:
        Where the PNG goes; its folder must exist.
    hu:
        HU indexed ``[k, r, c]``.
    box:
        Half-open voxel box ``(k0, r0, c0, k1, r1, c1)``; its key slice is
        ``(k0 + k1 - 1) // 2``.
    label:
        The finding's words, also used to choose the window (`window_for_label`).

    Raises
    ------
    ValueError
        For a ``hu`` that is not 3-D or a box that is empty or does not fit it.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D array [k, r, c], got shape {hu.shape}")
    if len(box) != 6:
        raise ValueError(f"box needs 6 values (k0, r0, c0, k1, r1, c1), got {len(box)}")
    k0, r0, c0, k1, r1, c1 = (int(v) for v in box)
    for axis, lo, hi, n in zip("krc", (k0, r0, c0), (k1, r1, c1), hu.shape):
        if not 0 <= lo < hi <= n:
            raise ValueError(f"box {tuple(box)}: need 0 <= {axis}0 < {axis}1 <= {n} for hu of shape {hu.shape}")

    centre, width = window_for_label(label)
    plane = hu[(k0 + k1 - 1) // 2].astype(np.float32)
    grey = np.clip((plane - (centre - width / 2)) / width * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # Whole-number scale with nearest neighbours: every voxel stays a crisp square of pixels.
    scale = max(1, -(-MIN_SIDE_PX // min(grey.shape)))
    image = Image.fromarray(grey).convert("RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)

    draw = ImageDraw.Draw(image)
    outline = (c0 * scale, r0 * scale, c1 * scale - 1, r1 * scale - 1)
    draw.rectangle(outline, outline=BOX_COLOUR, width=BOX_WIDTH_PX)
    font = ImageFont.load_default(size=max(12, min(image.size) // 28))
    _draw_label(draw, label, font, image.size, outline)
    image.save(path, format="PNG")


def _draw_label(draw: ImageDraw.ImageDraw, label: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Write the label on a dark band in the first corner where it does not cover the box."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    text_w, text_h = right - left + 2 * _TEXT_MARGIN_PX, bottom - top + 2 * _TEXT_MARGIN_PX
    width, height = size
    corners = ((0, 0), (width - text_w, 0), (0, height - text_h), (width - text_w, height - text_h))
    x, y = next((c for c in corners if not _overlap((*c, c[0] + text_w, c[1] + text_h), box)), corners[0])
    draw.rectangle((x, y, x + text_w - 1, y + text_h - 1), fill=(0, 0, 0))
    draw.text((x + _TEXT_MARGIN_PX - left, y + _TEXT_MARGIN_PX - top), label, fill=(255, 255, 255), font=font)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
