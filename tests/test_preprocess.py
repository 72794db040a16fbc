"""Model input: resampling onto the grid, windows, anatomy regions, box bins and zoom extents."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from engines.phantom import ANATOMY_LABELS, Phantom, render_phantom
from engines.preprocess import (
    BINS,
    BLOB_CHANNELS,
    CHANNELS,
    DENSITY_CHANNELS,
    EXTREMES,
    GRID,
    HOLE_CHANNELS,
    MASK_CHANNELS,
    REGIONS,
    TOKEN_GRID,
    TOPIC_REGIONS,
    WINDOWS,
    bins_to_box,
    blob_channels,
    box_to_bins,
    cell_extremes,
    crop_extent,
    density_masks,
    extreme_eigenvalues,
    prepare,
    region_masks,
    resample_to_grid,
)

SHAPE = (64, 256, 256)  # twice GRID along every axis: each grid cell averages two voxels per axis


def _windowed(hu: float) -> list[float]:
    return [min(1.0, max(0.0, (hu - (centre - width / 2)) / width)) for centre, width in WINDOWS]


@pytest.mark.parametrize("hu", [-850, 100, -1000, 2000])
def test_constant_volume_gives_the_hand_computed_window_values(hu: int) -> None:
    model_input = prepare(np.full((40, 100, 90), hu, np.int16), (2.5, 0.7, 0.7))
    assert model_input.image.shape == (CHANNELS, *GRID)
    assert model_input.image.dtype == np.float32
    for channel, expected in zip(model_input.image[: len(WINDOWS)], _windowed(hu)):
        np.testing.assert_allclose(channel, expected, atol=1e-6)
    assert model_input.extent == (0, 0, 0, 40, 100, 90)
    assert model_input.grid_spacing_mm == pytest.approx((40 * 2.5 / 32, 100 * 0.7 / 128, 90 * 0.7 / 128))


def test_lung_window_by_hand() -> None:
    # -850 HU in the lung window (-600 / 1500): (-850 + 1350) / 1500.
    assert _windowed(-850) == pytest.approx([1 / 3, 0.0, 0.0])
    assert _windowed(100) == pytest.approx([1450 / 1500, 260 / 400, 600 / 1800])


def _slab_volume() -> np.ndarray:
    hu = np.zeros(SHAPE, np.int16)
    hu[16:24] = 1000  # grid cells 8..11 along k
    hu[:, :, 100:108] = 1000  # grid cells 50..53 along c
    return hu


def test_slab_lands_in_the_grid_cells_it_covers() -> None:
    grid = resample_to_grid(_slab_volume(), (0, 0, 0, *SHAPE))
    bright_k = np.nonzero((grid[:, :, 0] == 1000).all(axis=1))[0]
    bright_c = np.nonzero((grid[0] == 1000).all(axis=0))[0]
    assert bright_k.tolist() == [8, 9, 10, 11]
    assert bright_c.tolist() == [50, 51, 52, 53]
    assert (grid[:8, :, :50] == 0).all() and (grid[12:, :, 54:] == 0).all()


def test_crop_partly_outside_the_volume_reads_air_there() -> None:
    # k from -32 to 32: the first 16 grid cells lie before the volume; rows 128..384 run past its end.
    grid = resample_to_grid(_slab_volume(), (-32, 128, 0, 32, 384, 256))
    assert (grid[:16] == -1000).all()
    assert (grid[:, 64:] == -1000).all()
    inside = grid[:, :64]
    assert np.nonzero((inside[:, :, 0] == 1000).all(axis=1))[0].tolist() == [24, 25, 26, 27]
    assert (inside[16:, :, 50:54] == 1000).all()

    image = prepare(_slab_volume(), (1.0, 1.0, 1.0), (-32, 128, 0, 32, 384, 256)).image
    np.testing.assert_allclose(image[: len(WINDOWS), :16], np.array(_windowed(-1000))[:, None, None, None] * np.ones((1, 16, 128, 128)))


@pytest.mark.parametrize("shape", [(40, 100, 90), (90, 300, 256), (7, 33, 260)])
def test_whole_volume_matches_torch_trilinear(shape: tuple[int, int, int]) -> None:
    hu = np.random.default_rng(1).integers(-1000, 1500, shape).astype(np.int16)
    ours = resample_to_grid(hu, (0, 0, 0, *shape))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(hu.astype(np.float32))[None, None], size=GRID,
                                             mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=0.05)


def test_bad_input_is_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match="hu must be"):
        prepare(np.zeros((10, 10)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing_mm"):
        prepare(np.zeros((10, 10, 10)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="extent"):
        prepare(np.zeros((10, 10, 10)), (1.0, 1.0, 1.0), (0, 0, 0, 10, 0, 10))
    with pytest.raises(ValueError, match="box_bins"):
        bins_to_box((0, 0, 0, 65, 1, 1), (0, 0, 0, 10, 10, 10), (10, 10, 10))


# --- box bins ----------------------------------------------------------------------------------


def _random_boxes(shape: tuple[int, int, int], count: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        starts = [int(rng.integers(0, n)) for n in shape]
        stops = [int(rng.integers(s + 1, n + 1)) for s, n in zip(starts, shape)]
        boxes.append((*starts, *stops))
    return boxes


@pytest.mark.parametrize("shape", [(160, 512, 512), (37, 101, 77), (5, 13, 7), (300, 64, 1000)])
@pytest.mark.parametrize("crop", [False, True])
def test_box_bins_round_trip(shape: tuple[int, int, int], crop: bool) -> None:
    for box in _random_boxes(shape, 50, seed=sum(shape)):
        extent = crop_extent(box, (1.0, 0.8, 0.8), shape) if crop else (0, 0, 0, *shape)
        bins = box_to_bins(box, extent)
        assert all(0 <= b <= BINS for b in bins)
        assert all(bins[i + 3] > bins[i] for i in range(3))
        back = bins_to_box(bins, extent, shape)
        assert all(back[i + 3] > back[i] for i in range(3))
        assert all(0 <= back[i] and back[i + 3] <= shape[i] for i in range(3))
        for axis in range(3):
            bin_voxels = (extent[axis + 3] - extent[axis]) / BINS
            # Bins cover the box, so each edge moves outwards by under a bin, then rounds.
            assert back[axis] <= box[axis] + 0.5 and back[axis + 3] >= box[axis + 3] - 0.5
            assert box[axis] - back[axis] <= bin_voxels + 0.5
            assert back[axis + 3] - box[axis + 3] <= bin_voxels + 0.5
        again = box_to_bins(back, extent)
        assert all(abs(a - b) <= 1 for a, b in zip(again, bins))


@pytest.mark.parametrize("shape", [(160, 512, 512), (37, 101, 77), (5, 13, 7)])
def test_bins_box_round_trip(shape: tuple[int, int, int]) -> None:
    extent = (0, 0, 0, *shape)
    for bins in _random_boxes((BINS, BINS, BINS), 50, seed=3):
        voxels = bins_to_box(bins, extent, shape)
        again = box_to_bins(voxels, extent)
        for axis in range(3):
            # Edges round to the nearest voxel edge: within one bin, or one voxel where voxels
            # are wider than bins.
            slack = max(1, int(np.ceil(BINS / shape[axis])))
            assert abs(again[axis] - bins[axis]) <= slack
            assert abs(again[axis + 3] - bins[axis + 3]) <= slack


def test_box_bins_edges() -> None:
    shape = (40, 100, 90)
    assert box_to_bins((0, 0, 0, *shape), (0, 0, 0, *shape)) == (0, 0, 0, BINS, BINS, BINS)
    assert box_to_bins((20, 50, 45, 21, 51, 46), (0, 0, 0, *shape)) == (32, 32, 32, 34, 33, 33)  # 21/40, 51/100, 46/90 of 64, up
    # A box beyond a crop extent keeps one bin at the edge.
    assert box_to_bins((0, 0, 0, 2, 2, 2), (10, 10, 10, 20, 20, 20)) == (0, 0, 0, 1, 1, 1)
    assert bins_to_box((0, 0, 0, BINS, BINS, BINS), (0, 0, 0, *shape), shape) == (0, 0, 0, *shape)
    assert bins_to_box((0, 0, 0, 1, 1, 1), (-50, -50, -50, 10, 10, 10), shape) == (0, 0, 0, 1, 1, 1)


# --- zoom extents --------------------------------------------------------------------------------


def test_crop_extent_grows_by_the_margin_and_to_the_minimum_size() -> None:
    spacing, shape = (2.0, 0.5, 0.5), (100, 512, 512)
    small = crop_extent((50, 200, 300, 51, 204, 304), spacing, shape)
    sizes = [small[i + 3] - small[i] for i in range(3)]
    assert sizes == pytest.approx([48 / 2.0, 48 / 0.5, 48 / 0.5])
    assert [(small[i] + small[i + 3]) / 2 for i in range(3)] == pytest.approx([50.5, 202, 302])

    large = crop_extent((10, 100, 100, 40, 300, 400), spacing, shape)
    assert [large[i + 3] - large[i] for i in range(3)] == pytest.approx([30 + 12, 200 + 48, 300 + 48])

    edge = crop_extent((0, 0, 0, 2, 2, 2), spacing, shape)
    assert edge[0] < 0 and edge[1] < 0  # past the volume: prepare() reads air there
    with pytest.raises(ValueError, match="past the volume"):
        crop_extent((0, 0, 0, 101, 2, 2), spacing, shape)


# --- anatomy regions -----------------------------------------------------------------------------

# Observed Dice at the grid (lung, bone, liver, heart): seed 0 normal 0.989 0.897 0.950 0.793;
# seed 3 with findings 0.969 0.932 0.910 0.738. Bounds leave some slack.
MIN_DICE = {"lung": 0.95, "bone": 0.80, "liver": 0.85, "heart": 0.65}
LABELS = {"lung": ("lung",), "bone": ("bone",), "liver": ("liver",), "heart": ("heart", "pericardium")}
PHANTOMS = {
    "normal": (0, {"normal": True}),
    "findings": (3, {"findings": {"pleura": ["pleural effusion"], "heart": ["cardiomegaly"],
                                  "liver": ["hypodense lesion"], "bones": ["lytic lesion"], "lungs": ["mass"]}}),
}


@cache
def _phantom(name: str) -> tuple[Phantom, dict[str, np.ndarray]]:
    seed, kwargs = PHANTOMS[name]
    phantom = render_phantom(seed, **kwargs)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    extent = (0, 0, 0, *phantom.hu.shape)
    grid_spacing = tuple(n * s / g for n, s, g in zip(phantom.hu.shape, spacing, GRID))
    return phantom, region_masks(resample_to_grid(phantom.hu, extent), grid_spacing)


def _label_on_grid(phantom: Phantom, mask: np.ndarray) -> np.ndarray:
    return resample_to_grid(mask, (0, 0, 0, *phantom.hu.shape), fill=0) > 0.5


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("name", sorted(PHANTOMS))
@pytest.mark.parametrize("region", sorted(MIN_DICE))
def test_region_agrees_with_the_phantom_anatomy(name: str, region: str) -> None:
    phantom, masks = _phantom(name)
    label = np.isin(phantom.anatomy, [ANATOMY_LABELS[n] for n in LABELS[region]])
    assert _dice(masks[region], _label_on_grid(phantom, label)) > MIN_DICE[region]


def test_pleural_effusion_lies_in_the_pleura_region_not_the_lung() -> None:
    phantom, masks = _phantom("findings")
    numbers = [i for i, f in enumerate((f for t in phantom.truth.topics for f in t.findings), start=1)
               if f.type == "pleural effusion"]
    effusion = _label_on_grid(phantom, np.isin(phantom.finding_map, numbers))
    assert effusion.sum() > 100
    # The 27 mm deep effusion reaches past the 15 mm band around the lung: about 60 % inside.
    assert (effusion & masks["pleura"]).sum() / effusion.sum() > 0.5
    assert (effusion & masks["lung"]).sum() / effusion.sum() < 0.05


def test_pooled_regions_are_fractions_per_token() -> None:
    phantom, _ = _phantom("normal")
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    model_input = prepare(phantom.hu, spacing)
    assert set(model_input.regions) == set(REGIONS)
    assert set(TOPIC_REGIONS.values()) <= set(REGIONS)
    for name, fraction in model_input.regions.items():
        assert fraction.shape == TOKEN_GRID and fraction.dtype == np.float32, name
        assert 0.0 <= fraction.min() and fraction.max() <= 1.0, name
        assert fraction.max() > 0.0, f"{name} covers no token"
    assert model_input.regions["body"].mean() > model_input.regions["lung"].mean()


def test_anatomy_masks_follow_the_windows_as_channels() -> None:
    phantom, masks = _phantom("findings")
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    image = prepare(phantom.hu, spacing).image
    assert image.shape == (CHANNELS, *GRID)
    intensity = len(WINDOWS) * (1 + len(EXTREMES))
    assert CHANNELS == intensity + len(MASK_CHANNELS) + len(HOLE_CHANNELS) + len(DENSITY_CHANNELS) + len(BLOB_CHANNELS)
    for channel, name in zip(image[intensity:], MASK_CHANNELS):
        np.testing.assert_array_equal(channel, masks[name].astype(np.float32), err_msg=name)
        assert channel.any(), name
    holes = dict(zip(HOLE_CHANNELS, image[intensity + len(MASK_CHANNELS):].astype(bool)))
    for name, hole in holes.items():
        assert not (hole & masks[name]).any(), name
    # The lung mass and the lytic lesion (soft tissue HU) are holes in the lung and bone masks.
    types = [f.type for t in phantom.truth.topics for f in t.findings]
    for kind, name in (("mass", "lung"), ("lytic lesion", "bone")):
        lesion = _label_on_grid(phantom, phantom.finding_map == types.index(kind) + 1)
        assert (lesion & holes[name]).sum() > 0.5 * lesion.sum() > 0, kind
    grid_hu = resample_to_grid(phantom.hu, (0, 0, 0, *phantom.hu.shape))
    densities = image[-len(DENSITY_CHANNELS) - len(BLOB_CHANNELS):-len(BLOB_CHANNELS)]
    np.testing.assert_array_equal(densities.astype(bool), density_masks(grid_hu, masks))
    np.testing.assert_array_equal(image[-len(BLOB_CHANNELS):], blob_channels(phantom.hu, spacing, (0, 0, 0, *phantom.hu.shape)))


def _ball(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre_mm, radius_mm: float) -> np.ndarray:
    axes = np.meshgrid(*[(np.arange(n) + 0.5) * s - c for n, s, c in zip(shape, spacing, centre_mm)], indexing="ij")
    return sum(a * a for a in axes) <= radius_mm ** 2


def test_blob_channels_light_a_ball_and_not_a_tube_of_the_same_width() -> None:
    shape, spacing = (40, 160, 160), (2.5, 0.8, 0.8)
    hu = np.full(shape, -850.0, np.float32)  # aerated lung
    hu[_ball(shape, spacing, (50, 40, 40), 5.0)] = 40.0  # a 10-mm nodule
    k, r, c = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    hu[(r - 90) ** 2 + (c - 90) ** 2 <= 25.0] = 40.0  # a vessel of the same width along k
    hu[20:30, 100:140, 10:40] = 300.0  # cancellous bone, with a dark 8-mm lytic and a dense 8-mm sclerotic lesion
    hu[_ball(shape, spacing, (62.5, 88, 18), 4.0)] = 30.0
    hu[_ball(shape, spacing, (62.5, 100, 24), 4.0)] = 900.0
    spots = blob_channels(hu, spacing, (0, 0, 0, *shape))
    assert spots.shape == (len(BLOB_CHANNELS), *GRID) and spots.dtype == np.float32
    assert 0.0 <= spots.min() and spots.max() <= 1.0
    bright, dark, dense = spots
    cell = lambda mm: tuple(int(m / s / n * g) for m, s, n, g in zip(mm, spacing, shape, GRID))  # noqa: E731
    nodule, vessel, lytic, sclerotic = cell((50, 40, 40)), cell((50, 90, 90)), cell((62.5, 88, 18)), cell((62.5, 100, 24))
    assert bright[nodule] == bright.max() > 0.2
    assert bright[vessel] < 0.2 * bright[nodule]
    assert dark[lytic] == dark.max() > 0.2
    assert dense[sclerotic] == dense.max() > 0.2


def test_extreme_eigenvalues_match_lapack_also_for_repeated_ones() -> None:
    rng = np.random.default_rng(0)
    matrices = rng.normal(size=(2000, 3, 3))
    matrices += matrices.transpose(0, 2, 1)
    matrices[:3] = np.diag([-2.0, -2.0, -2.0])  # a sphere's Hessian: one eigenvalue three times
    matrices[3:6] = np.diag([-1.0, -1.0, -3.0])
    matrices[6:9] = 0.0
    smallest, largest = extreme_eigenvalues(*(matrices[:, i, j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))))
    expected = np.linalg.eigvalsh(matrices)
    np.testing.assert_allclose(smallest, expected[:, 0], atol=1e-7)
    np.testing.assert_allclose(largest, expected[:, 2], atol=1e-7)


def test_blob_channels_of_a_crop_match_the_whole_volumes_there_and_read_nothing_outside() -> None:
    shape, spacing = (40, 160, 160), (2.5, 0.8, 0.8)
    hu = np.full(shape, -850.0, np.float32)
    hu[_ball(shape, spacing, (50, 40, 40), 5.0)] = 40.0
    whole = blob_channels(hu, spacing, (0, 0, 0, *shape))
    # A crop of a quarter per axis, aligned to the grid: its cells are the whole grid's cells
    # split four ways per axis, so their highest is the whole grid cell's.
    crop = (16, 32, 32, 26, 72, 72)
    part = blob_channels(hu, spacing, crop)
    assert part[0].max() == pytest.approx(whole[0].max(), rel=0.05)
    assert not blob_channels(hu, spacing, (50, 0, 0, 60, 160, 160)).any()  # past the last slice


def test_density_masks_mark_gas_dense_islands_and_fluid() -> None:
    hu = np.full((2, 40, 40), 40.0, np.float32)  # soft tissue
    hu[:, 38:] = -100.0  # fat: its edge with the soft tissue averages to water density
    lung = np.zeros(hu.shape, bool)
    lung[:, 2:18, 2:18] = True
    hu[lung] = -850.0
    hu[:, 5:8, 5:8] = -1000.0  # a pneumothorax's gas
    bone = np.zeros(hu.shape, bool)
    bone[:, 22:36, 22:36] = True
    hu[bone] = 1000.0  # cortex round ...
    hu[:, 23:35, 23:35] = 300.0  # ... cancellous bone, with a sclerotic island
    hu[:, 28:30, 28:30] = 900.0
    hu[:, 22:36, 2:16] = 10.0  # an effusion
    masks = {"lung": lung, "bone": bone, "body": np.ones(hu.shape, bool)}
    gas, island, fluid = density_masks(hu, masks)
    np.testing.assert_array_equal(np.argwhere(gas[0]).min(0), (5, 5))
    assert gas.sum() == 2 * 9 and island.sum() == 2 * 4
    assert island[:, 28:30, 28:30].all() and not island[:, 22].any()  # the island, not the cortex
    assert fluid[:, 23:35, 3:15].all()  # the effusion inside its rim
    assert not fluid[:, 37:].any()  # the fat edge varies too much
    assert not fluid[:, 2:18, 2:18].any() and not fluid[:, :, 20:].any()  # lung, soft tissue, bone


def test_density_masks_show_a_phantoms_pneumothorax_sclerotic_lesion_and_pericardial_effusion() -> None:
    phantom = render_phantom(2, findings={"pleura": ["pneumothorax"], "bones": ["sclerotic lesion"],
                                          "heart": ["pericardial effusion"]})
    extent = (0, 0, 0, *phantom.hu.shape)
    grid_hu = resample_to_grid(phantom.hu, extent)
    spacing = (phantom.slice_spacing_mm, phantom.pixel_spacing_mm, phantom.pixel_spacing_mm)
    masks = region_masks(grid_hu, tuple(n * s / g for n, s, g in zip(phantom.hu.shape, spacing, GRID)))
    gas, island, fluid = density_masks(grid_hu, masks)
    types = [f.type for t in phantom.truth.topics for f in t.findings]
    lesion = {kind: _label_on_grid(phantom, phantom.finding_map == types.index(kind) + 1) for kind in types}
    assert (gas & lesion["pneumothorax"]).sum() > 0.8 * lesion["pneumothorax"].sum() > 0
    assert not (gas & ~lesion["pneumothorax"]).any()  # aerated lung lies above -950 HU
    assert (island & lesion["sclerotic lesion"]).sum() == lesion["sclerotic lesion"].sum() > 0
    assert (fluid & lesion["pericardial effusion"]).sum() > 0.4 * lesion["pericardial effusion"].sum() > 0


def test_cell_extremes_keep_a_single_voxel_that_trilinear_samples_miss() -> None:
    hu = np.full((100, 64, 64), 300, np.int16)
    hu[40, 30, 30] = 1000  # 100 slices onto 32: the trilinear samples read slices 38-39 and 41-42
    hu[70, 10, 50] = 0
    extent = (0, 0, 0, *hu.shape)
    assert resample_to_grid(hu, extent).max() == 300
    highest, lowest = cell_extremes(hu, extent)
    assert highest.shape == lowest.shape == GRID
    cell = (40 * GRID[0] // 100, 30 * GRID[1] // 64, 30 * GRID[2] // 64)
    # Each voxel overlaps two cells along every axis here: slice 40 reaches into cell 13 (from 40.6)
    # and the grid halves the voxels in-plane.
    assert highest[cell] == 1000 and (highest == 1000).sum() == 8
    assert lowest[70 * GRID[0] // 100, 10 * GRID[1] // 64, 50 * GRID[2] // 64] == 0 and (lowest == 0).sum() == 4
    assert (lowest >= 0).all() and (highest <= 1000).all()
    # A crop reaching past the volume reads air there; its cells smaller than a voxel still read one.
    highest, lowest = cell_extremes(hu, (-10, 0, 0, 20, 64, 64))
    assert (highest[:10] == -1000).all() and (lowest[11:] >= 300).any()
    image = prepare(hu, (1.0, 1.0, 1.0)).image
    bone_window_highest = len(WINDOWS) + 2
    assert image[bone_window_highest][cell] > image[2][cell] + 0.2


def test_regions_of_air_are_empty() -> None:
    model_input = prepare(np.full((20, 64, 64), -1000, np.int16), (5.0, 1.0, 1.0))
    assert all(float(f.max()) == 0.0 for f in model_input.regions.values())
