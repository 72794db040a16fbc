"""Synthetic chest / upper-abdomen CT phantoms with known findings, written as DICOM CT series.

``render_phantom(seed)`` draws a body from the seed, paints anatomy and findings into an int16 HU
volume with an anatomy label map, and records what it painted as a StudyResult (the truth).
``write_phantom_study`` writes the volume as a DICOM CT series beside ``truth.json``.

Inside the painter, positions are millimetres in a body frame with LPS axes: X towards the
patient's left (columns), Y posterior (rows), Z cranial (slices); X = Y = 0 is the body axis and
Z = 0 the first slice. Every structure is painted only inside its own bounding box.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from engines.results import Answer, Box, EngineInfo, Finding, StudyResult, TopicResult

# Stored value = HU + 1024: a common scanner convention that keeps air at 0.
_RESCALE_INTERCEPT = -1024

TOPICS: tuple[str, ...] = ("lungs", "pleura", "heart", "liver", "bones")

FINDING_TYPES: dict[str, tuple[str, ...]] = {
    "lungs": ("nodule", "mass"),
    "pleura": ("pleural effusion", "pneumothorax"),
    "heart": ("cardiomegaly", "pericardial effusion"),
    "liver": ("hypodense lesion",),
    "bones": ("lytic lesion", "sclerotic lesion"),
}

NORMAL_SENTENCES: dict[str, str] = {
    "lungs": "The lungs are clear.",
    "pleura": "No pleural effusion or pneumothorax.",
    "heart": "Heart size is normal. No pericardial effusion.",
    "liver": "The liver is unremarkable.",
    "bones": "No focal bone lesion.",
}

# A lung lesion this long or longer is a mass, a shorter one a nodule (the Fleischner Society's
# glossary draws the line at 3 cm).
MASS_MIN_MM = 30


def lung_lesion_sentence(kind: str, size_mm: int, lobe: str | None) -> str:
    """The report's sentence for a lung nodule or mass of ``size_mm`` in ``lobe`` (if known)."""
    what = "solid nodule" if kind == "nodule" else "mass"
    return f"{size_mm} mm {what} in the {lobe}." if lobe else f"{size_mm} mm {what}."


def cardiomegaly_sentence(ratio: float, diameter_mm: float) -> str:
    """The report's sentence for a heart of cardiothoracic ``ratio`` and transverse ``diameter_mm``."""
    return f"Cardiomegaly: cardiothoracic ratio {ratio:.2f} (transverse cardiac diameter {diameter_mm:.0f} mm)."


# Organ regions, not findings: a nodule keeps the lung label, pleural fluid or air the lung
# label of its hemithorax, pericardial fluid the pericardium label (the sac around the heart).
ANATOMY_LABELS: dict[str, int] = {
    "body": 1, "fat": 2, "lung": 3, "heart": 4, "pericardium": 5, "aorta": 6, "bone": 7, "liver": 8,
}

QUESTIONS: tuple[str, ...] = (
    "Is there a pleural effusion?",
    "How many lung nodules are there?",
    "What is the size of the largest liver lesion?",
)

VERTEBRAL_LEVELS: tuple[str, ...] = tuple(f"T{i}" for i in range(1, 13)) + ("L1", "L2")

TRUTH_ENGINE = EngineInfo("phantom-truth", "1")

_BODY, _FAT, _LUNG, _HEART, _PERICARDIUM, _AORTA, _BONE, _LIVER = (
    ANATOMY_LABELS[name] for name in ("body", "fat", "lung", "heart", "pericardium", "aorta", "bone", "liver"))

# Reconstruction thicknesses scanners actually offer.
_THICKNESSES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
_MAX_MATRIX = 512
_CHUNK = 16  # slices per chunk when a structure's box is large: bounds the temporaries
# HU drawn for each finding's voxels (inclusive); cardiomegaly keeps the heart's own value.
_HU_RANGES: dict[str, tuple[int, int]] = {
    "nodule": (-50, 80), "mass": (-50, 80), "pleural effusion": (0, 20), "pneumothorax": (-1000, -1000),
    "pericardial effusion": (0, 20), "hypodense lesion": (0, 40), "lytic lesion": (0, 100),
    "sclerotic lesion": (600, 1200),
}


@dataclass(frozen=True)
class PhantomGeometry:
    """Size, sampling and noise of one phantom, drawn from its seed (lengths in mm)."""

    body_lr_mm: float  # left-right semi-axis of the body outline
    body_ap_mm: float  # antero-posterior semi-axis
    fat_mm: float  # subcutaneous fat thickness
    wall_mm: float  # chest wall (muscle and ribs) inside the fat
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slices: int
    rows: int
    cols: int
    noise_hu: float  # standard deviation of the Gaussian noise
    body_offset_mm: tuple[float, float]  # body axis (x, y) from the centre of the field of view
    table_z_mm: float  # LPS z of the first slice

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.rows, self.cols)


@dataclass(eq=False)  # arrays inside: compare fields explicitly
class Phantom:
    """One rendered phantom: HU volume, anatomy labels, geometry and the truth.

    Attributes
    ----------
    hu:
        int16 HU indexed ``[k, r, c]``, ``k`` ascending in patient z (feet to head).
    anatomy:
        uint8 labels of ``ANATOMY_LABELS`` (0 outside the body), same shape.
    origin_mm:
        LPS centre of voxel (0, 0, 0).
    truth:
        What was painted, as findings grouped by topic plus answers to ``QUESTIONS``.
    finding_map:
        uint8, 0 where no finding was painted, else ``n`` for the n-th finding of ``truth``
        (topics in order, findings in order, counting from 1); its bounding boxes are the
        findings' boxes.
    """

    hu: np.ndarray
    anatomy: np.ndarray
    pixel_spacing_mm: float
    slice_spacing_mm: float
    slice_thickness_mm: float
    origin_mm: tuple[float, float, float]
    truth: StudyResult
    seed: int
    finding_map: np.ndarray


def draw_geometry(seed: int) -> PhantomGeometry:
    """The geometry ``render_phantom(seed)`` uses, without painting anything."""
    return _draw_geometry(_streams(seed)[0])


def render_phantom(
    seed: int,
    *,
    normal: bool = False,
    findings: Mapping[str, Sequence[str]] | None = None,
) -> Phantom:
    """Paint the phantom of ``seed`` in memory.

    Parameters
    ----------
    seed:
        Non-negative integer; everything (geometry, anatomy, findings, noise) follows from it.
    normal:
        No findings in topics that ``findings`` does not name.
    findings:
        Finding types to paint per topic, e.g. ``{"lungs": ["nodule"], "liver": []}``;
        topics not named get 0-2 random findings (none if ``normal``).

    Returns
    -------
    Phantom

    Raises
    ------
    ValueError
        For a negative seed, an unknown topic or finding type, more than two pleural findings
        (one per side), or both heart findings (their boxes would overlap).
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    geo_rng, _, finding_rng, noise_rng = _streams(seed)
    geometry = _draw_geometry(geo_rng)
    plan = _draw_plan(finding_rng, normal, findings)
    variant = _HeartVariant.draw(finding_rng, plan["heart"])

    grid = _Grid.of(geometry)
    while True:
        painter = _Painter(grid)
        anatomy = _paint_anatomy(painter, geometry, _streams(seed)[1], variant)
        try:
            placed = _paint_findings(painter, anatomy, plan, finding_rng)
            break
        except _NoRoom as exc:
            if findings and exc.topic in findings:
                raise RuntimeError(f"phantom {seed}: {exc}") from None
            # A random plan asked for more than this body has room for: drop that finding, repaint.
            plan[exc.topic].pop(exc.index)
    _add_noise(painter.hu, geometry.noise_hu, noise_rng)

    sp, th = geometry.pixel_spacing_mm, geometry.slice_thickness_mm
    # The field of view is centred on x = y = 0; the body sits off it by body_offset_mm.
    origin = (round(-(geometry.cols - 1) / 2 * sp, 4), round(-(geometry.rows - 1) / 2 * sp, 4), geometry.table_z_mm)
    return Phantom(
        hu=painter.hu, anatomy=painter.lab, pixel_spacing_mm=sp, slice_spacing_mm=th, slice_thickness_mm=th,
        origin_mm=origin, truth=_truth(seed, placed), seed=seed, finding_map=painter.fmap,
    )


def phantom_datasets(phantom: Phantom) -> list[Dataset]:
    """The phantom as one CT Image Storage dataset per slice (see ``ct_series_datasets``)."""
    sp = phantom.pixel_spacing_mm
    return ct_series_datasets(
        phantom.hu, (sp, sp), phantom.slice_spacing_mm, phantom.origin_mm, seed=phantom.seed,
        slice_thickness_mm=phantom.slice_thickness_mm,
        series_description=f"Axial {phantom.slice_thickness_mm:g} mm",
    )


def write_phantom_study(out_dir: Path, seed: int, *, normal: bool = False) -> Path:
    """Write ``out_dir/dicom/*.dcm`` and ``out_dir/truth.json`` for ``seed``; returns the truth path."""
    out_dir = Path(out_dir)
    phantom = render_phantom(seed, normal=normal)
    write_datasets(phantom_datasets(phantom), out_dir / "dicom")
    truth_path = out_dir / "truth.json"
    phantom.truth.save(truth_path)
    return truth_path


# --- drawing the plan ------------------------------------------------------------------------


def _streams(seed: int) -> list[np.random.Generator]:
    """Generators for geometry, anatomy, findings and noise, all derived from ``seed``.

    Separate streams keep a seed's body and noise the same whatever findings are drawn, so
    ``normal=True`` renders the same patient without them.
    """
    return np.random.default_rng(seed).spawn(4)


def _draw_geometry(rng: np.random.Generator) -> PhantomGeometry:
    a, b = rng.uniform(130, 175), rng.uniform(90, 125)
    fat, wall = rng.uniform(6, 22), rng.uniform(12, 18)
    dx, dy = (round(float(v), 1) for v in rng.uniform(-10, 10, 2))
    thickness = float(rng.choice(_THICKNESSES))
    slices = int(np.clip(round(rng.uniform(160, 380) / thickness), 40, 160))
    # The thoracic cavity always fits the field of view, so lung widths (and the cardiothoracic
    # ratio) are never cut off; skin and fat may be, at small spacings.
    min_spacing = math.ceil(max(0.6, (2 * (a - fat - wall + abs(dx)) + 8) / _MAX_MATRIX) * 1000) / 1000
    spacing = round(rng.uniform(min_spacing, 1.6), 3)
    return PhantomGeometry(
        body_lr_mm=a, body_ap_mm=b, fat_mm=fat, wall_mm=wall, pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness, slices=slices,
        rows=min(_MAX_MATRIX, math.ceil((2 * (b + abs(dy)) + 16) / spacing)),
        cols=min(_MAX_MATRIX, math.ceil((2 * (a + abs(dx)) + 16) / spacing)),
        noise_hu=rng.uniform(5, 20), body_offset_mm=(dx, dy), table_z_mm=round(rng.uniform(-400, -100), 1),
    )


def _draw_plan(
    rng: np.random.Generator, normal: bool, findings: Mapping[str, Sequence[str]] | None
) -> dict[str, list[str]]:
    """Finding types per topic: the forced ones, else none (``normal``) or 0-2 at random."""
    forced = dict(findings or {})
    unknown = sorted(set(forced) - set(TOPICS))
    if unknown:
        raise ValueError(f"findings: unknown topic(s) {unknown}; topics are {list(TOPICS)}")
    plan = {}
    for topic in TOPICS:
        if topic in forced:
            if isinstance(forced[topic], str):
                raise ValueError(
                    f"findings[{topic!r}] must be a list of finding types, not the string {forced[topic]!r}")
            plan[topic] = [str(kind) for kind in forced[topic]]
        elif normal or rng.random() < 0.5:
            plan[topic] = []
        else:
            # One heart finding at most: the effusion's box would always contain the heart's.
            count = 1 if topic == "heart" or rng.random() < 0.65 else 2
            plan[topic] = [str(rng.choice(FINDING_TYPES[topic])) for _ in range(count)]
        for kind in plan[topic]:
            if kind not in FINDING_TYPES[topic]:
                raise ValueError(
                    f"findings[{topic!r}]: unknown type {kind!r}; {topic} has {list(FINDING_TYPES[topic])}")
    if len(plan["pleura"]) > 2:
        raise ValueError(f"findings['pleura']: at most two (one per side), got {len(plan['pleura'])}")
    if len(plan["heart"]) > 1:
        raise ValueError("findings['heart']: at most one; a pericardial effusion's box always contains the heart")
    return plan


# --- the voxel grid and the ways of painting into it -----------------------------------------


def _span(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of the ascending ``coords`` that lie in [lo, hi]."""
    return slice(int(np.searchsorted(coords, lo, "left")), int(np.searchsorted(coords, hi, "right")))


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm, body frame) along each axis, float32 and ascending."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    spacing: float  # in-plane pixel spacing

    @classmethod
    def of(cls, g: PhantomGeometry) -> _Grid:
        sp, (dx, dy) = g.pixel_spacing_mm, g.body_offset_mm
        return cls(
            spacing=sp,
            z=(np.arange(g.slices) * g.slice_thickness_mm).astype(np.float32),
            y=((np.arange(g.rows) - (g.rows - 1) / 2) * sp - dy).astype(np.float32),
            x=((np.arange(g.cols) - (g.cols - 1) / 2) * sp - dx).astype(np.float32),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
        """Index slices ``[k, r, c]`` of the voxel centres between points ``lo`` and ``hi`` (x, y, z)."""
        return (_span(self.z, lo[2], hi[2]), _span(self.y, lo[1], hi[1]), _span(self.x, lo[0], hi[0]))

    def k_above(self, z: np.ndarray | float) -> np.ndarray:
        """Index of the first slice whose centre lies above ``z``."""
        return np.searchsorted(self.z, z, "right")

    def k_from(self, z: np.ndarray | float) -> np.ndarray:
        """Index of the first slice whose centre lies at or above ``z``."""
        return np.searchsorted(self.z, z, "left")


class _Painter:
    """The volumes being painted (HU, anatomy labels, finding numbers) and how to paint them."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.hu = np.empty(grid.shape, np.int16)  # the body outline fills every voxel first
        self.lab = np.empty(grid.shape, np.uint8)
        self.fmap = np.zeros(grid.shape, np.uint8)  # calloc'd: pages findings never touch stay free

    def fill(self, sl: tuple[slice, ...], mask: np.ndarray, hu: int, label: int | None = None) -> None:
        np.copyto(self.hu[sl], hu, where=mask)
        if label is not None:
            np.copyto(self.lab[sl], label, where=mask)

    def chunks(self, ks: slice, rs: slice, cs: slice, mask_of: Callable[[slice], np.ndarray],
               hu: int, label: int | None = None, inside: int | None = None) -> None:
        """Fill where ``mask_of(slices)`` holds, a few slices at a time to bound the temporaries."""
        for start in range(ks.start, ks.stop, _CHUNK):
            kc = slice(start, min(start + _CHUNK, ks.stop))
            mask = mask_of(kc)
            if inside is not None:
                mask &= self.lab[kc, rs, cs] == inside
            self.fill((kc, rs, cs), mask, hu, label)

    def columns(self, rs: slice, cs: slice, mask2d: np.ndarray, z_lo: np.ndarray | float,
                z_hi: np.ndarray | float, hu: int, label: int) -> None:
        """Fill each pixel of ``mask2d`` between the heights ``z_lo`` and ``z_hi`` (mm, maps or scalars)."""
        if not mask2d.any():
            return
        k0 = np.where(mask2d, self.grid.k_above(z_lo), len(self.grid.z)).astype(np.int16)
        k1 = np.where(mask2d, self.grid.k_from(z_hi), 0).astype(np.int16)

        def mask_of(kc: slice) -> np.ndarray:
            k = np.arange(kc.start, kc.stop, dtype=np.int16)[:, None, None]
            return (k >= k0) & (k < k1)

        self.chunks(slice(int(k0.min()), int(k1.max())), rs, cs, mask_of, hu, label)

    def template(self, ks: slice, rs: slice, cs: slice, mask2d: np.ndarray, hu2d: np.ndarray,
                 lab2d: np.ndarray) -> None:
        """Fill the same cross-section on every slice of ``ks``."""
        np.copyto(self.hu[ks, rs, cs], hu2d, where=mask2d)
        np.copyto(self.lab[ks, rs, cs], lab2d, where=mask2d)

    def runs(self, r: np.ndarray, c: np.ndarray, k0: np.ndarray, k1: np.ndarray, hu: int, label: int) -> None:
        """Fill slices ``k0 .. k1 - 1`` at each pixel ``(r, c)``: thin structures, voxel by voxel."""
        n = np.clip(k1 - k0, 0, None)
        total = int(n.sum())
        if total == 0:
            return
        k = np.repeat(k0, n) + (np.arange(total) - np.repeat(np.cumsum(n) - n, n))
        rr, cc = np.repeat(r, n), np.repeat(c, n)
        self.hu[k, rr, cc] = hu
        self.lab[k, rr, cc] = label

    def tube(self, points: Sequence[Sequence[float]], radii: Sequence[float], hu: int,
             label: int | None = None, inside: int | None = None) -> None:
        """Fill capsules along a polyline of (x, y, z) points, one radius per segment.

        Long or oblique segments are cut into pieces a few radii long, so each piece's box
        stays close to the tube instead of spanning the whole segment.
        """
        for p0, p1, radius in zip(points[:-1], points[1:], radii):
            p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
            pieces = max(1, math.ceil(float(np.linalg.norm(p1 - p0)) / max(3 * radius, 6.0)))
            for i in range(pieces):
                self._capsule(p0 + (p1 - p0) * (i / pieces), p0 + (p1 - p0) * ((i + 1) / pieces),
                              float(radius), hu, label, inside)

    def _capsule(self, a: np.ndarray, b: np.ndarray, radius: float, hu: int, label: int | None,
                 inside: int | None) -> None:
        sl = self.grid.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
        if any(s.stop <= s.start for s in sl):
            return
        d = b - a
        l2 = max(float(d @ d), 1e-6)
        z, y, x = self.grid.z[sl[0]] - a[2], self.grid.y[sl[1]] - a[1], self.grid.x[sl[2]] - a[0]
        # t: position of each voxel's projection along the segment; the distance follows from it.
        t = (z * (d[2] / l2))[:, None, None] + (y * (d[1] / l2))[:, None] + x * (d[0] / l2)
        tc = np.clip(t, 0, 1)
        dist2 = (z * z)[:, None, None] + (y * y)[:, None] + x * x - l2 * tc * (2 * t - tc)
        mask = dist2 < radius * radius
        if inside is not None:
            mask &= self.lab[sl] == inside
        self.fill(sl, mask, hu, label)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by ``steps`` 4-neighbour steps; beyond the edge counts as outside."""
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        inner[[0, -1]] = False
        inner[:, [0, -1]] = False
        out = inner
    return out


def _add_noise(hu: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    """Add Gaussian noise of ``sigma`` HU and clip to the scanner range, a few slices at a time.

    Drawing tens of millions of normal variates costs most of a second, so each voxel takes one
    of 65536 float32 normal draws by an independent random 16-bit index instead: same
    distribution for practical purposes, at a tenth of the cost.
    """
    levels = np.rint(rng.standard_normal(65536, dtype=np.float32) * np.float32(sigma)).astype(np.int16)
    for start in range(0, hu.shape[0], _CHUNK // 2):
        view = hu[start:start + _CHUNK // 2]
        view += levels[rng.integers(0, 65536, size=view.shape, dtype=np.uint16)]
        np.clip(view, -1024, 3071, out=view)


# --- anatomy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Level:
    """One vertebra: its level's z range, its body's z range and cross-section (mm)."""

    name: str
    z_lo: float
    z_hi: float
    body_lo: float
    body_hi: float
    a: float  # body semi-axis, left-right
    b: float  # body semi-axis, antero-posterior
    y: float  # body centre


@dataclass(frozen=True)
class _Frame:
    """The drawn body plan that the organs are placed in (mm, body frame)."""

    a: float  # body outline semi-axes
    b: float
    fat: float
    ac: float  # thoracic / abdominal cavity semi-axes
    bc: float
    scale: float  # body size relative to an average adult
    z0: float  # anatomical bottom (the lower end of L2): the anatomy spans the scanned range
    height: float
    tissue: dict[str, int]
    levels: tuple[_Level, ...]  # T1 .. L2, top to bottom
    vb_front: float  # anterior surface of the vertebral bodies
    block_w: float  # half-width of the spine and back muscles where the cavity curves round them
    domes: dict[str, float]  # height of the right and left diaphragm domes
    apex: float  # height of the lung apices
    cavity: np.ndarray  # 2-D, full slice: inside the chest / abdominal cavity
    diaphragm: np.ndarray  # 2-D, full slice: height of the diaphragm

    def z_at(self, u: float | np.ndarray) -> float | np.ndarray:
        """Height of a fraction ``u`` of the anatomical extent (0 bottom of L2, 1 top of T1)."""
        return self.z0 + u * self.height


@dataclass(frozen=True)
class _Region:
    """Bounds (mm) of an organ, for drawing positions inside it."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    split: float  # lungs: height of the diaphragm dome below; liver: x of the right / left lobe border


@dataclass(frozen=True)
class _Heart:
    """The heart's drawn shape and place (mm), and what fills its pericardium."""

    x: float
    y: float
    z: float
    a: float  # in-plane long and short semi-axes, cranio-caudal semi-axis
    b: float
    c: float
    angle: float
    rim: float  # pericardium thickness: a thin fat rim, or the effusion
    rim_hu: int
    blood_hu: int


@dataclass(frozen=True)
class _Anatomy:
    """What the findings need to know about the painted anatomy."""

    frame: _Frame
    lungs: dict[str, _Region]
    liver: _Region
    heart: _Heart
    heart_box: tuple[slice, slice, slice]  # holds the heart and the pericardium


@dataclass(frozen=True)
class _HeartVariant:
    """How the heart topic's finding changes the heart: a drawn ratio or a fluid rim."""

    ratio: float | None
    rim_mm: float | None
    fluid_hu: int

    @classmethod
    def draw(cls, rng: np.random.Generator, kinds: Sequence[str]) -> _HeartVariant:
        ratio, rim, fluid = rng.uniform(0.61, 0.71), rng.uniform(5, 15), _draw_hu(rng, "pericardial effusion")
        return cls(ratio if "cardiomegaly" in kinds else None,
                   rim if "pericardial effusion" in kinds else None, fluid)


def _paint_anatomy(p: _Painter, geometry: PhantomGeometry, rng: np.random.Generator,
                   variant: _HeartVariant) -> _Anatomy:
    frame = _draw_frame(p.grid, geometry, rng)
    _paint_body(p, frame)
    liver = _paint_liver(p, frame, rng)
    lungs = _paint_lungs(p, frame, rng)
    heart = _draw_heart(p.grid, frame, rng, variant)
    _paint_aorta(p, frame, heart, rng)  # first, so that the heart paints over the aortic root
    heart_box = _paint_heart(p, frame, heart)
    _paint_spine(p, frame, geometry.pixel_spacing_mm)
    _paint_ribs(p, frame, rng)
    return _Anatomy(frame, lungs, liver, heart, heart_box)


def _draw_frame(grid: _Grid, geometry: PhantomGeometry, rng: np.random.Generator) -> _Frame:
    a, b, fat = geometry.body_lr_mm, geometry.body_ap_mm, geometry.fat_mm
    ac, bc = a - fat - geometry.wall_mm, b - fat - geometry.wall_mm
    scale = math.sqrt(a * b / (152 * 107))
    covered = float(grid.z[-1])
    z0 = covered * rng.uniform(-0.04, 0.03)
    height = covered * rng.uniform(0.97, 1.05) - z0
    tissue = {
        "air": -1000, "fat": int(rng.integers(-110, -89)), "soft": int(rng.integers(35, 46)),
        "lung": int(rng.integers(-870, -829)), "blood": int(rng.integers(35, 51)),
        "liver": int(rng.integers(55, 66)), "cancellous": int(rng.integers(250, 351)),
        "cortex": int(rng.integers(950, 1051)), "disc": 80, "csf": 15,
    }
    # Vertebrae grow taller and wider from T1 down to L2.
    weights = (0.85 + 0.35 * np.arange(14) / 13) * rng.uniform(0.93, 1.07, 14)
    heights = weights / weights.sum() * height
    tops = z0 + height - np.concatenate(([0.0], np.cumsum(heights)[:-1]))
    vb_front = b * rng.uniform(0.15, 0.28)
    levels = []
    for j, (name, top, h) in enumerate(zip(VERTEBRAL_LEVELS, tops, heights)):
        disc = (0.16 + 0.06 * j / 13) * h
        va, vb = (13 + 8 * j / 13) * scale, (10 + 5 * j / 13) * scale
        levels.append(_Level(name, float(top - h), float(top), float(top - h + disc / 2), float(top - disc / 2),
                             va, vb, vb_front + vb))
    block_w = levels[5].a + 16 * scale

    X, Y = grid.x[None, :], grid.y[:, None]
    # Behind the vertebral bodies the cavity curves back round the spine: the paravertebral gutters.
    block = Y > vb_front + 4 + 30 * scale * (X / block_w) ** 2
    cavity = ((X / ac) ** 2 + (Y / bc) ** 2 < 1) & ~block
    right = z0 + rng.uniform(0.40, 0.47) * height
    left = right - height * rng.uniform(0.01, 0.05)
    drop = height * rng.uniform(0.12, 0.18)

    def dome(x_centre: float, top: float) -> np.ndarray:
        # Lower laterally and posteriorly: the costophrenic recesses.
        rho2 = np.minimum(((X - x_centre) / (0.5 * ac)) ** 2 + ((Y + 0.1 * bc) / bc) ** 2, 1.5)
        return top - drop * rho2

    w = np.clip(0.5 + X / (0.3 * ac), 0, 1)
    diaphragm = ((1 - w) * dome(-0.45 * ac, right) + w * dome(0.45 * ac, left)).astype(np.float32)
    return _Frame(
        a=a, b=b, fat=fat, ac=ac, bc=bc, scale=scale, z0=z0, height=height, tissue=tissue, levels=tuple(levels),
        vb_front=vb_front, block_w=block_w, domes={"right": right, "left": left},
        apex=z0 + rng.uniform(0.95, 1.02) * height, cavity=cavity, diaphragm=diaphragm,
    )


def _paint_body(p: _Painter, frame: _Frame) -> None:
    """Skin-to-cavity cross-section on every slice: subcutaneous fat around soft tissue."""
    X, Y = p.grid.x[None, :], p.grid.y[:, None]
    outer = (X / frame.a) ** 2 + (Y / frame.b) ** 2 < 1
    inner = (X / (frame.a - frame.fat)) ** 2 + (Y / (frame.b - frame.fat)) ** 2 < 1
    t = frame.tissue
    p.hu[...] = np.where(inner, t["soft"], np.where(outer, t["fat"], t["air"])).astype(np.int16)
    p.lab[...] = np.where(inner, _BODY, np.where(outer, _FAT, 0)).astype(np.uint8)


def _paint_liver(p: _Painter, frame: _Frame, rng: np.random.Generator) -> _Region:
    """Right upper abdomen under the diaphragm; the left lobe reaches across the midline in front."""
    ac, bc = frame.ac, frame.bc
    tip = ac * rng.uniform(0.3, 0.5)
    bottom, rise = rng.uniform(0.0, 0.12), rng.uniform(0.12, 0.22)
    _, rs, cs = p.grid.box((-ac, -bc, 0), (tip, bc, 0))
    X, Y = p.grid.x[cs][None, :], p.grid.y[rs][:, None]
    edge = -0.05 * ac + (tip + 0.05 * ac) * np.clip((0.2 * bc - Y) / (1.1 * bc), 0, 1)
    l1 = frame.levels[12]
    vessels = (X / (l1.a + 12)) ** 2 + ((Y - l1.y) / (l1.b + 12)) ** 2 < 1  # aorta and vena cava
    mask = frame.cavity[rs, cs] & (X < edge) & ~vessels
    z_lo = frame.z_at(bottom + rise * np.clip((X + ac) / (ac + tip), 0, 1))  # lowest on the right
    z_hi = frame.diaphragm[rs, cs] - 1.5
    p.columns(rs, cs, mask, z_lo, z_hi, frame.tissue["liver"], _LIVER)
    return _Region((-ac, -bc, float(z_lo.min())), (tip, bc, float(z_hi[mask].max())), split=-0.05 * ac)


def _paint_lungs(p: _Painter, frame: _Frame, rng: np.random.Generator) -> dict[str, _Region]:
    """Mediastinal fat above the diaphragm, two lungs cut from it, and their vessel trees."""
    ac, bc, scale = frame.ac, frame.bc, frame.scale
    _, rs, cs = p.grid.box((-ac, -bc, 0), (ac, bc, 0))
    X, Y = p.grid.x[cs][None, :], p.grid.y[rs][:, None]
    cavity, zd = frame.cavity[rs, cs], frame.diaphragm[rs, cs]
    p.columns(rs, cs, cavity, zd, np.inf, frame.tissue["fat"], _FAT)

    w0, w1 = rng.uniform(8, 14) * scale, rng.uniform(8, 16) * scale
    mediastinum = w0 + w1 * np.clip((Y + bc) / (2 * bc), 0, 1)  # widens towards the spine
    t6 = frame.levels[5]
    spine = (X / (t6.a + 6)) ** 2 + ((Y - t6.y) / (t6.b + 6)) ** 2 < 1
    cap = frame.height * rng.uniform(0.25, 0.35)
    masks, tops = {}, {}
    for side, s in (("right", -1.0), ("left", 1.0)):
        masks[side] = cavity & ~spine & (s * X > mediastinum)
        # Each lung narrows towards its apex.
        rho2 = ((X - s * 0.5 * ac) / (0.55 * ac)) ** 2 + ((Y - 0.1 * bc) / (0.85 * bc)) ** 2
        tops[side] = frame.apex - cap * rho2
    p.columns(rs, cs, masks["right"] | masks["left"], zd, np.where(X < 0, tops["right"], tops["left"]),
              frame.tissue["lung"], _LUNG)

    lungs = {}
    for side, s in (("right", -1.0), ("left", 1.0)):
        mask = masks[side] & (tops[side] > zd)
        xs, ys = p.grid.x[cs][mask.any(0)], p.grid.y[rs][mask.any(1)]
        lungs[side] = _Region((float(xs.min()), float(ys.min()), float(zd[mask].min())),
                              (float(xs.max()), float(ys.max()), float(tops[side][mask].max())),
                              split=frame.domes[side])
        dome = frame.domes[side]
        hilum = np.array([s * (w0 + 0.5 * w1 + 4), 0.0, dome + 0.45 * (frame.apex - dome)])
        reach = 0.28 * min(ac - w0, frame.apex - dome)
        for start, end, radius in _vessel_tree(rng, hilum, s, reach, rng.uniform(3.5, 5.5) * scale):
            p.tube([start, end], [radius], frame.tissue["blood"], inside=_LUNG)
    return lungs


# Trunk directions from the hilum (x towards the lung's own side, y posterior, z cranial).
_VESSEL_TRUNKS = ((0.3, -0.1, 1.0), (0.3, 0.5, -1.0), (1.0, -0.6, -0.2), (0.9, 0.6, 0.3), (0.6, -0.3, -0.9))


def _vessel_tree(rng: np.random.Generator, hilum: np.ndarray, side: float, length: float,
                 radius: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments ``(start, end, radius)``: five trunks from the hilum, each forking four times."""
    stack = []
    for dx, dy, dz in _VESSEL_TRUNKS:
        v = np.array([side * dx, dy, dz]) + rng.normal(0, 0.15, 3)
        stack.append((hilum, v / np.linalg.norm(v), length * rng.uniform(0.8, 1.2), radius, 0))
    segments = []
    while stack:
        start, direction, seg_len, r, depth = stack.pop()
        end = start + direction * seg_len
        segments.append((start, end, r))
        if depth < 4:
            normal = rng.normal(size=3)
            normal -= (normal @ direction) * direction
            normal /= np.linalg.norm(normal)
            for sign in (1.0, -1.0):
                angle = rng.uniform(0.35, 0.7)
                child = math.cos(angle) * direction + sign * math.sin(angle) * normal
                stack.append((end, child, seg_len * rng.uniform(0.65, 0.85), r * 0.72, depth + 1))
    return segments


def _draw_heart(grid: _Grid, frame: _Frame, rng: np.random.Generator, variant: _HeartVariant) -> _Heart:
    """Heart left-anterior on the diaphragm, sized by its cardiothoracic ratio, in a pericardium."""
    ratio = rng.uniform(0.39, 0.49)
    angle = math.radians(rng.uniform(20, 40))
    q, cz = rng.uniform(0.62, 0.78), rng.uniform(0.75, 0.9)
    x, y = frame.ac * rng.uniform(0.10, 0.20), -frame.bc * rng.uniform(0.12, 0.25)
    fat_rim = rng.uniform(2.0, 3.5)
    if variant.ratio is not None:
        ratio = variant.ratio
    # Transverse diameter = ratio x inner thoracic diameter (2 ac); solve the turned ellipse for a.
    a = ratio * frame.ac / math.sqrt(math.cos(angle) ** 2 + (q * math.sin(angle)) ** 2)
    b, c = q * a, min(cz * a, 0.17 * frame.height)
    # A big heart sits nearer the midline (else the chest wall would cut its width) and moves
    # forward rather than into the spine (it is cut off just in front of it).
    x *= min(1.0, 0.5 / ratio)
    y = min(y, frame.vb_front - 3 - 0.7 * math.hypot(a * math.sin(angle), b * math.cos(angle)))
    # Sits on the diaphragm, with its widest section clear of it (the right dome is higher).
    r = min(int(np.searchsorted(grid.y, y)), len(grid.y) - 1)
    under = frame.diaphragm[r, _span(grid.x, x - ratio * frame.ac, x + ratio * frame.ac)]
    col = min(int(np.searchsorted(grid.x, x)), len(grid.x) - 1)
    z = max(float(frame.diaphragm[r, col]) + 0.5 * c, float(under.max()) + 2)
    rim, rim_hu = ((variant.rim_mm, variant.fluid_hu) if variant.rim_mm is not None
                   else (fat_rim, frame.tissue["fat"]))
    return _Heart(x, y, z, a, b, c, angle, rim, rim_hu, frame.tissue["blood"])


def _paint_heart(p: _Painter, frame: _Frame, h: _Heart) -> tuple[slice, slice, slice]:
    """Paint the pericardium, then the heart inside it; returns the box holding both."""
    r = h.rim
    box = _turned_ellipsoid(p, frame, (h.x, h.y, h.z), (h.a + r, h.b + r, h.c + r), h.angle, h.rim_hu, _PERICARDIUM)
    _turned_ellipsoid(p, frame, (h.x, h.y, h.z), (h.a, h.b, h.c), h.angle, h.blood_hu, _HEART)
    return box


def _turned_ellipsoid(p: _Painter, frame: _Frame, centre: tuple[float, float, float],
                      semi: tuple[float, float, float], angle: float, hu: int, label: int
                      ) -> tuple[slice, slice, slice]:
    """Fill an ellipsoid whose long axis points left-anterior by ``angle``.

    It stays in the chest cavity above the diaphragm and in front of the spine, where the
    oesophagus and descending aorta flatten the back of the heart.
    """
    (x0, y0, z0), (a, b, c) = centre, semi
    ca, sa = math.cos(angle), math.sin(angle)
    ex, ey = math.hypot(a * ca, b * sa), math.hypot(a * sa, b * ca)
    sl = p.grid.box((x0 - ex, y0 - ey, z0 - c), (x0 + ex, y0 + ey, z0 + c))
    ks, rs, cs = sl
    X, Y = p.grid.x[cs][None, :] - x0, p.grid.y[rs][:, None] - y0
    q2 = ((X * ca - Y * sa) / a) ** 2 + ((X * sa + Y * ca) / b) ** 2
    room = frame.cavity[rs, cs] & (p.grid.y[rs][:, None] < frame.vb_front - 3)
    zd = frame.diaphragm[rs, cs]

    def mask_of(kc: slice) -> np.ndarray:
        z = p.grid.z[kc][:, None, None]
        return (q2 + ((z - z0) / c) ** 2 < 1) & room & (z > zd)

    p.chunks(ks, rs, cs, mask_of, hu, label)
    return sl


def _paint_aorta(p: _Painter, frame: _Frame, heart: _Heart, rng: np.random.Generator) -> None:
    """Ascending aorta from the heart, the arch, and the descending aorta left of the spine."""
    r_up, r_down = rng.uniform(12, 16) * frame.scale, rng.uniform(9, 12) * frame.scale
    z_arch = frame.z_at(rng.uniform(0.80, 0.86))
    t6, l1 = frame.levels[5], frame.levels[12]
    x_down, y_down = t6.a + r_down + 1, t6.y - 2
    points = [
        (heart.x - 0.3 * heart.a * math.cos(heart.angle), heart.y - 0.1 * heart.b, heart.z + 0.5 * heart.c),
        (-0.12 * frame.ac, -0.3 * frame.bc, z_arch - r_up),
        (0.05 * frame.ac, 0.5 * (-0.3 * frame.bc + y_down), z_arch),
        (x_down, y_down, z_arch - r_down),
        (x_down, y_down, frame.domes["left"] - 0.08 * frame.height),
        (0.35 * l1.a, l1.y - l1.b - r_down - 2, frame.z0 - 30),  # in front of the lumbar spine
    ]
    radii = [r_up, r_up, 0.5 * (r_up + r_down), r_down, r_down]
    p.tube(points, radii, frame.tissue["blood"], _AORTA)


def _paint_spine(p: _Painter, frame: _Frame, spacing: float) -> None:
    """Vertebrae T1-L2 (body, canal, arch, spinous and transverse processes) with discs between."""
    t, scale = frame.tissue, frame.scale
    cortex_px = max(1, round(1.5 / spacing))
    back = frame.b - frame.fat - 3  # spinous processes end under the subcutaneous fat
    for j, lv in enumerate(frame.levels):
        r_can = (6.5 + 1.5 * j / 13) * scale
        y_can = lv.y + lv.b + 2 * scale + r_can
        half = lv.a + 14 * scale
        _, rs, cs = p.grid.box((-half, lv.y - lv.b - 1, 0), (half, back, 0))
        X, Y = p.grid.x[cs][None, :], p.grid.y[rs][:, None]
        body = (X / lv.a) ** 2 + ((Y - lv.y) / lv.b) ** 2 < 1
        d2 = X ** 2 + (Y - y_can) ** 2
        canal = d2 < r_can ** 2
        arch = d2 < (r_can + 4 * scale) ** 2
        spinous = (np.abs(X) < 3.5 * scale) & (Y > y_can) & (Y < back)
        transverse = (np.abs(Y - y_can) < 4 * scale) & (np.abs(X) < lv.a + 12 * scale)
        bone = (body | arch | spinous | transverse) & ~canal
        cortex = bone & ~_erode(bone, cortex_px)
        disc_hu = np.where(body, t["disc"], t["csf"]).astype(np.int16)
        p.template(_span(p.grid.z, lv.z_lo, lv.z_hi), rs, cs, body | canal, disc_hu,
                   np.full(body.shape, _BODY, np.uint8))
        bone_hu = np.where(cortex, t["cortex"], np.where(bone, t["cancellous"], t["csf"])).astype(np.int16)
        p.template(_span(p.grid.z, lv.body_lo, lv.body_hi), rs, cs, bone | canal, bone_hu,
                   np.where(bone, _BONE, _BODY).astype(np.uint8))


# How far round each rib reaches, as a fraction of pi from the posterior midline; 11 and 12 float.
_RIB_ENDS = (0.78, 0.8, 0.82, 0.82, 0.82, 0.82, 0.8, 0.75, 0.7, 0.65, 0.5, 0.4)


def _paint_ribs(p: _Painter, frame: _Frame, rng: np.random.Generator) -> None:
    """Twelve rib pairs hugging the cavity, sloping down towards the front; cortex round marrow.

    A rib's cross-section is an ellipse in the plane of height and depth below the cavity wall,
    so at each pixel of the chest wall a rib fills one run of slices: painted voxel by voxel.
    """
    g, scale, t = p.grid, frame.scale, frame.tissue
    X, Y = g.x[None, :], g.y[:, None]
    half_d = 3.0 * scale
    centre_d = half_d + 1.5  # just outside the cavity wall
    theta = np.arctan2(Y, X)
    depth = np.hypot(X, Y) - 1 / np.sqrt((np.cos(theta) / frame.ac) ** 2 + (np.sin(theta) / frame.bc) ** 2)
    r, c = np.nonzero(np.abs(depth - centre_d) < half_d)
    offset = (depth[r, c] - centre_d) / half_d
    phi = np.arctan2(np.abs(X), Y)[r, c]  # angle from the posterior midline
    phi0 = math.atan2(frame.block_w, frame.bc)
    along = np.clip((phi - phi0) / (math.pi - phi0), 0, None)
    drop = frame.height / 14 * rng.uniform(2.5, 3.5)  # front ends lie about three vertebrae lower
    for level, end in zip(frame.levels[:12], _RIB_ENDS):
        on = (phi >= phi0) & (phi <= end * math.pi)
        zc = 0.5 * (level.z_lo + level.z_hi) - drop * (1 - (1 - along[on]) ** 1.6)  # steepest at the back
        h_z = min(5.5 * scale, 0.3 * (level.z_hi - level.z_lo))
        for shrink, hu in ((0.0, t["cortex"]), (1.5, t["cancellous"])):
            rel = offset[on] * half_d / (half_d - shrink)
            hit = np.abs(rel) < 1
            e = (h_z - shrink) * np.sqrt(1 - rel[hit] ** 2)
            p.runs(r[on][hit], c[on][hit], g.k_above(zc[hit] - e), g.k_from(zc[hit] + e), hu, _BONE)


# --- findings --------------------------------------------------------------------------------


class _NoRoom(RuntimeError):
    """Finding ``index`` of ``topic`` could not be placed clear of the others."""

    def __init__(self, topic: str, index: int, why: str) -> None:
        super().__init__(why)
        self.topic, self.index = topic, index


@contextmanager
def _no_room(topic: str, index: int) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:
        raise _NoRoom(topic, index, str(exc)) from None


def _paint_findings(p: _Painter, anatomy: _Anatomy, plan: dict[str, list[str]],
                    rng: np.random.Generator) -> dict[str, list[Finding]]:
    """Paint the planned findings; each one's box is clear of the boxes placed before it.

    The heart goes first (its box is fixed by the anatomy), then the pleural regions, which
    shrink or change side to fit, then the lesions, which are drawn wherever they fit.
    """
    numbers = iter(range(1, 256))
    number = {(topic, j): next(numbers) for topic in TOPICS for j in range(len(plan[topic]))}
    placed: dict[str, dict[int, Finding]] = {topic: {} for topic in TOPICS}
    boxes: list[tuple[int, ...]] = []

    def add(topic: str, j: int, finding: Finding) -> None:
        placed[topic][j] = finding
        boxes.append(finding.box.voxel)  # type: ignore[union-attr]

    for j, kind in enumerate(plan["heart"]):
        add("heart", j, _heart_finding(p, anatomy, kind, number["heart", j]))
    sides = [str(side) for side in rng.permutation(["right", "left"])]
    pleura = plan["pleura"]
    for j, kind in enumerate(pleura):
        allowed = [sides[j]] if len(pleura) == 2 else sides
        with _no_room("pleura", j):
            add("pleura", j, _pleural_finding(p, anatomy, kind, number["pleura", j], boxes, rng, allowed))
    for topic, paint in (("bones", _bone_lesion), ("liver", _liver_lesion), ("lungs", _lung_lesion)):
        for j, kind in enumerate(plan[topic]):
            with _no_room(topic, j):
                add(topic, j, paint(p, anatomy, kind, number[topic, j], boxes, rng))
    return {topic: [placed[topic][j] for j in range(len(plan[topic]))] for topic in TOPICS}


def _draw_hu(rng: np.random.Generator, kind: str) -> int:
    low, high = _HU_RANGES[kind]
    return int(rng.integers(low, high + 1))


def _box_of(sl: tuple[slice, ...], mask: np.ndarray) -> tuple[int, ...] | None:
    """Half-open voxel bounding box ``(k0, r0, c0, k1, r1, c1)`` of ``mask`` placed at ``sl``."""
    if not mask.any():
        return None
    lo, hi = [], []
    for axis, s in enumerate(sl):
        hit = np.flatnonzero(mask.any(axis=tuple(i for i in range(3) if i != axis)))
        lo.append(s.start + int(hit[0]))
        hi.append(s.start + int(hit[-1]) + 1)
    return (*lo, *hi)


def _overlaps(box: Sequence[int], boxes: Sequence[Sequence[int]]) -> bool:
    return any(all(box[i] < o[i + 3] and o[i] < box[i + 3] for i in range(3)) for o in boxes)


def _mark(p: _Painter, sl: tuple[slice, ...], mask: np.ndarray, number: int, hu: int | None) -> Box:
    """Paint a finding's voxels (``hu``, or keep them) and number them in the finding map."""
    if hu is not None:
        np.copyto(p.hu[sl], hu, where=mask)
    np.copyto(p.fmap[sl], number, where=mask)
    return Box(_box_of(sl, mask))  # type: ignore[arg-type]


def _heart_finding(p: _Painter, anatomy: _Anatomy, kind: str, number: int) -> Finding:
    """The heart as painted (cardiomegaly) or its fluid-filled pericardium."""
    sl = anatomy.heart_box
    if kind == "cardiomegaly":
        box = _mark(p, sl, p.lab[sl] == _HEART, number, None)
        ratio, width = _cardiothoracic(p, anatomy)
        size = float(round(width))
        return Finding(kind, cardiomegaly_sentence(ratio, size), size, "heart", 1.0, box)
    box = _mark(p, sl, p.lab[sl] == _PERICARDIUM, number, None)  # the rim was painted as fluid
    rim = round(anatomy.heart.rim)
    return Finding(kind, f"Pericardial effusion, {rim} mm thick.", float(rim), "pericardium", 1.0, box)


def _widest(mask: np.ndarray) -> int:
    """Largest left-right extent, in columns, of ``mask`` [k, r, c] on any one slice."""
    cols = mask.any(axis=1)
    index = np.arange(cols.shape[1])
    first = np.where(cols, index, cols.shape[1]).min(axis=1)
    last = np.where(cols, index, -1).max(axis=1)
    return int(max((last - first + 1).max(initial=0), 0))


def _cardiothoracic(p: _Painter, anatomy: _Anatomy) -> tuple[float, float]:
    """Cardiothoracic ratio and transverse cardiac diameter (mm), measured on the label map.

    The inner thoracic diameter is the widest span between the lungs' outer edges.
    """
    frame, lungs = anatomy.frame, anatomy.lungs.values()
    heart = _widest(p.lab[anatomy.heart_box] == _HEART) * p.grid.spacing
    thorax_box = p.grid.box((-frame.ac, -frame.bc, min(lung.lo[2] for lung in lungs)),
                            (frame.ac, frame.bc, max(lung.hi[2] for lung in lungs)))
    thorax = _widest(p.lab[thorax_box] == _LUNG) * p.grid.spacing
    return heart / thorax, heart


def _pleural_finding(p: _Painter, anatomy: _Anatomy, kind: str, number: int, boxes: list[tuple[int, ...]],
                     rng: np.random.Generator, sides: Sequence[str]) -> Finding:
    """Fluid in the dependent (posterior) base of a hemithorax, or air in front and at the apex.

    Lung voxels in the region, vessels included, are replaced. If the region's box would overlap
    an earlier finding's, it shrinks, then tries the other allowed side.
    """
    effusion = kind == "pleural effusion"
    depth = rng.uniform(15, 45) if effusion else rng.uniform(10, 35)
    extent = rng.uniform(0.3, 0.55) if effusion else rng.uniform(0.35, 0.6)
    hu = _draw_hu(rng, kind)
    for side in sides:
        for attempt in range(12):
            shrink = 0.85 ** attempt
            sl, mask = _pleural_region(p, anatomy.lungs[side], effusion, depth * shrink, extent * shrink)
            box = _box_of(sl, mask)
            if box is None or _overlaps(box, boxes):
                continue
            painted = _mark(p, sl, mask, number, hu)
            size = float(max(1, round(int(mask.sum(axis=1).max()) * p.grid.spacing)))  # deepest run of rows
            text = (f"{side.capitalize()} pleural effusion, {size:.0f} mm deep." if effusion
                    else f"{side.capitalize()} pneumothorax, {size:.0f} mm.")
            return Finding(kind, text, size, f"{side} pleural space", 1.0, painted)
    raise RuntimeError(f"phantom: no room for a {kind} clear of the other findings' boxes")


def _pleural_region(p: _Painter, lung: _Region, effusion: bool, depth: float, extent: float
                    ) -> tuple[tuple[slice, ...], np.ndarray]:
    g = p.grid
    (x_lo, y_lo, z_lo), (x_hi, y_hi, z_hi) = lung.lo, lung.hi
    if effusion:
        top = z_lo + extent * (z_hi - z_lo)
        sl = g.box((x_lo, y_hi - depth, z_lo), (x_hi, y_hi, top))
        # Deepest at the base, thinning upwards: the dependent crescent of a supine patient.
        line = y_hi - depth * np.clip(1 - (g.z[sl[0]] - z_lo) / (top - z_lo), 0, 1) ** 0.6
        region = g.y[sl[1]][None, :, None] > line[:, None, None]
    else:
        dome = lung.split
        bottom, cap = z_hi - extent * (z_hi - dome), z_hi - 0.15 * (z_hi - dome)
        sl = g.box((x_lo, y_lo, bottom), (x_hi, y_hi, z_hi))
        # A non-dependent anterior layer that takes the whole apex above ``cap``.
        line = y_lo + depth + (y_hi - y_lo) * np.clip((g.z[sl[0]] - cap) / (z_hi - cap), 0, 1)
        region = g.y[sl[1]][None, :, None] < line[:, None, None]
    return sl, region & (p.lab[sl] == _LUNG)


def _voxel_in(p: _Painter, rng: np.random.Generator, lo: Sequence[float], hi: Sequence[float],
              label: int) -> np.ndarray | None:
    """A random voxel centre (x, y, z) between ``lo`` and ``hi`` if its label is ``label``."""
    ks, rs, cs = p.grid.box(lo, hi)
    if ks.stop <= ks.start or rs.stop <= rs.start or cs.stop <= cs.start:
        return None
    k, r, c = (int(rng.integers(s.start, s.stop)) for s in (ks, rs, cs))
    if p.lab[k, r, c] != label:
        return None
    return np.array([p.grid.x[c], p.grid.y[r], p.grid.z[k]], np.float32)


def _ellipsoid(grid: _Grid, centre: np.ndarray, semi: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Voxels of an axis-aligned ellipsoid, or ``None`` where it would reach past the volume."""
    lo, hi = centre - semi, centre + semi
    first = (grid.x[0], grid.y[0], grid.z[0])
    last = (grid.x[-1], grid.y[-1], grid.z[-1])
    if any(lo[i] < first[i] or hi[i] > last[i] for i in range(3)):
        return None
    sl = grid.box(lo, hi)
    z = ((grid.z[sl[0]] - centre[2]) / semi[2]) ** 2
    y = ((grid.y[sl[1]] - centre[1]) / semi[1]) ** 2
    x = ((grid.x[sl[2]] - centre[0]) / semi[0]) ** 2
    return sl, z[:, None, None] + y[:, None] + x <= 1


def _place_blob(p: _Painter, rng: np.random.Generator, boxes: list[tuple[int, ...]], kind: str, size: int,
                min_size: int, shape: np.ndarray, sample: Callable[[], np.ndarray | None],
                fits: Callable[[tuple[slice, ...], np.ndarray], bool], attempts: int = 400
                ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, int]:
    """Draw voxel-centred positions until an ellipsoid of diameter ``size`` mm fits.

    It fits when its box is clear of ``boxes`` and ``fits`` accepts its voxels; the size
    shrinks after every fifth of the attempts (not below ``min_size``). Returns box, mask,
    centre and size.
    """
    for attempt in range(attempts):
        if attempt and attempt % (attempts // 5) == 0:
            size = max(min_size, int(size * 0.85))
        centre = sample()
        if centre is None:
            continue
        found = _ellipsoid(p.grid, centre, np.float32(size / 2) * shape)
        if found is None:
            continue
        sl, mask = found
        if not _overlaps(_box_of(sl, mask), boxes) and fits(sl, mask):  # type: ignore[arg-type]
            return sl, mask, centre, size
    raise RuntimeError(f"phantom: no room for a {size} mm {kind} clear of the other findings' boxes")


def _blob_shape(rng: np.random.Generator, least: float) -> np.ndarray:
    """Semi-axis factors (x, y, z): one of 1, the others a little shorter, in random order."""
    return rng.permutation([1.0, rng.uniform(least, 1.0), rng.uniform(least, 1.0)]).astype(np.float32)


def _lung_lesion(p: _Painter, anatomy: _Anatomy, kind: str, number: int, boxes: list[tuple[int, ...]],
                 rng: np.random.Generator) -> Finding:
    """A solid nodule (4-29 mm) or mass (30-50 mm), wholly inside one lung."""
    low, high = (4, MASS_MIN_MM - 1) if kind == "nodule" else (MASS_MIN_MM, 50)
    size, shape, hu = int(rng.integers(low, high + 1)), _blob_shape(rng, 0.8), _draw_hu(rng, kind)

    def sample() -> np.ndarray | None:
        lung = anatomy.lungs[("right", "left")[int(rng.integers(2))]]
        return _voxel_in(p, rng, lung.lo, lung.hi, _LUNG)

    def fits(sl: tuple[slice, ...], mask: np.ndarray) -> bool:
        return bool(np.all(p.lab[sl][mask] == _LUNG))

    sl, mask, centre, size = _place_blob(p, rng, boxes, kind, size, low, shape, sample, fits)
    side = "right" if centre[0] < 0 else "left"
    lobe = _lung_lobe(anatomy.lungs[side], side, centre)
    return Finding(kind, lung_lesion_sentence(kind, size, lobe), float(size), lobe, 1.0, _mark(p, sl, mask, number, hu))


def _lung_lobe(lung: _Region, side: str, point: np.ndarray) -> str:
    height = (float(point[2]) - lung.split) / (lung.hi[2] - lung.split)
    depth = (float(point[1]) - lung.lo[1]) / (lung.hi[1] - lung.lo[1])
    return lung_lobe(side, height, depth)


def lung_lobe(side: str, height: float, depth: float) -> str:
    """The lobe of the ``side`` lung at ``height`` (0 at its diaphragm dome, 1 at its apex) and
    ``depth`` (0 at its front, 1 at its back): below the oblique fissure, which rises backwards, is
    the lower lobe; on the right, the horizontal fissure splits the rest into upper and middle."""
    if height < 0.1 + 0.55 * depth:
        return f"{side} lower lobe"
    if side == "right" and height < 0.55:
        return "right middle lobe"
    return f"{side} upper lobe"


def _liver_lesion(p: _Painter, anatomy: _Anatomy, kind: str, number: int, boxes: list[tuple[int, ...]],
                  rng: np.random.Generator) -> Finding:
    """A hypodense lesion (5-40 mm, 0-40 HU) wholly inside the liver."""
    liver, liver_hu = anatomy.liver, anatomy.frame.tissue["liver"]
    size, shape, hu = int(rng.integers(5, 41)), _blob_shape(rng, 0.85), _draw_hu(rng, kind)

    def fits(sl: tuple[slice, ...], mask: np.ndarray) -> bool:
        return bool(np.all(p.lab[sl][mask] == _LIVER) and np.all(p.hu[sl][mask] == liver_hu))

    sl, mask, centre, size = _place_blob(p, rng, boxes, kind, size, 5, shape,
                                         lambda: _voxel_in(p, rng, liver.lo, liver.hi, _LIVER), fits)
    lobe = "right hepatic lobe" if centre[0] < liver.split else "left hepatic lobe"
    return Finding(kind, f"{size} mm hypodense lesion in the {lobe}.", float(size), lobe, 1.0,
                   _mark(p, sl, mask, number, hu))


def _bone_lesion(p: _Painter, anatomy: _Anatomy, kind: str, number: int, boxes: list[tuple[int, ...]],
                 rng: np.random.Generator) -> Finding:
    """A lytic (0-100 HU) or sclerotic (600-1200 HU) lesion in the cancellous bone of a vertebral body.

    Its size is drawn for the vertebra it goes in, whose body may be only a few slices tall.
    """
    frame, g = anatomy.frame, p.grid
    hu = _draw_hu(rng, kind)
    levels = [lv for lv in frame.levels if lv.body_lo >= g.z[0] and lv.body_hi <= g.z[-1]]
    for i in rng.permutation(len(levels)):
        lv = levels[i]
        largest = int(min(25, 1.8 * lv.b - 2, lv.body_hi - lv.body_lo - 1))
        if largest < 5:
            continue
        X, Y = g.x[None, None, :], g.y[None, :, None]

        def fits(sl: tuple[slice, ...], mask: np.ndarray) -> bool:
            # Inside the body's own outline, not the cancellous bone of the arch behind it.
            in_body = (X[..., sl[2]] / (0.9 * lv.a)) ** 2 + ((Y[:, sl[1]] - lv.y) / (0.9 * lv.b)) ** 2 < 1
            return bool(np.all(in_body | ~mask) and np.all(p.hu[sl][mask] == frame.tissue["cancellous"]))

        try:
            sl, mask, _, size = _place_blob(
                p, rng, boxes, kind, int(rng.integers(5, largest + 1)), 5, np.ones(3, np.float32),
                lambda: _voxel_in(p, rng, (-lv.a, lv.y - lv.b, lv.body_lo), (lv.a, lv.y + lv.b, lv.body_hi), _BONE),
                fits, attempts=120)
        except RuntimeError:
            continue
        return Finding(kind, f"{size} mm {kind} in the {lv.name} vertebral body.", float(size),
                       f"{lv.name} vertebral body", 1.0, _mark(p, sl, mask, number, hu))
    raise RuntimeError(f"phantom: no vertebral body has room for a {kind} clear of the other findings' boxes")


# --- the truth -------------------------------------------------------------------------------


def _truth(seed: int, placed: dict[str, list[Finding]]) -> StudyResult:
    topics = [TopicResult(topic, False, findings) if findings
              else TopicResult(topic, True, [], NORMAL_SENTENCES[topic])
              for topic, findings in placed.items()]
    return StudyResult(phantom_uid(seed, "series"), TRUTH_ENGINE, topics, _answers(topics))


def _answers(topics: Sequence[TopicResult]) -> list[Answer]:
    """Answers to ``QUESTIONS`` from the truth; each boxed on the largest finding it refers to."""
    def of_type(kind: str) -> list[Finding]:
        return [f for topic in topics for f in topic.findings if f.type == kind]

    def largest(findings: list[Finding]) -> Finding | None:
        return max(findings, key=lambda f: f.size_mm or 0.0, default=None)

    effusion = largest(of_type("pleural effusion"))
    nodules = of_type("nodule")
    liver = largest(of_type("hypodense lesion"))
    biggest_nodule = largest(nodules)
    return [
        Answer(QUESTIONS[0], "yes" if effusion else "no", 1.0, effusion.box if effusion else None),
        Answer(QUESTIONS[1], str(len(nodules)), 1.0, biggest_nodule.box if biggest_nodule else None),
        Answer(QUESTIONS[2], f"{liver.size_mm:.0f} mm" if liver else "no liver lesion", 1.0,
               liver.box if liver else None),
    ]


# --- DICOM output ----------------------------------------------------------------------------


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://readout.example/phantom")


def phantom_uid(seed: int, what: str) -> str:
    """A UID that is the same for every run with the same seed (2.25 root, UUID-derived)."""
    # Name-based (version 5) UUID: pydicom's generate_uid(prefix=None) ignores its entropy
    # sources and returns a random UUID, which would give every run a new study.
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{seed}/{what}').int}")


def ct_series_datasets(
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    origin_mm: Sequence[float],
    *,
    seed: int,
    slice_thickness_mm: float | None = None,
    patient_name: str = "Phantom^Readout",
    series_description: str = "Chest/abdomen axial",
) -> list[Dataset]:
    """One axial, head-first-supine CT Image Storage dataset per slice of ``hu``.

    ``hu`` is indexed ``[k, r, c]`` with ``k`` ascending in patient z (feet to head);
    ``origin_mm`` is the LPS centre of voxel (0, 0, 0). Pixels are 16-bit signed with
    RescaleIntercept -1024. UIDs derive from ``seed`` so the same seed gives the same study.
    Instance numbers run head to feet, as most scanners number them.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D [k, r, c], got shape {hu.shape}")
    n_slices, rows, cols = hu.shape
    stored = np.clip(hu.astype(np.int32) - _RESCALE_INTERCEPT, -32768, 32767).astype(np.int16)
    study_uid = phantom_uid(seed, "study")
    series_uid = phantom_uid(seed, "series")
    for_uid = phantom_uid(seed, "frame-of-reference")
    thickness = slice_spacing_mm if slice_thickness_mm is None else slice_thickness_mm

    datasets = []
    for k in range(n_slices):
        sop_uid = phantom_uid(seed, f"instance-{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.AccessionNumber = f"PH{seed:08d}"
        ds.Modality = "CT"
        ds.Manufacturer = "Readout phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT chest upper abdomen"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = f"PHANTOM-{seed}"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness:.3f}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = n_slices - k
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = float(origin_mm[2]) + k * slice_spacing_mm
        ds.ImagePositionPatient = [f"{float(origin_mm[0]):.4f}", f"{float(origin_mm[1]):.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.PixelSpacing = [f"{pixel_spacing_mm[0]:.6f}", f"{pixel_spacing_mm[1]:.6f}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_datasets(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write each dataset as ``out_dir/CT{instance:04d}.dcm``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"CT{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
