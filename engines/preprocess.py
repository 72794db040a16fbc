"""A HU volume, or a box-sized part of it, as the fixed-size input of Readout's 3D vision-language model.

``prepare`` resamples the region to `GRID` (trilinear, cell ``i`` covering the ``i``-th of
`GRID` equal parts of the region), windows it into three channels, adds the same windows of each
cell's highest and lowest HU (`cell_extremes`) and derives rough anatomy
regions and density classes from HU alone (more channels; the regions are also pooled per token
for the topic guide), so the same
function serves training on phantoms and inference on real CT. Boxes travel between voxels and
the model's coordinate bins with `box_to_bins` and `bins_to_box`; `crop_extent` picks the region
for a zoomed re-look at a box.

Directions follow the Volume contract for axial CT: ``k`` runs feet to head, rows run anterior
to posterior and columns patient right to left (LPS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID: tuple[int, int, int] = (32, 128, 128)
PATCH: tuple[int, int, int] = (4, 16, 16)
TOKEN_GRID: tuple[int, int, int] = (8, 8, 8)  # GRID // PATCH
FINDING_GRID: tuple[int, int, int] = (32, 64, 64)  # the demo model's finding maps: GRID // its first stem stride
BINS = 64
#: (centre, width) in HU of the three channels: lung, mediastinum (soft tissue), bone.
WINDOWS: tuple[tuple[float, float], ...] = ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0))
#: Each cell's highest and lowest HU, through the same windows, follow as six more channels: a
#: trilinear sample between slices that lie 5-10 mm apart on the grid can miss a 5-mm nodule or
#: bone lesion altogether, its thin-slab maximum or minimum cannot (as radiologists read MIP slabs).
EXTREMES = ("highest", "lowest")
#: Anatomy masks (`region_masks`) that follow the windows as input channels, so the first layers
#: know which organ a cell lies in ...
MASK_CHANNELS: tuple[str, ...] = ("lung", "pleura", "heart", "liver", "bone")
#: ... then, for these masks, the cells each encloses in-plane without containing them: the holes a
#: nodule, a liver lesion or a lytic lesion leaves (vessels and the spinal canal leave some too).
HOLE_CHANNELS: tuple[str, ...] = ("lung", "liver", "bone")
#: Last, HU classes that name a finding by density (`density_masks`): gas below -950 HU inside the
#: lungs' region (aerated lung lies above it; CT's low-attenuation-area threshold), dense islands
#: that cancellous bone encloses, and fluid (water density over a homogeneous patch). A window
#: shows these as small shifts of grey; as masks they stand out as holes do.
DENSITY_CHANNELS: tuple[str, ...] = ("gas", "dense island", "fluid")
#: Then round spots (`blob_channels`): name, the HU range the volume is clipped to, +1 for bright or -1
#: for dark spots, and the response that reads 1 (a 10-mm nodule in lung gives about 100-200, a lytic
#: lesion in bone 20-40, a sclerotic one 30-100). A bright spot in lung is a nodule's signature, a dark
#: one in soft tissue or bone a lytic or liver lesion's, a bright one in bone a sclerotic lesion's; a
#: vessel or a rib is a tube, a cortex a plate, not a spot, and they score low. On phantoms 8100-8159
#: the bright-lung filter ranked the nodule first among all its volume's peaks outside findings for 24
#: of 29 nodules of 5-29 mm, among the first three for 28, where the grid's cells blur small nodules
#: and vessels alike.
BLOB_CHANNELS: tuple[tuple[str, tuple[float, float], int, float], ...] = (
    ("bright lung spot", (-1000.0, 100.0), 1, 250.0), ("dark tissue spot", (-100.0, 400.0), -1, 50.0),
    ("bright bone spot", (150.0, 1200.0), 1, 100.0))
CHANNELS = (len(WINDOWS) * (1 + len(EXTREMES)) + len(MASK_CHANNELS) + len(HOLE_CHANNELS) + len(DENSITY_CHANNELS)
            + len(BLOB_CHANNELS))
#: The anatomy region each report topic is about.
TOPIC_REGIONS: dict[str, str] = {"lungs": "lung", "pleura": "pleura", "heart": "heart", "liver": "liver",
                                 "bones": "bone"}
REGIONS: tuple[str, ...] = ("lung", "pleura", "heart", "liver", "bone", "body")
AIR_HU = -1000.0

_BODY_HU = -400.0  # above: tissue; below, inside the body: lung or gas
_BONE_HU = 200.0
_HEART_HU = (-50.0, 150.0)
_LIVER_HU = (20.0, 120.0)
_PLEURA_MM = 15.0
_MIN_LUNG_ML = 5.0  # smaller gas pockets inside the body are bowel or noise, not lung
# Slices are told apart by their lung area as a share of the largest slice's.
_LUNG_BASE_SHARE = 0.1  # below the first slice with this much lies the abdomen
_HEART_SHARE = 0.25  # the heart is looked for only in slices with this much ...
_HEART_WIDEST_SHARE = 0.5  # ... and found first in its widest slice among those with this much
_LIVER_CUT = 0.6  # share of the lungs' width, from the right, that the liver may occupy
_MIN_CONTRAST_HU = 12.0  # soft tissue classes closer than this are not split by HU
_GAS_HU = -950.0
_DENSE_BONE_HU = 500.0  # above cancellous bone (about 150-350 HU), below cortex
_FLUID_HU = (-10.0, 25.0)
_FLUID_SD_HU = 15.0  # fat-to-muscle edges average into the fluid range too, but vary far more
# Blob filter scales: a sphere of radius r answers most at sigma = r / sqrt(3), so these suit nodules of
# about 8-14 mm; larger ones still answer, less. The volume is block-averaged to about _BLOB_STEP_MM
# first (the filters blur more than that anyway).
_BLOB_SIGMAS_MM = (2.5, 4.0)
_BLOB_STEP_MM = 2.0
_BLOB_FLOOR = 1.0  # weaker responses are noise and left at 0
_EPS = 1e-9  # keeps float round-off from pushing an exact bin edge into the next bin
# Face neighbours within a slice only: slices may lie far apart, and some steps are per slice.
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass
class ModelInput:
    """The model's view of one region of a volume.

    Attributes
    ----------
    image:
        float32 ``[CHANNELS, *GRID]`` in [0, 1]: the region through each of `WINDOWS`, its cells'
        highest and lowest HU through them (`EXTREMES`), then its `MASK_CHANNELS`,
        `HOLE_CHANNELS` and `DENSITY_CHANNELS` (0 or 1), and its `BLOB_CHANNELS`.
    grid_spacing_mm:
        Millimetres per grid cell along k, r and c.
    regions:
        float32 `TOKEN_GRID` per name in `REGIONS`: the fraction of each token's cells inside it.
    extent:
        ``(k0, r0, c0, k1, r1, c1)``: the region in the source's voxel edge coordinates
        (half-open like boxes; the whole volume is ``(0, 0, 0, K, R, C)``).
    """

    image: np.ndarray
    grid_spacing_mm: tuple[float, float, float]
    regions: dict[str, np.ndarray]
    extent: tuple[float, ...]


def prepare(hu: np.ndarray, spacing_mm: tuple[float, float, float],
            extent: Sequence[float] | None = None) -> ModelInput:
    """Resample ``extent`` of ``hu`` to `GRID`, window it and find the anatomy regions.

    Parameters
    ----------
    hu:
        HU indexed ``[k, r, c]``, any real dtype.
    spacing_mm:
        Voxel spacing along k, r and c.
    extent:
        ``(k0, r0, c0, k1, r1, c1)`` in voxel edge coordinates; may reach past the volume,
        which reads as air there. Default: the whole volume.

    Returns
    -------
    ModelInput

    Raises
    ------
    ValueError
        For a ``hu`` that is not 3-D, a non-positive spacing or an empty extent.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3 or 0 in hu.shape:
        raise ValueError(f"hu must be a non-empty 3-D array [k, r, c], got shape {hu.shape}")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be three positive millimetre values, got {tuple(spacing_mm)}")
    extent = _check_extent((0, 0, 0, *hu.shape) if extent is None else extent)
    grid_hu = resample_to_grid(hu, extent)
    grid_spacing = tuple(float((extent[i + 3] - extent[i]) * spacing_mm[i] / GRID[i]) for i in range(3))
    masks = region_masks(grid_hu, grid_spacing)
    regions = {name: pool_to_tokens(mask) for name, mask in masks.items()}
    holes = [ndimage.binary_fill_holes(masks[name], structure=_IN_PLANE) & ~masks[name] for name in HOLE_CHANNELS]
    anatomy = [masks[name] for name in MASK_CHANNELS] + holes + density_masks(grid_hu, masks)
    highest, lowest = cell_extremes(hu, extent)
    image = np.concatenate([window(grid_hu), window(highest), window(lowest), np.stack(anatomy).astype(np.float32),
                            blob_channels(hu, spacing_mm, extent)])
    return ModelInput(image, grid_spacing, regions, extent)  # type: ignore[arg-type]


def resample_to_grid(values: np.ndarray, extent: Sequence[float], fill: float = AIR_HU,
                     grid: tuple[int, int, int] = GRID) -> np.ndarray:
    """Trilinear samples of ``values`` at the centres of ``grid`` cells spread over ``extent``.

    Within the volume's edges the samples match ``torch.nn.functional.interpolate`` with
    ``align_corners=False`` (the outermost half voxel repeats the edge voxel); cells whose
    centre lies outside the volume get ``fill``. Returns float32 ``grid``.
    """
    if values.ndim != 3:
        raise ValueError(f"values must be a 3-D array [k, r, c], got shape {values.shape}")
    extent = _check_extent(extent)
    out = values
    outside = []
    # Separable, one axis at a time from k: the first gather reads only the slices it needs,
    # and only the gathered voxels are converted to float.
    for axis in range(3):
        i0, i1, w, inside = _axis_samples(extent[axis], extent[axis + 3], grid[axis], values.shape[axis])
        shape = [1, 1, 1]
        shape[axis] = -1
        a0 = np.take(out, i0, axis=axis).astype(np.float32, copy=False)
        a1 = np.take(out, i1, axis=axis).astype(np.float32, copy=False)
        out = a0 + (a1 - a0) * w.reshape(shape)
        outside.append(~inside)
    k_out, r_out, c_out = outside
    if k_out.any() or r_out.any() or c_out.any():
        out[k_out[:, None, None] | r_out[None, :, None] | c_out[None, None, :]] = fill
    return out


def cell_extremes(values: np.ndarray, extent: Sequence[float], fill: float = AIR_HU,
                  grid: tuple[int, int, int] = GRID) -> tuple[np.ndarray, np.ndarray]:
    """The highest and the lowest of the voxels each ``grid`` cell over ``extent`` overlaps.

    A cell wholly outside the volume gets ``fill``. Returns two float32 ``grid`` arrays.
    """
    extent = _check_extent(extent)
    ranges = [_axis_cells(extent[a], extent[a + 3], grid[a], values.shape[a]) for a in range(3)]
    out = []
    for reduce in (np.max, np.min):
        x = values
        # Separable: the extreme over a box is the extreme over each axis in turn.
        for axis, (start, stop) in enumerate(ranges):
            x = np.stack([reduce(x[(slice(None),) * axis + (slice(a, b),)], axis=axis) if b > a
                          else np.full(np.delete(x.shape, axis), fill, x.dtype)
                          for a, b in zip(start, stop)], axis=axis)
        out.append(x.astype(np.float32))
    return out[0], out[1]


def window(grid_hu: np.ndarray) -> np.ndarray:
    """HU through each of `WINDOWS`, scaled to [0, 1]: float32 ``[3, *grid_hu.shape]``."""
    channels = [(grid_hu - (centre - width / 2)) / width for centre, width in WINDOWS]
    return np.clip(np.stack(channels), 0.0, 1.0).astype(np.float32, copy=False)


def region_masks(grid_hu: np.ndarray, grid_spacing_mm: Sequence[float]) -> dict[str, np.ndarray]:
    """Rough anatomy masks (bool, same shape as ``grid_hu``) for each name in `REGIONS`, from HU only.

    They are hints that tell the model where a topic's findings lie, not segmentations.
    """
    spacing = tuple(float(s) for s in grid_spacing_mm)
    body = _body(grid_hu)
    lung = _lung(grid_hu, body, spacing)
    # In-plane distance only: slices may be far apart, and the pleura wraps the lung sideways.
    pleura = ndimage.distance_transform_edt(~lung, sampling=(1e6, spacing[1], spacing[2])) <= _PLEURA_MM
    pleura &= body
    bone = body & (grid_hu > _BONE_HU)
    area = lung.sum(axis=(1, 2))
    share = area / area.max() if area.max() else np.zeros(area.shape)
    # Soft tissues differ by tens of HU, less than the noise of single cells.
    smooth = ndimage.uniform_filter(grid_hu, size=(1, 3, 3))
    # Bone edges blur into the soft tissue range; they would skew the liver's HU split.
    near_bone = ndimage.binary_dilation(bone, _IN_PLANE, iterations=2)
    liver = _liver(smooth, body & ~near_bone, lung, share)
    # The heart sits on the liver's dome; a ring of cells keeps the two apart.
    heart = _heart(smooth, body & ~ndimage.binary_dilation(liver, _IN_PLANE), lung, bone, share)
    return {"lung": lung, "pleura": pleura, "heart": heart, "liver": liver, "bone": bone, "body": body}


def density_masks(grid_hu: np.ndarray, masks: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The `DENSITY_CHANNELS` of ``grid_hu``, given its `region_masks`: bool arrays of its shape."""
    gas = masks["lung"] & (grid_hu < _GAS_HU)
    # Cancellous bone's holes that are dense: a cortex borders the marrow, an island lies inside it.
    cancellous = masks["bone"] & (grid_hu < _DENSE_BONE_HU)
    island = ndimage.binary_fill_holes(cancellous, structure=_IN_PLANE) & (grid_hu >= _DENSE_BONE_HU)
    mean = ndimage.uniform_filter(grid_hu, size=(1, 3, 3))
    variance = ndimage.uniform_filter(grid_hu * grid_hu, size=(1, 3, 3)) - mean * mean
    fluid = ((mean > _FLUID_HU[0]) & (mean < _FLUID_HU[1]) & (variance < _FLUID_SD_HU ** 2)
             & masks["body"] & ~masks["lung"])
    return [gas, island, fluid]


def blob_channels(hu: np.ndarray, spacing_mm: Sequence[float], extent: Sequence[float]) -> np.ndarray:
    """Each grid cell's strongest round spot per `BLOB_CHANNELS`: float32 ``[len(BLOB_CHANNELS), *GRID]`` in [0, 1].

    The spot measure is the dot filter of Li, Sone and Doi (Med. Phys. 2003) on the scale-normalized
    Hessian: where all three eigenvalues are negative (a bright peak), the weakest squared over the
    strongest, so a sphere scores high and a tube or a plate (one or two eigenvalues near 0) low.
    It is computed on the voxels around ``extent``, not on the grid, whose slices may lie 10 mm apart.
    """
    extent = _check_extent(extent)
    # Thin slices are averaged in pairs or more; in-plane, blocks reach the step at least.
    steps = (max(1, math.floor(_BLOB_STEP_MM / float(spacing_mm[0]))),
             *(max(1, math.ceil(_BLOB_STEP_MM / float(spacing_mm[a]))) for a in (1, 2)))
    spacing = tuple(float(spacing_mm[a]) * steps[a] for a in range(3))
    margin = [math.ceil(3 * max(_BLOB_SIGMAS_MM) / float(spacing_mm[a])) for a in range(3)]
    # Blocks start at multiples of the step, as the whole volume's do: a crop then sees the same voxels.
    lo = [max(0, (math.floor(extent[a]) - margin[a]) // steps[a] * steps[a]) for a in range(3)]
    count = [(min(hu.shape[a], math.ceil(extent[a + 3]) + margin[a]) - lo[a]) // steps[a] for a in range(3)]
    out = np.zeros((len(BLOB_CHANNELS), *GRID), np.float32)
    if min(count) < 1:
        return out  # the extent lies outside the volume
    part = hu[tuple(slice(lo[a], lo[a] + count[a] * steps[a]) for a in range(3))].astype(np.float32)
    part = part.reshape(count[0], steps[0], count[1], steps[1], count[2], steps[2]).mean(axis=(1, 3, 5))
    part_extent = tuple((extent[a] - lo[a % 3]) / steps[a % 3] for a in range(6))
    for i, (_, (low, high), sign, full) in enumerate(BLOB_CHANNELS):
        spots = np.max([_dot_filter(sign * np.clip(part, low, high), sigma, spacing) for sigma in _BLOB_SIGMAS_MM], axis=0)
        out[i] = np.clip(cell_extremes(spots, part_extent, fill=0.0)[0] / full, 0.0, 1.0)
    return out


def _dot_filter(values: np.ndarray, sigma_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """The dot filter (`blob_channels`) of ``values`` at scale ``sigma_mm``; 0 wherever it is not a bright peak."""
    sigma = [sigma_mm / s for s in spacing_mm]
    hessian = {}
    # Gaussian derivatives axis by axis, each partial result shared by the Hessian entries that
    # need it (15 one-dimensional passes instead of 18), in gaussian_filter's own order.
    partial = {(): values}
    for axis in range(3):
        for orders in [key for key in partial if len(key) == axis]:
            for order in range(3 - sum(orders)):
                if axis == 2 and sum(orders) + order != 2:
                    continue
                partial[(*orders, order)] = ndimage.gaussian_filter1d(partial[orders], sigma[axis], axis, order=order)
    for orders, h in partial.items():
        if len(orders) == 3:
            i, j = [a for a in range(3) for _ in range(orders[a])]
            hessian[i, j] = h * (sigma_mm ** 2 / (spacing_mm[i] * spacing_mm[j]))
    # A negative definite matrix has a negative diagonal, and a response of at least _BLOB_FLOOR a
    # trace below -3 _BLOB_FLOOR (each eigenvalue at most the weakest): only those voxels need eigenvalues.
    where = np.nonzero((hessian[0, 0] < 0) & (hessian[1, 1] < 0) & (hessian[2, 2] < 0)
                       & (hessian[0, 0] + hessian[1, 1] + hessian[2, 2] < -3 * _BLOB_FLOOR))
    strongest, weakest = extreme_eigenvalues(*(hessian[key][where] for key in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))))
    out = np.zeros(values.shape, np.float32)
    out[where] = np.where(weakest < 0, weakest ** 2 / np.maximum(-strongest, 1e-6), 0.0)
    return out


def extreme_eigenvalues(a00: np.ndarray, a11: np.ndarray, a22: np.ndarray, a01: np.ndarray, a02: np.ndarray,
                        a12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest and largest eigenvalues of symmetric 3x3 matrices given entry by entry (float64).

    Closed form (the characteristic cubic's trigonometric roots): numpy's eigvalsh, one LAPACK call
    per matrix, took 28% of `prepare`'s time.
    """
    a00, a11, a22, a01, a02, a12 = (np.asarray(a, np.float64) for a in (a00, a11, a22, a01, a02, a12))
    mean = (a00 + a11 + a22) / 3
    b00, b11, b22 = a00 - mean, a11 - mean, a22 - mean
    scale = np.sqrt((b00 ** 2 + b11 ** 2 + b22 ** 2 + 2 * (a01 ** 2 + a02 ** 2 + a12 ** 2)) / 6)
    safe = np.where(scale > 0, scale, 1.0)
    det = (b00 * (b11 * b22 - a12 ** 2) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)) / safe ** 3
    angle = np.arccos(np.clip(det / 2, -1.0, 1.0)) / 3
    return mean + 2 * scale * np.cos(angle + 2 * np.pi / 3), mean + 2 * scale * np.cos(angle)


def pool_to_tokens(mask: np.ndarray) -> np.ndarray:
    """The fraction of each token's `PATCH` of cells that ``mask`` covers: float32 `TOKEN_GRID`."""
    if mask.shape != GRID:
        raise ValueError(f"mask must have the grid's shape {GRID}, got {mask.shape}")
    (tk, tr, tc), (pk, pr, pc) = TOKEN_GRID, PATCH
    blocks = mask.reshape(tk, pk, tr, pr, tc, pc)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def box_to_bins(box_voxel: Sequence[int], extent: Sequence[float]) -> tuple[int, ...]:
    """A half-open voxel box as a half-open box of `BINS` coordinate bins of ``extent``.

    Each bin box covers its voxel box (start rounded down, end up), clipped to ``[0, BINS]``
    and at least one bin wide.
    """
    _check_box(box_voxel, "box_voxel")
    extent = _check_extent(extent)
    start, end = [], []
    for axis in range(3):
        lo, size = extent[axis], extent[axis + 3] - extent[axis]
        b0 = math.floor((box_voxel[axis] - lo) / size * BINS + _EPS)
        b1 = math.ceil((box_voxel[axis + 3] - lo) / size * BINS - _EPS)
        b0 = min(max(b0, 0), BINS - 1)
        start.append(b0)
        end.append(min(max(b1, b0 + 1), BINS))
    return (*start, *end)


def bins_to_box(box_bins: Sequence[int], extent: Sequence[float],
                shape: tuple[int, int, int]) -> tuple[int, ...]:
    """A half-open bin box of ``extent`` as a half-open voxel box of a volume of ``shape``.

    Edges round to the nearest voxel edge and are clipped to the volume; where that leaves no
    voxel along an axis, the box takes the voxel nearest its centre.
    """
    _check_box(box_bins, "box_bins")
    if min(box_bins) < 0 or max(box_bins) > BINS:
        raise ValueError(f"box_bins {tuple(box_bins)} must lie within [0, {BINS}]")
    extent = _check_extent(extent)
    start, end = [], []
    for axis in range(3):
        lo, size, n = extent[axis], extent[axis + 3] - extent[axis], int(shape[axis])
        edges = [lo + b / BINS * size for b in (box_bins[axis], box_bins[axis + 3])]
        v0, v1 = (min(max(math.floor(e + 0.5), 0), n) for e in edges)
        if v1 <= v0:
            # Thinner than a voxel, or outside the volume: the voxel nearest the box's centre.
            v0 = min(max(math.floor(sum(edges) / 2), 0), n - 1)
            v1 = v0 + 1
        start.append(v0)
        end.append(v1)
    return (*start, *end)


def crop_extent(box_voxel: Sequence[int], spacing_mm: Sequence[float], shape: tuple[int, int, int],
                margin_mm: float = 12.0, min_size_mm: float = 48.0) -> tuple[float, ...]:
    """The extent to re-encode for a zoomed look at a box.

    The box grows by ``margin_mm`` on every side and to at least ``min_size_mm`` per axis,
    about its centre. The result may reach past the volume of ``shape``; `prepare` reads air
    there, so the zoom stays centred on the box.
    """
    _check_box(box_voxel, "box_voxel")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be three positive millimetre values, got {tuple(spacing_mm)}")
    for axis in range(3):
        if box_voxel[axis + 3] > shape[axis]:
            raise ValueError(f"box_voxel {tuple(box_voxel)} reaches past the volume's shape {tuple(shape)}")
    start, end = [], []
    for axis in range(3):
        v0, v1, sp = box_voxel[axis], box_voxel[axis + 3], float(spacing_mm[axis])
        size = max(v1 - v0 + 2 * margin_mm / sp, min_size_mm / sp)
        centre = (v0 + v1) / 2
        start.append(centre - size / 2)
        end.append(centre + size / 2)
    return (*start, *end)


# --- helpers ---------------------------------------------------------------------------------


def _check_extent(extent: Sequence[float]) -> tuple[float, ...]:
    if len(extent) != 6:
        raise ValueError(f"extent needs 6 values (k0, r0, c0, k1, r1, c1), got {len(extent)}")
    values = tuple(float(v) for v in extent)
    if any(values[i + 3] <= values[i] for i in range(3)):
        raise ValueError(f"extent {values}: each end must lie beyond its start")
    return values


def _check_box(box: Sequence[int], name: str) -> None:
    if len(box) != 6:
        raise ValueError(f"{name} needs 6 values (k0, r0, c0, k1, r1, c1), got {len(box)}")
    if any(box[i + 3] <= box[i] for i in range(3)):
        raise ValueError(f"{name} {tuple(box)}: each end must lie beyond its start")


def _axis_samples(lo: float, hi: float, n_out: int, n_in: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices, weights of the second one and in-volume flags for one axis."""
    # Cell centres in voxel edge coordinates, shifted to index coordinates (voxel j's centre is j).
    pos = lo + (np.arange(n_out) + 0.5) * ((hi - lo) / n_out) - 0.5
    inside = (pos >= -0.5) & (pos <= n_in - 0.5)
    pos = np.clip(pos, 0, n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(np.intp), max(n_in - 2, 0))
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32), inside


def _axis_cells(lo: float, hi: float, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of one axis, the half-open range of voxel indices it overlaps (empty outside)."""
    edges = lo + np.arange(n_out + 1) * ((hi - lo) / n_out)
    start = np.floor(edges[:-1] + _EPS).astype(np.intp)
    stop = np.maximum(np.ceil(edges[1:] - _EPS).astype(np.intp), start + 1)
    return np.clip(start, 0, n_in), np.clip(stop, 0, n_in)


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (face neighbours)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _body(grid_hu: np.ndarray) -> np.ndarray:
    # Holes are filled slice by slice, so the lungs, enclosed in-plane by the chest wall, count
    # as inside while air above and below the body stays outside.
    return ndimage.binary_fill_holes(_largest(grid_hu > _BODY_HU), structure=_IN_PLANE)


def _lung(grid_hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Gas inside the body, without pockets too small to be lung."""
    gas = body & (grid_hu < _BODY_HU)
    labels, count = ndimage.label(gas)
    if count == 0:
        return gas
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    cell_ml = spacing[0] * spacing[1] * spacing[2] / 1000
    keep = (sizes * cell_ml >= _MIN_LUNG_ML) & (sizes >= 0.05 * sizes.max())
    return keep[labels]


def _between_per_row(mask: np.ndarray) -> np.ndarray:
    """Cells lying between the first and last ``mask`` cell of their row, ``mask`` included."""
    ahead = np.maximum.accumulate(mask, axis=-1)
    behind = np.maximum.accumulate(mask[..., ::-1], axis=-1)[..., ::-1]
    return ahead & behind


def _heart(grid_hu: np.ndarray, body: np.ndarray, lung: np.ndarray, bone: np.ndarray,
           share: np.ndarray) -> np.ndarray:
    """Soft tissue between the lungs and in front of the spine, grown from the heart's widest slice.

    Going up and down from that slice each slice's heart lies within the next one's, which keeps
    out the tissue under the diaphragm that appears between the lung bases.
    """
    soft = body & (grid_hu >= _HEART_HU[0]) & (grid_hu <= _HEART_HU[1])
    candidate = soft & _between_per_row(lung) & ~lung & (share >= _HEART_SHARE)[:, None, None]
    front = _spine_front(body, bone)
    if front is not None:
        candidate[:, front:] = False
    candidate = ndimage.binary_opening(candidate, structure=_IN_PLANE)
    area = np.where(share >= _HEART_WIDEST_SHARE, candidate.sum(axis=(1, 2)), 0)
    heart = np.zeros_like(candidate)
    if area.max() == 0:
        return heart
    widest = int(np.argmax(area))
    heart[widest] = _largest(candidate[widest])
    for k in range(widest - 1, -1, -1):
        heart[k] = candidate[k] & heart[k + 1]
    for k in range(widest + 1, heart.shape[0]):
        heart[k] = candidate[k] & heart[k - 1]
    return _largest(heart)


def _spine_front(body: np.ndarray, bone: np.ndarray) -> int | None:
    """The row of the vertebral bodies' front: the first bone row behind the body's centre in
    its middle fifth of columns."""
    rows, cols = np.nonzero(body.any(axis=0))
    if rows.size == 0:
        return None
    r_mid, c_mid = (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2
    half = max(1, (cols.max() - cols.min()) // 10)
    band = bone[:, r_mid:, c_mid - half:c_mid + half + 1].any(axis=(0, 2))
    return int(r_mid + np.argmax(band)) if band.any() else None


def _liver(grid_hu: np.ndarray, body: np.ndarray, lung: np.ndarray, share: np.ndarray) -> np.ndarray:
    """The brighter soft tissue on the right under the lung bases, and its dome between them."""
    seen = lung.any(axis=0)
    footprint = _between_per_row(seen) if seen.any() else body.any(axis=0)
    cols = np.nonzero(footprint.any(axis=0))[0]
    if cols.size == 0:
        return np.zeros_like(body)
    # The left lobe crosses the midline, so the cut lies a little to the patient's left of it.
    footprint[:, int(cols.min() + _LIVER_CUT * (cols.max() - cols.min())):] = False
    soft = body & (grid_hu >= _LIVER_HU[0]) & (grid_hu <= _LIVER_HU[1]) & footprint[None]
    if soft.any():
        # The liver is brighter than the muscle and bowel around it, with or without contrast.
        soft &= grid_hu >= _split_hu(grid_hu[soft])
    soft = ndimage.binary_opening(soft, structure=_IN_PLANE)
    chest = np.nonzero(share >= _LUNG_BASE_SHARE)[0]
    base = int(chest[0]) if chest.size else soft.shape[0]
    liver = np.zeros_like(soft)
    liver[:base] = soft[:base]
    # Between the lung bases the dome narrows upwards: each slice keeps the one main part of
    # what lies over the liver below, so the heart resting on the dome stays out.
    for k in range(max(base, 1), soft.shape[0]):
        liver[k] = _largest(soft[k] & liver[k - 1])
    return _largest(liver)


def _split_hu(values: np.ndarray) -> float:
    """Otsu's threshold between two HU classes, or -inf when they are too close to tell apart."""
    hist, edges = np.histogram(values, bins=50)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)
    above = below[-1] - below
    sum_below = np.cumsum(hist * centres)
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(above, 1)
    best = int(np.argmax(below * above * (mean_above - mean_below) ** 2))
    if mean_above[best] - mean_below[best] < _MIN_CONTRAST_HU:
        return -np.inf
    return float(edges[best + 1])
