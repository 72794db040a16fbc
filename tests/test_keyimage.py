"""Key images: size, window, the box outline and the label corner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.keyimage import BOX_COLOUR, MIN_SIDE_PX, window_for_label, write_key_image


def _volume() -> np.ndarray:
    hu = np.full((10, 64, 96), 40, np.int16)  # soft tissue: mid-grey in the soft tissue window
    hu[:, 40:, :] = -1000  # air below, black in every window
    return hu


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_key_image_size_box_and_grey(tmp_path: Path) -> None:
    box = (2, 10, 50, 7, 30, 80)  # key slice (2 + 7 - 1) // 2 = 4
    path = tmp_path / "key.png"
    write_key_image(path, _volume(), box, "liver: 20 mm hypodense lesion")
    pixels = _read(path)

    scale = 6  # ceil(384 / 64): the shorter side reaches 384 px
    assert pixels.shape == (64 * scale, 96 * scale, 3)
    assert min(pixels.shape[:2]) >= MIN_SIDE_PX
    r0, c0, r1, c1 = 10 * scale, 50 * scale, 30 * scale - 1, 80 * scale - 1
    for r, c in [(r0, c0), (r0 + 1, c0 + 40), (r1, c1), (r1 - 1, c0 + 40), (r0 + 40, c0), (r0 + 40, c1 - 1)]:
        assert tuple(pixels[r, c]) == BOX_COLOUR, (r, c)
    # Two pixels wide, drawn inside the box's edge: the third pixel in is grey again.
    grey = 128  # 40 HU in the soft tissue window 40 / 400
    assert tuple(pixels[r0 + 2, c0 + 40]) == (grey, grey, grey)
    assert tuple(pixels[r0 - 1, c0 + 40]) == (grey, grey, grey)
    assert (pixels[r0 + 10:r1 - 10, c0 + 10:c1 - 10] == grey).all()
    assert (pixels[45 * scale:, :300] == 0).all()  # air stays black, no text down there


def test_key_slice_is_the_middle_of_the_box(tmp_path: Path) -> None:
    hu = _volume()
    hu[4, 12:28, 52:78] = 1040  # bright only on the key slice: white in the soft tissue window
    write_key_image(tmp_path / "key.png", hu, (2, 10, 50, 7, 30, 80), "heart")
    assert (_read(tmp_path / "key.png")[14 * 6:26 * 6, 54 * 6:76 * 6] == 255).all()


def test_label_goes_to_a_corner_clear_of_the_box(tmp_path: Path) -> None:
    hu = _volume()
    write_key_image(tmp_path / "top_left.png", hu, (0, 0, 0, 1, 8, 16), "lungs: nodule")
    pixels = _read(tmp_path / "top_left.png")
    assert tuple(pixels[0, 0]) == BOX_COLOUR  # the box, not the label, owns the top left corner
    top_right = pixels[:30, -200:]
    assert (top_right == 255).all(axis=-1).any(), "label text missing from the top right corner"


def test_large_images_keep_their_size(tmp_path: Path) -> None:
    hu = np.zeros((3, 400, 512), np.int16)
    write_key_image(tmp_path / "big.png", hu, (0, 100, 100, 3, 200, 200), "bones: lytic lesion")
    assert _read(tmp_path / "big.png").shape == (400, 512, 3)


@pytest.mark.parametrize("label, window", [
    ("lungs: 12 mm solid nodule", (-600.0, 1500.0)),
    ("Right pleural effusion, 20 mm deep.", (-600.0, 1500.0)),
    ("pneumothorax", (-600.0, 1500.0)),
    ("Pericardial effusion", (40.0, 400.0)),
    ("liver: 30 mm mass", (40.0, 400.0)),
    ("heart: cardiomegaly", (40.0, 400.0)),
    ("bones: 8 mm sclerotic lesion in the T7 vertebral body", (400.0, 1800.0)),
    ("something else", (40.0, 400.0)),
])
def test_window_follows_the_label(label: str, window: tuple[float, float]) -> None:
    assert window_for_label(label) == window


def test_box_outside_the_volume_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="box"):
        write_key_image(tmp_path / "x.png", _volume(), (0, 0, 0, 11, 5, 5), "lungs")
