"""Findings measured in the image, as a radiologist measures them on the scan rather than
estimates them: the longest extent of a solid lung lesion, a liver lesion or a bone lesion, the fluid of a
pericardial effusion, the extent of a pneumothorax, the heart's and the chest's widths, and where in
its lung a lesion lies.

The decoder names a lung lesion and states a size, but its sizes stray far (a 23-mm nodule stated
as a "46 mm mass"), and in the report language nodule or mass is a matter of size alone (a lesion
of `phantom.MASS_MIN_MM` or more is a mass). The measurement takes the finding's box with a margin (a bin
box can cut a lesion short), keeps soft tissue (above `SOLID_HU`, halfway between aerated lung and
a solid lesion), and opens it with a ball of `OPENING_MM`: that cuts off the vessels and the chest
wall a lesion touches but keeps any lesion thicker than the ball. Where nothing that thick is left,
a smaller ball (`SMALL_OPENING_MM`) looks for a small nodule. The component that fills most of the
box is the lesion; where there is none, the box holds no solid lesion at all.

A pericardial effusion is fluid round the heart, a rim thicker than the fat or the blood's edge
leaves, and a box the decoder calls one must hold that much of it. A pleural effusion's depth is
measured in its fluid.

A pneumothorax is free air in the pleural space, darker than any aerated lung. The finding map
often lights only part of it (its apex, or the strip in front of the lung), so its box is taken
from the air itself: every pocket of free air inside the body on that side of the chest; its depth
is measured in that air.

A liver lesion is a darker blob in the liver, cut halfway between the two; a bone lesion a darker
(lytic) or brighter (sclerotic) blob in a vertebral body's cancellous bone. The heart is the blood
between the lungs; the chest's width the lungs' outer span; their ratio tells an enlarged heart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

SOLID_HU = -400.0
OPENING_MM = 5.0  # radius: vessels near a lesion are up to 11 mm thick
SMALL_OPENING_MM = 3.5  # radius: keeps nodules from about 7 mm
MARGIN_MM = 6.0
# On the truth boxes of the 69 lung lesions >= 18 mm of phantoms 8300-8439, the longest extent was
# off by 1.4 mm on average and put none on the wrong side of 30 mm; without the opening, vessels
# made it 6.6 mm too long on average and put 10 on the wrong side.


def _ball(radius_mm: float, spacing_mm: np.ndarray) -> np.ndarray:
    reach = np.floor(radius_mm / spacing_mm).astype(int)
    axes = np.ogrid[tuple(slice(-k, k + 1) for k in reach)]
    return sum((a * s / radius_mm) ** 2 for a, s in zip(axes, spacing_mm)) <= 1


def solid_lesion_diameter_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float],
                             box_voxel: Sequence[int]) -> float | None:
    """The longest axis-aligned extent (mm) of the solid lesion in a half-open voxel box of
    ``volume_hu`` [k, r, c], or ``None`` where no solid structure thicker than the small opening
    ball lies in it (a lesion under about 7 mm, or none)."""
    spacing = np.asarray(spacing_mm, dtype=float)
    box = np.asarray(box_voxel, dtype=int)
    margin = np.round(MARGIN_MM / spacing).astype(int)
    lo = np.maximum(0, box[:3] - margin)
    hi = np.minimum(volume_hu.shape, box[3:] + margin)
    solid = volume_hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] > SOLID_HU
    inner = tuple(slice(box[a] - lo[a], max(box[a] - lo[a] + 1, box[a + 3] - lo[a])) for a in range(3))
    for radius in (OPENING_MM, SMALL_OPENING_MM):
        cells = _filling_component(ndimage.binary_opening(solid, _ball(radius, spacing)), inner)
        if cells is not None:
            return _extent_mm(cells, spacing)
    return None


def _filling_component(mask: np.ndarray, part: tuple[slice, ...]) -> np.ndarray | None:
    """The voxels [n, 3] of the component of ``mask`` that fills most of ``part``; ``None`` where none reaches it."""
    labels, count = ndimage.label(mask)
    filling = np.bincount(labels[part].ravel(), minlength=count + 1)
    filling[0] = 0
    return np.argwhere(labels == filling.argmax()) if filling.max() > 0 else None


def _extent_mm(cells: np.ndarray, spacing: np.ndarray) -> float:
    """The longest axis-aligned extent (mm) of voxels ``cells`` [n, 3]."""
    return float(((cells.max(0) - cells.min(0) + 1) * spacing).max())


def _smoothed_round_box(volume_hu: np.ndarray, spacing: np.ndarray, box: np.ndarray,
                        smooth_mm: float) -> tuple[np.ndarray, tuple[slice, ...], tuple[slice, ...]]:
    """``volume_hu`` round a half-open voxel box, `MARGIN_MM` more each side, smoothed over ``smooth_mm``
    against noise; and, in that crop, the box and its middle third."""
    margin = np.round(MARGIN_MM / spacing).astype(int)
    lo = np.maximum(0, box[:3] - margin)
    hi = np.minimum(volume_hu.shape, box[3:] + margin)
    values = volume_hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    smooth = ndimage.gaussian_filter(values, sigma=smooth_mm / spacing)
    start, size = box[:3] - lo, box[3:] - box[:3]
    inside = tuple(slice(b, b + n) for b, n in zip(start, size))
    middle = tuple(slice(b + n // 3, b + max(n - n // 3, n // 3 + 1)) for b, n in zip(start, size))
    return smooth, inside, middle


LESION_SMOOTH_MM = 1.5  # liver lesions may differ from the liver by 15 HU in noise of up to 20 HU
SOFT_TISSUE_HU = (-30.0, 120.0)  # fat, air and bone round the liver are not lesion
EDGE_OPENING_MM = 2.0  # radius: thicker than the band a smoothed liver-fat edge passes through
# The phantoms' lesions are 15-65 HU darker than their liver; smoothed noise moves a box's middle
# by a few HU.
LESION_CONTRAST_HU = 10.0


def hypodense_lesion_diameter_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float],
                                 box_voxel: Sequence[int]) -> float | None:
    """The longest axis-aligned extent (mm) of the hypodense lesion in a half-open voxel box of
    ``volume_hu`` [k, r, c], or ``None`` where its middle is not `LESION_CONTRAST_HU` darker than
    the soft tissue round it.

    The HU, smoothed over `LESION_SMOOTH_MM` against noise, is cut halfway between the box's middle
    (the lesion) and the soft tissue round it (the liver): halfway is where a blurred edge lies.
    The darker component that fills most of the box's middle is the lesion; an opening cuts the
    thin band where the liver's own edge meets fat."""
    spacing = np.asarray(spacing_mm, dtype=float)
    smooth, inside, middle = _smoothed_round_box(volume_hu, spacing, np.asarray(box_voxel, dtype=int), LESION_SMOOTH_MM)
    tissue = (smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])
    core = smooth[middle][tissue[middle]]
    around = tissue.copy()
    around[inside] = False
    rim = smooth[around]
    if core.size == 0 or rim.size == 0:
        return None
    # The lesion's level is the core's darker quarter: a bin box round a small lesion is loose.
    lesion, liver = np.percentile(core, 25), np.median(rim)
    if liver - lesion < LESION_CONTRAST_HU:
        return None
    cut = (lesion + liver) / 2
    darker = ndimage.binary_opening(tissue & (smooth < cut), _ball(EDGE_OPENING_MM, spacing))
    cells = _filling_component(darker, middle)
    return None if cells is None else _extent_mm(cells, spacing)


BONE_SMOOTH_MM = 1.0
# A vertebral body's cancellous bone is 250-350 HU; lytic lesions in it 0-100, sclerotic ones 600-1200,
# its cortex about 1000.
CANCELLOUS_HU = (150.0, 550.0)
BONE_CONTRAST_HU = 100.0
IN_SLICE = np.array([np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.zeros((3, 3))], dtype=bool)


def bone_lesion_diameter_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float], box_voxel: Sequence[int],
                            sclerotic: bool) -> float | None:
    """The longest axis-aligned extent (mm) of the lytic (darker) or sclerotic (brighter) lesion in
    a half-open voxel box of ``volume_hu`` [k, r, c], or ``None`` where the box's middle differs by
    less than `BONE_CONTRAST_HU` from the cancellous bone round it, or the lesion found runs out of
    the box's margin (into the tissue round the bone).

    As for a liver lesion, the smoothed HU is cut halfway between the box's middle and the bone
    round it; an opening cuts the thin cortex a sclerotic lesion touches."""
    spacing = np.asarray(spacing_mm, dtype=float)
    smooth, inside, middle = _smoothed_round_box(volume_hu, spacing, np.asarray(box_voxel, dtype=int), BONE_SMOOTH_MM)
    around = (smooth > CANCELLOUS_HU[0]) & (smooth < CANCELLOUS_HU[1])
    around[inside] = False
    core, rim = smooth[middle], smooth[around]
    if core.size == 0 or rim.size == 0:
        return None
    sign = 1.0 if sclerotic else -1.0
    lesion, bone = np.percentile(core, 75 if sclerotic else 25), np.median(rim)
    if sign * (lesion - bone) < BONE_CONTRAST_HU:
        return None
    cut = (lesion + bone) / 2
    if sclerotic:
        changed = ndimage.binary_opening(smooth > cut, _ball(EDGE_OPENING_MM, spacing))
    else:
        # Disc and muscle are as dark as a lytic lesion, which may touch its vertebra's end plate:
        # the lesion is what the bone encloses in each axial slice.
        solid = smooth > cut
        changed = ndimage.binary_fill_holes(solid, structure=IN_SLICE) & ~solid
    cells = _filling_component(changed, middle)
    if cells is None or (cells.min(0) == 0).any() or (cells.max(0) == np.array(smooth.shape) - 1).any():
        return None
    return _extent_mm(cells, spacing)

HEART_HU = (-30.0, 120.0)  # blood is 35-50 HU; the fat round the heart about -100, bone brighter
HEART_SMOOTH_MM = 0.7  # against noise, thinner than the heart's fat rim (2 mm or more)
BLOOD_LIVER_HU = 52.5  # blood is at most 50 HU, the liver at least 55
TISSUE_MEAN_MM = 2.5  # the soft tissue's local mean that tells blood from liver
LUNG_HU = -400.0  # aerated lung and air; the lung's vessels lie inside its span
WALL_MARGIN_MM = 2.0
SHEET_OPENING_MM = 4.0  # radius: cuts the sheet of diaphragm a heart sits on
THORAX_STEP_MM = 5.0  # the chest's width changes little over a few mm


def _inside_air(hu: np.ndarray) -> np.ndarray:
    """Air inside the body, the lungs, in a slice or volume [(k,) r, c]: air that reaches the
    in-plane edges is outside it."""
    air = hu < LUNG_HU
    labels, _ = ndimage.label(air)
    edges = np.unique(np.concatenate([labels[..., [0, -1], :].ravel(), labels[..., [0, -1]].ravel()]))
    return air & ~np.isin(labels, edges)


def cardiac_diameter_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float], box_voxel: Sequence[int]) -> float | None:
    """The transverse cardiac diameter: the widest left-right extent (mm), on any slice of the
    middle third of a half-open voxel box of ``volume_hu`` [k, r, c], of the blood inside the chest
    wall that fills most of that slice's middle; ``None`` where none does.

    Blood is soft tissue whose local mean over soft tissue alone (`TISSUE_MEAN_MM`) is below
    `BLOOD_LIVER_HU`: the liver's dome lies beside a large heart on the same slice. A large heart
    also touches the front chest wall, whose muscle has the blood's density: the wall is cut away
    as deep as the lungs lie under the surface (plus `WALL_MARGIN_MM`)."""
    spacing = np.asarray(spacing_mm, dtype=float)
    box = np.asarray(box_voxel, dtype=int)
    size = box[3:] - box[:3]
    widest = 0
    for k in range(box[0] + size[0] // 3, box[0] + max(size[0] - size[0] // 3, size[0] // 3 + 1)):
        plane = volume_hu[k].astype(np.float32)
        light = ndimage.gaussian_filter(plane, sigma=HEART_SMOOTH_MM / spacing[1:])
        lungs = _inside_air(light)
        if not lungs.any():
            continue
        depth = ndimage.distance_transform_edt(~((light < LUNG_HU) & ~lungs), sampling=spacing[1:])
        tissue = (light > HEART_HU[0]) & (light < HEART_HU[1])
        sigma = TISSUE_MEAN_MM / spacing[1:]
        mean = ndimage.gaussian_filter(plane * tissue, sigma) / np.maximum(ndimage.gaussian_filter(tissue * 1.0, sigma), 1e-3)
        blood = tissue & (mean < BLOOD_LIVER_HU) & (depth > depth[lungs].min() + WALL_MARGIN_MM)
        labels, count = ndimage.label(ndimage.binary_opening(blood, _ball(SHEET_OPENING_MM, np.r_[1e6, spacing[1:]])[0]))
        middle = labels[box[1] + size[1] // 3:box[4] - size[1] // 3, box[2] + size[2] // 3:box[5] - size[2] // 3]
        filling = np.bincount(middle.ravel(), minlength=count + 1)
        filling[0] = 0
        if filling.max() > 0:
            columns = np.flatnonzero((labels == filling.argmax()).any(axis=0))
            widest = max(widest, columns[-1] - columns[0] + 1)
    return float(widest * spacing[2]) if widest else None


def thoracic_diameter_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float]) -> float | None:
    """The inner thoracic diameter: the widest span (mm), on any slice (every `THORAX_STEP_MM`),
    between the outer edges of the lungs; ``None`` where the volume shows no lung."""
    step = max(1, round(THORAX_STEP_MM / spacing_mm[0]))
    spans = [np.flatnonzero(_inside_air(plane).any(axis=0)) for plane in volume_hu[::step]]
    widest = max((c[-1] - c[0] + 1 for c in spans if c.size), default=0)
    return float(widest * spacing_mm[2]) if widest else None


FLUID_HU = (-15.0, 27.0)  # simple fluid is 0-20 HU; blood and myocardium 35 or more, fat about -100
FLUID_OPENING_MM = 2.0  # radius: the band a smoothed fat-blood boundary passes through is thinner


def _fluid(volume_hu: np.ndarray, spacing: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Fluid more than 4 mm thick in a half-open voxel box: voxels whose HU, smoothed over 1 mm
    against noise, lies in `FLUID_HU`, opened with a ball of `FLUID_OPENING_MM` so that the thin
    band where a heart's edge meets fat does not count."""
    values = volume_hu[box[0]:box[3], box[1]:box[4], box[2]:box[5]].astype(np.float32)
    smooth = ndimage.gaussian_filter(values, sigma=1.0 / spacing)
    return ndimage.binary_opening((smooth > FLUID_HU[0]) & (smooth < FLUID_HU[1]), _ball(FLUID_OPENING_MM, spacing))


def fluid_ml(volume_hu: np.ndarray, spacing_mm: Sequence[float], box_voxel: Sequence[int]) -> float:
    """The volume (mL) of fluid more than 4 mm thick in a half-open voxel box of ``volume_hu``."""
    spacing = np.asarray(spacing_mm, dtype=float)
    return float(_fluid(volume_hu, spacing, np.asarray(box_voxel, dtype=int)).sum() * spacing.prod() / 1000)


def fluid_depth_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float], box_voxel: Sequence[int]) -> float:
    """A pleural effusion's depth: the most voxels of fluid more than 4 mm thick on any
    front-to-back line (along r) through a half-open voxel box of ``volume_hu``, in mm. About 2 mm
    short for each side the fluid meets aerated lung: the smoothing moves that edge inwards."""
    spacing = np.asarray(spacing_mm, dtype=float)
    fluid = _fluid(volume_hu, spacing, np.asarray(box_voxel, dtype=int))
    return float(fluid.sum(axis=1).max() * spacing[1]) if fluid.size else 0.0


AIR_HU = -960.0  # free air is about -1000 HU, aerated lung about -850
MIN_POCKET_VOXELS = 3  # image noise leaves single voxels that dark in the lung


def body_middle(volume_hu: np.ndarray) -> float:
    """The column halfway across the body (tissue above `SOLID_HU` in any slice) of ``volume_hu``
    [k, r, c]; the image's middle where there is none."""
    columns = np.flatnonzero((volume_hu > SOLID_HU).any(axis=(0, 1)))
    return float((columns[0] + columns[-1] + 1) / 2 if columns.size else volume_hu.shape[2] / 2)


def patient_side(affine: np.ndarray, box_voxel: Sequence[int], middle: float) -> str:
    """``"right"`` or ``"left"``: the patient's side of the body's middle column (`body_middle`)
    that a voxel box's centre lies on, read through ``affine`` (voxel [k, r, c, 1] to patient LPS
    mm, where x grows towards the patient's left) so that any in-plane orientation reads right."""
    box = np.asarray(box_voxel, dtype=float)
    centre = np.append((box[:3] + box[3:]) / 2, 1.0)
    on_middle = centre.copy()
    on_middle[2] = middle
    return "left" if (affine @ centre)[0] > (affine @ on_middle)[0] else "right"


DOME_AREA_SHARE = 0.9  # the right lung's area reaches this share of its largest where its dome is
LUNG_SAMPLE_MM = 2.0


def lung_extents(volume_hu: np.ndarray, affine: np.ndarray, middle: float) -> dict[str, tuple[float, ...]] | None:
    """Per side (``"right"``, ``"left"``), the lung's dome and apex heights and its front and back
    (patient LPS mm: z up, y back) in ``volume_hu`` [k, r, c] through ``affine``, the body's
    middle column being ``middle`` (`body_middle`); ``None`` where a side shows no lung.

    The dome is where the right lung's area, going up, first reaches `DOME_AREA_SHARE` of its
    largest: the lowest lung lies in the recesses round the dome. The left dome is hidden by the
    heart, which sits on it; it lies a few mm below the right (on phantoms 8100-8111, 3-9 mm) and
    the right's stands for both. Read on a grid about `LUNG_SAMPLE_MM` apart: ample for lobes."""
    step = [max(1, int(LUNG_SAMPLE_MM // np.linalg.norm(affine[:3, axis]))) for axis in range(3)]
    lungs = _inside_air(volume_hu[::step[0], ::step[1], ::step[2]])
    k, r, c = np.nonzero(lungs)
    index = np.stack([k * step[0], r * step[1], c * step[2], np.ones_like(k)]).astype(np.float64)
    x, y, z = (affine[:3] @ index)
    right = affine[0, 2] * (index[2] - middle) < 0  # patient x grows towards the left
    if not right.any() or right.all():
        return None
    # One bin per sampled slice: the largest step in height along any of the grid's axes.
    width = max(abs(affine[2, axis]) * step[axis] for axis in range(3))
    low = z[right].min()
    area = np.bincount(np.round((z[right] - low) / width).astype(np.intp))
    dome = float(low + np.argmax(area >= DOME_AREA_SHARE * area.max()) * width)
    return {side: (dome, float(z[mask].max()), float(y[mask].min()), float(y[mask].max()))
            for side, mask in (("right", right), ("left", ~right))}


def lung_position(extents: tuple[float, ...], affine: np.ndarray, box_voxel: Sequence[int]) -> tuple[float, float]:
    """A voxel box's centre in a lung of `lung_extents` ``extents``: its height (0 at the dome, 1
    at the apex) and depth (0 at the lung's front, 1 at its back)."""
    box = np.asarray(box_voxel, dtype=float)
    _, y, z = affine[:3] @ np.append((box[:3] + box[3:] - 1) / 2, 1.0)  # the mean of its voxels' centres
    dome, apex, front, back = extents
    return (z - dome) / max(apex - dome, 1e-6), (y - front) / max(back - front, 1e-6)


def free_air_pockets(volume_hu: np.ndarray) -> list[tuple[slice, ...]]:
    """The extents of the pockets of free air inside the body (air that reaches the image's
    in-plane edges is outside it). Once per volume: it labels the whole volume."""
    air = volume_hu < AIR_HU
    labels, count = ndimage.label(air)
    outside = np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    voxels = np.bincount(labels.ravel(), minlength=count + 1)
    return [extent for label, extent in enumerate(ndimage.find_objects(labels), start=1)
            if label not in outside and voxels[label] >= MIN_POCKET_VOXELS]


def air_depth_mm(volume_hu: np.ndarray, spacing_mm: Sequence[float], box_voxel: Sequence[int]) -> float:
    """A pneumothorax's depth: the most voxels of free air (below `AIR_HU`) on any front-to-back
    line (along r) through a half-open voxel box of ``volume_hu``, in mm."""
    box = np.asarray(box_voxel, dtype=int)
    air = volume_hu[box[0]:box[3], box[1]:box[4], box[2]:box[5]] < AIR_HU
    return float(air.sum(axis=1).max() * spacing_mm[1]) if air.size else 0.0


def pleural_air_box(pockets: list[tuple[slice, ...]], middle: float, box_voxel: Sequence[int]) -> tuple[int, ...] | None:
    """The half-open voxel box of the pockets (`free_air_pockets`) on the side of the chest
    (columns either side of the body's ``middle``, `body_middle`) that ``box_voxel`` lies on, or
    ``None`` where none of them meets ``box_voxel``."""
    box = tuple(int(v) for v in box_voxel)
    right_of_middle = box[2] + box[5] > 2 * middle
    side = [e for e in pockets if (e[2].start + e[2].stop > 2 * middle) == right_of_middle]
    if not any(all(e[a].start < box[a + 3] and box[a] < e[a].stop for a in range(3)) for e in side):
        return None
    return (tuple(min(e[a].start for e in side) for a in range(3))
            + tuple(max(e[a].stop for e in side) for a in range(3)))
