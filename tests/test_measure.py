"""Findings measured in the image: a lung lesion's size (and the type and sentence it gives a decoded
finding), a pneumothorax's extent."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engines.measure import (air_depth_mm, body_middle, bone_lesion_diameter_mm, cardiac_diameter_mm, fluid_depth_mm,
                             fluid_ml, free_air_pockets, hypodense_lesion_diameter_mm, lung_extents, lung_position,
                             patient_side, pleural_air_box, solid_lesion_diameter_mm, thoracic_diameter_mm)
from engines.phantom import lung_lobe, render_phantom
from engines.report import PERICARDIAL_FLUID_ML, read_finding

SPACING = (2.5, 0.8, 0.8)  # mm per voxel along k, r, c


def lung_with_lesion(diameter_mm: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """Aerated lung with a solid sphere and a 6-mm vessel running into it; the sphere's voxel box."""
    shape = (48, 128, 128)
    k, r, c = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING)), indexing="ij")
    centre = np.array([n * s / 2 for n, s in zip(shape, SPACING)])
    hu = np.random.default_rng(0).normal(-850, 20, shape)
    hu[(k - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= (diameter_mm / 2) ** 2] = 30
    hu[((k - centre[0]) ** 2 + (r - centre[1]) ** 2 <= 3**2) & (c > centre[2])] = 40  # the vessel
    lo = [int((centre[a] - diameter_mm / 2) // SPACING[a]) for a in range(3)]
    hi = [int(-(-(centre[a] + diameter_mm / 2) // SPACING[a])) + 1 for a in range(3)]
    return hu, (*lo, *hi)


@pytest.mark.parametrize("diameter", [16.0, 24.0, 36.0])
def test_measures_a_lesion_without_the_vessel_it_touches(diameter: float) -> None:
    hu, box = lung_with_lesion(diameter)
    assert solid_lesion_diameter_mm(hu, SPACING, box) == pytest.approx(diameter, abs=SPACING[0])


def test_a_small_nodule_is_measured_with_the_smaller_ball() -> None:
    hu, box = lung_with_lesion(9.0)
    assert solid_lesion_diameter_mm(hu, SPACING, box) == pytest.approx(9.0, abs=SPACING[0])


def test_a_tiny_nodule_or_empty_lung_is_not_measured() -> None:
    hu, box = lung_with_lesion(6.0)
    assert solid_lesion_diameter_mm(hu, SPACING, box) is None
    assert solid_lesion_diameter_mm(np.full((20, 40, 40), -850.0), SPACING, (5, 5, 5, 15, 30, 30)) is None


def test_a_lung_lesion_is_typed_and_sized_by_its_measurement() -> None:
    hu, box = lung_with_lesion(24.0)
    sizes: dict = {}
    kind, text = read_finding("46 mm mass in the left upper lobe.", box, hu, SPACING, sizes)
    assert kind == "nodule"
    assert text.endswith("mm solid nodule in the left upper lobe.")
    assert abs(int(text.split()[0]) - 24) <= SPACING[0]
    hu, box = lung_with_lesion(36.0)
    assert read_finding("20 mm solid nodule.", box, hu, SPACING, {})[0] == "mass"


def test_a_lung_lesion_the_image_does_not_hold_is_dropped() -> None:
    hu, box = lung_with_lesion(6.0)
    assert read_finding("9 mm solid nodule in the right lower lobe.", box, hu, SPACING, {}) is None


def test_other_findings_keep_the_decoders_words() -> None:
    hu, box = lung_with_lesion(24.0)
    assert read_finding("12 mm lytic lesion in the T7 vertebral body.", box, hu, SPACING, {}) == (
        "lytic lesion", "12 mm lytic lesion in the T7 vertebral body.")


def liver_with_lesion(diameter_mm: float, lesion_hu: float = 25.0) -> tuple[np.ndarray, tuple[int, ...]]:
    """A liver (60 HU) in fat, its edge 4 mm from a lesion of ``diameter_mm`` (no lesion for 0),
    in 15 HU of noise; the lesion's voxel box grown by 4 mm, as loose as a bin box."""
    shape = (40, 100, 100)
    k, r, c = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING)), indexing="ij")
    centre = np.array([50.0, 40.0, 40.0])
    hu = np.full(shape, -100.0)
    hu[r < centre[1] + max(diameter_mm, 8) / 2 + 4] = 60
    hu[(k - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= (diameter_mm / 2) ** 2] = lesion_hu
    reach = max(diameter_mm, 8) / 2 + 4
    lo = [int((centre[a] - reach) // SPACING[a]) for a in range(3)]
    hi = [int(-(-(centre[a] + reach) // SPACING[a])) for a in range(3)]
    return hu + np.random.default_rng(0).normal(0, 15, shape), (*lo, *hi)


@pytest.mark.parametrize("diameter,lesion_hu", [(8.0, 25.0), (20.0, 40.0), (34.0, 0.0)])
def test_a_liver_lesion_is_measured_beside_the_livers_edge(diameter: float, lesion_hu: float) -> None:
    hu, box = liver_with_lesion(diameter, lesion_hu)
    assert hypodense_lesion_diameter_mm(hu, SPACING, box) == pytest.approx(diameter, abs=SPACING[0])


def test_a_liver_lesion_is_sized_by_its_measurement_where_the_image_shows_one() -> None:
    text = "31 mm hypodense lesion in the right hepatic lobe."
    hu, box = liver_with_lesion(20.0)
    kind, measured = read_finding(text, box, hu, SPACING, {})
    assert kind == "hypodense lesion" and abs(int(measured.split()[0]) - 20) <= SPACING[0]
    plain, box = liver_with_lesion(0.0)
    assert hypodense_lesion_diameter_mm(plain, SPACING, box) is None
    assert read_finding(text, box, plain, SPACING, {}) == ("hypodense lesion", text)


@pytest.mark.parametrize("seed,kind", [(8100, "lytic lesion"), (8108, "sclerotic lesion")])
def test_a_bone_lesion_is_measured_in_its_vertebral_body(seed: int, kind: str) -> None:
    """Phantom 8100's 15-mm lytic lesion touches its vertebra's end plate, and the disc beyond is as dark."""
    only = {"lungs": [], "pleura": [], "heart": [], "liver": [], "bones": [kind]}
    phantom = render_phantom(seed, findings=only)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    lesion = next(f for t in phantom.truth.topics for f in t.findings)
    sclerotic = kind == "sclerotic lesion"
    size = bone_lesion_diameter_mm(phantom.hu, spacing, lesion.box.voxel, sclerotic)
    assert size == pytest.approx(lesion.size_mm, abs=phantom.slice_spacing_mm)
    assert bone_lesion_diameter_mm(phantom.hu, spacing, lesion.box.voxel, not sclerotic) is None
    normal = render_phantom(seed, normal=True)
    assert bone_lesion_diameter_mm(normal.hu, spacing, lesion.box.voxel, sclerotic) is None
    stated = f"{round(lesion.size_mm) + 12} mm {kind} in the T9 vertebral body."
    assert read_finding(stated, lesion.box.voxel, phantom.hu, spacing, {}) == (
        kind, stated.replace(f"{round(lesion.size_mm) + 12} mm", f"{round(size)} mm"))


CHEST_SPACING = (2.5, 1.0, 1.0)


def chest_with_heart(radius_mm: float) -> tuple[np.ndarray, tuple[int, ...]]:
    """In `CHEST_SPACING`: a chest wall (40 HU) round two lungs 150 mm across, a heart of blood
    (45 HU) in 3 mm of fat touching the front wall, and the liver (60 HU) against its right side;
    15 HU of noise. The heart's voxel box."""
    rows, cols = np.ogrid[:160, :200]
    plane = np.full((160, 200), -1000.0)
    plane[10:150, 10:190] = 40
    plane[25:135, 25:95] = plane[25:135, 105:175] = -850
    centre = (22 + radius_mm, 100)  # into the wall, as a large heart presses on it
    distance = np.hypot(rows - centre[0], cols - centre[1])
    plane[(distance <= radius_mm + 3) & (rows >= 25)] = -100
    plane[distance <= radius_mm] = 45
    liver = (rows >= centre[0] - 10) & (rows < 140) & (cols >= 25) & (cols < 100 - radius_mm)
    plane[liver] = 60
    hu = np.repeat(plane[None], 12, axis=0) + np.random.default_rng(0).normal(0, 15, (12, 160, 200))
    box = (0, int(centre[0] - radius_mm), int(100 - radius_mm), 12, int(centre[0] + radius_mm) + 1, int(100 + radius_mm) + 1)
    return hu, box


def test_the_heart_is_measured_between_the_lungs_apart_from_the_wall_and_liver_it_touches() -> None:
    hu, box = chest_with_heart(45.0)
    assert cardiac_diameter_mm(hu, CHEST_SPACING, box) == pytest.approx(91, abs=2)
    assert thoracic_diameter_mm(hu, CHEST_SPACING) == pytest.approx(150, abs=1)


def test_cardiomegaly_is_stated_with_the_measured_ratio_and_a_normal_heart_is_dropped() -> None:
    text = "Cardiomegaly: cardiothoracic ratio 0.70 (transverse cardiac diameter 180 mm)."
    hu, box = chest_with_heart(45.0)
    kind, measured = read_finding(text, box, hu, CHEST_SPACING, {})
    ratio, diameter = (float(v) for v in re.findall(r"(\d+(?:\.\d+)?)", measured))
    assert kind == "cardiomegaly" and ratio == pytest.approx(91 / 150, abs=0.02) and diameter == pytest.approx(91, abs=2)
    hu, box = chest_with_heart(30.0)  # a ratio of 0.4
    assert read_finding(text, box, hu, CHEST_SPACING, {}) is None


def heart_in_fat(effusion_mm: float) -> np.ndarray:
    """A 40-mm ball of blood (40 HU) in fat, wrapped in ``effusion_mm`` of fluid (10 HU), with noise."""
    shape = (40, 128, 128)
    k, r, c = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING)), indexing="ij")
    distance = np.sqrt((k - 50) ** 2 + (r - 51.2) ** 2 + (c - 51.2) ** 2)
    hu = np.full(shape, -100.0)
    hu[distance <= 40 + effusion_mm] = 10
    hu[distance <= 40] = 40
    return hu + np.random.default_rng(0).normal(0, 15, shape)


def test_a_pericardial_effusion_is_its_fluid_and_a_heart_edge_is_none() -> None:
    shell_ml = 4 / 3 * np.pi * (48**3 - 40**3) / 1000
    box = (0, 0, 0, 40, 128, 128)
    assert fluid_ml(heart_in_fat(8.0), SPACING, box) == pytest.approx(shell_ml, rel=0.15)
    assert fluid_ml(heart_in_fat(0.0), SPACING, box) < 2


def test_a_pericardial_effusion_without_fluid_is_dropped() -> None:
    box = (0, 0, 0, 40, 128, 128)
    text = "Pericardial effusion, 8 mm thick."
    assert fluid_ml(heart_in_fat(8.0), SPACING, box) > PERICARDIAL_FLUID_ML
    assert read_finding(text, box, heart_in_fat(8.0), SPACING, {}) == ("pericardial effusion", text)
    assert read_finding(text, box, heart_in_fat(0.0), SPACING, {}) is None


def test_a_pleural_effusion_is_as_deep_as_its_fluid() -> None:
    hu = np.random.default_rng(0).normal(-850, 15, (30, 80, 60))  # aerated lung
    hu[5:25, 40:65, 10:50] += 860  # 25 rows (20 mm) of fluid, aerated lung on both sides
    box = (0, 0, 0, 30, 80, 60)
    assert fluid_depth_mm(hu, SPACING, box) == pytest.approx(20 - 2 * 1.9, abs=1)  # the smoothing's edges
    kind, text = read_finding("Left pleural effusion, 41 mm deep.", box, hu, SPACING, {})
    assert kind == "pleural effusion" and text == "Left pleural effusion, 17 mm deep."
    dry = np.full((30, 80, 60), -850.0)
    assert read_finding("Left pleural effusion, 41 mm deep.", box, dry, SPACING, {})[1] == "Left pleural effusion, 41 mm deep."


def chest_with_pneumothorax() -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Air around a soft-tissue body with two lungs; free air in two pockets on the right (low
    columns): a strip at the apex and a sliver lower down. The pockets' box, and the apex strip's."""
    hu = np.full((40, 60, 80), -1000.0)
    hu[:, 5:55, 5:75] = 40  # the body
    hu[:, 10:50, 10:38] = hu[:, 10:50, 42:70] = -850  # the lungs
    hu[30:40, 12:20, 12:36] = -1000  # apex strip
    hu[12:14, 11:13, 15:30] = -1000  # a sliver in front, lower down
    hu[20, 30, 50] = -1000  # a dark voxel of noise in the left lung
    return hu, (12, 11, 12, 40, 20, 36), (30, 12, 12, 40, 20, 36)


def test_a_pneumothorax_box_spans_all_the_free_air_on_its_side() -> None:
    hu, pockets, apex = chest_with_pneumothorax()
    assert pleural_air_box(free_air_pockets(hu), body_middle(hu), apex) == pockets


def test_a_pneumothorax_is_as_deep_as_its_deepest_air() -> None:
    hu, pockets, _ = chest_with_pneumothorax()
    assert air_depth_mm(hu, SPACING, pockets) == pytest.approx(8 * SPACING[1])  # the apex strip: 8 rows


def test_no_pneumothorax_box_without_free_air_where_the_finding_points() -> None:
    hu, _, _ = chest_with_pneumothorax()
    assert pleural_air_box(free_air_pockets(hu), body_middle(hu), (20, 20, 45, 30, 40, 65)) is None  # the left lung: only a noise voxel
    assert pleural_air_box(free_air_pockets(hu), body_middle(hu), (0, 20, 15, 8, 40, 35)) is None  # right, but clear of the air


def test_the_side_is_the_patients_whichever_way_the_columns_run() -> None:
    hu, _, _ = chest_with_pneumothorax()
    assert body_middle(hu) == 40
    low_columns = (0, 20, 12, 8, 40, 36)
    # Voxel [k, r, c, 1] to LPS mm: c along +x (towards the patient's left), r along +y, k along +z.
    columns_to_left = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])
    assert patient_side(columns_to_left, low_columns, body_middle(hu)) == "right"
    columns_to_right = columns_to_left.copy()
    columns_to_right[0, 2] = -0.8  # the image stored flipped left to right
    assert patient_side(columns_to_right, low_columns, body_middle(hu)) == "left"



def chest_with_lungs() -> np.ndarray:
    """A body (40 HU) in air with two lungs: each full from slice 20 (its dome) to 55 (its apex),
    rows 20-79, and narrower below the dome (its recesses, slices 10-19)."""
    hu = np.full((60, 100, 120), -1000.0)
    hu[:, 10:90, 5:115] = 40
    for first, last in ((15, 55), (65, 105)):
        hu[20:56, 20:80, first:last] = -850
        hu[10:20, 20:80, first + 15:last - 15] = -850
    return hu


def test_a_lung_lesion_is_placed_by_height_over_the_dome_and_depth_whichever_way_the_slices_run() -> None:
    hu = chest_with_lungs()
    upwards = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])  # k from feet to head
    dome, apex, front, back = lung_extents(hu, upwards, body_middle(hu))["right"]
    assert dome == pytest.approx(20 * 2.5, abs=2.5) and apex == pytest.approx(55 * 2.5)
    assert (front, back) == (20, 78)  # every second row
    # The same chest stored head to feet: the same places.
    downwards = upwards.copy()
    downwards[2] = [-2.5, 0, 0, 59 * 2.5]
    flipped = hu[::-1]
    for box in ((22, 70, 30, 24, 74, 34), (50, 22, 30, 52, 26, 34)):
        stored = (60 - box[3], *box[1:3], 60 - box[0], *box[4:])
        here = lung_position(lung_extents(hu, upwards, body_middle(hu))["right"], upwards, box)
        there = lung_position(lung_extents(flipped, downwards, body_middle(flipped))["right"], downwards, stored)
        assert here == pytest.approx(there, abs=0.02)
    height, depth = lung_position((dome, apex, front, back), upwards, (22, 70, 30, 24, 74, 34))
    assert lung_lobe("right", height, depth) == "right lower lobe"
    assert lung_lobe("right", *lung_position((dome, apex, front, back), upwards, (50, 22, 30, 52, 26, 34))) == "right upper lobe"
