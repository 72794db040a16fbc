"""The synthetic CT phantom: determinism, variety, anatomy, findings and their truth, DICOM output."""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import pydicom
import pytest

from engines.phantom import (
    ANATOMY_LABELS,
    FINDING_TYPES,
    NORMAL_SENTENCES,
    QUESTIONS,
    TOPICS,
    Phantom,
    draw_geometry,
    phantom_uid,
    render_phantom,
    write_phantom_study,
)
from engines.results import StudyResult

# HU promised for each finding's voxels (before noise); cardiomegaly keeps the heart's blood HU.
FINDING_HU = {
    "nodule": (-50, 80), "mass": (-50, 80), "pleural effusion": (0, 20), "pneumothorax": (-1000, -1000),
    "cardiomegaly": (35, 50), "pericardial effusion": (0, 20), "hypodense lesion": (0, 40),
    "lytic lesion": (0, 100), "sclerotic lesion": (600, 1200),
}
# The anatomy label each finding's voxels keep.
FINDING_LABEL = {
    "nodule": "lung", "mass": "lung", "pleural effusion": "lung", "pneumothorax": "lung", "cardiomegaly": "heart",
    "pericardial effusion": "pericardium", "hypodense lesion": "liver", "lytic lesion": "bone",
    "sclerotic lesion": "bone",
}
NONE = {topic: [] for topic in TOPICS}
EVERYTHING_A = {"lungs": ["nodule", "mass"], "pleura": ["pleural effusion", "pneumothorax"],
                "heart": ["cardiomegaly"], "liver": ["hypodense lesion", "hypodense lesion"],
                "bones": ["lytic lesion", "sclerotic lesion"]}
EVERYTHING_B = {"lungs": ["nodule", "nodule"], "pleura": ["pneumothorax"], "heart": ["pericardial effusion"],
                "liver": ["hypodense lesion"], "bones": ["sclerotic lesion", "sclerotic lesion"]}
SMALL_SEEDS = (4, 16, 19, 22, 28)  # the smallest volumes among the first 30 seeds: fast to render
LABEL = ANATOMY_LABELS


@cache
def _render(seed: int, normal: bool, findings: tuple | None) -> Phantom:
    return render_phantom(seed, normal=normal, findings=None if findings is None else dict(findings))


def phantom(seed: int, *, normal: bool = False, findings: dict | None = None) -> Phantom:
    """Rendered once per argument set for the whole module; tests only read it."""
    key = None if findings is None else tuple(sorted((k, tuple(v)) for k, v in findings.items()))
    return _render(seed, normal, key)


def all_findings(p: Phantom) -> list:
    return [f for topic in p.truth.topics for f in topic.findings]


def widest_mm(mask: np.ndarray, spacing: float) -> float:
    """Largest left-right extent of ``mask`` [k, r, c] on one slice, in mm."""
    widths = [np.flatnonzero(row)[-1] - np.flatnonzero(row)[0] + 1 for row in mask.any(axis=1) if row.any()]
    return max(widths) * spacing


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


FINDING_PHANTOMS = [(19, EVERYTHING_A), (22, EVERYTHING_A), (16, EVERYTHING_B), (28, EVERYTHING_B),
                    (4, None), (21, None)]


def test_same_seed_gives_the_same_phantom():
    a, b = render_phantom(4), render_phantom(4)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.anatomy, b.anatomy)
    assert np.array_equal(a.finding_map, b.finding_map)
    assert a.truth.to_dict() == b.truth.to_dict()
    assert (a.origin_mm, a.pixel_spacing_mm, a.slice_thickness_mm) == (b.origin_mm, b.pixel_spacing_mm,
                                                                       b.slice_thickness_mm)
    other = phantom(16)
    assert other.hu.shape != a.hu.shape or not np.array_equal(other.hu, a.hu)


def test_geometry_varies_within_the_stated_ranges():
    drawn = [draw_geometry(seed) for seed in range(20)]
    for g in drawn:
        assert 130 <= g.body_lr_mm <= 175 and 90 <= g.body_ap_mm <= 125
        assert 5 <= g.noise_hu <= 20
        assert 0.6 <= g.pixel_spacing_mm <= 1.6 and 1 <= g.slice_thickness_mm <= 5
        assert 40 <= g.slices <= 160
        if 40 < g.slices < 160:  # not clamped: the z extent is 160-380 mm
            assert 160 - g.slice_thickness_mm <= g.slices * g.slice_thickness_mm <= 380 + g.slice_thickness_mm
        dx, dy = g.body_offset_mm
        for n, semi, offset in ((g.cols, g.body_lr_mm, dx), (g.rows, g.body_ap_mm, dy)):
            assert n <= 512
            assert n == 512 or n * g.pixel_spacing_mm >= 2 * (semi + abs(offset))  # the body fits unless capped
    assert len({g.pixel_spacing_mm for g in drawn}) >= 15
    assert len({g.slice_thickness_mm for g in drawn}) >= 4
    assert len({g.slices for g in drawn}) >= 8
    assert np.std([g.body_lr_mm for g in drawn]) > 5 and np.std([g.body_ap_mm for g in drawn]) > 5
    assert np.std([g.noise_hu for g in drawn]) > 2


def test_rendered_phantom_has_the_drawn_geometry():
    g, p = draw_geometry(19), phantom(19, findings=EVERYTHING_A)
    assert p.hu.shape == p.anatomy.shape == p.finding_map.shape == g.shape
    assert p.hu.dtype == np.int16 and p.anatomy.dtype == np.uint8
    assert p.pixel_spacing_mm == g.pixel_spacing_mm
    assert p.slice_spacing_mm == p.slice_thickness_mm == g.slice_thickness_mm
    assert p.origin_mm[2] == g.table_z_mm
    assert p.seed == 19 and p.truth.series_instance_uid == phantom_uid(19, "series")


def test_noise_has_the_drawn_sigma():
    for seed in (4, 16):
        p, sigma = phantom(seed, normal=True), draw_geometry(seed).noise_hu
        liver = p.hu[p.anatomy == LABEL["liver"]].astype(np.float64)
        assert abs(liver.std() - sigma) < 0.1 * sigma + 0.5
        assert abs(np.median(liver) - liver.mean()) < 0.1 * sigma + 0.5  # symmetric, as Gaussian noise is


def test_tissues_have_their_hu():
    for seed in (4, 22):
        p = phantom(seed, normal=True)

        def median(label: str) -> float:
            return float(np.median(p.hu[p.anatomy == LABEL[label]]))

        assert -880 <= median("lung") <= -820
        assert 50 <= median("liver") <= 70
        assert -115 <= median("fat") <= -85
        assert 30 <= median("heart") <= 55
        assert median("body") > 20
        bone = p.hu[p.anatomy == LABEL["bone"]]
        assert 940 <= np.median(bone[bone > 650]) <= 1060  # cortex
        assert 240 <= np.median(bone[bone < 650]) <= 360  # cancellous bone
        assert np.median(p.hu[p.anatomy == 0]) <= -990  # air outside the body


def test_anatomy_sits_where_it_belongs():
    p = phantom(22, normal=True)
    body = centroid(p.anatomy > 0)
    liver, heart = centroid(p.anatomy == LABEL["liver"]), centroid(p.anatomy == LABEL["heart"])
    lungs, bone = centroid(p.anatomy == LABEL["lung"]), centroid(p.anatomy == LABEL["bone"])
    assert liver[2] < body[2] < heart[2]  # liver on the patient's right (low columns), heart left
    assert liver[0] < heart[0] < lungs[0]  # k ascends feet to head
    assert heart[1] < bone[1]  # heart anterior to the spine (rows run anterior to posterior)
    lung = p.anatomy == LABEL["lung"]
    right, left = lung[:, :, : int(body[2])].sum(), lung[:, :, int(body[2]):].sum()
    assert 0.5 < right / left < 2  # two lungs, one each side


def test_normal_phantom_reads_normal():
    p = phantom(16, normal=True)
    assert [t.topic for t in p.truth.topics] == list(TOPICS)
    for topic in p.truth.topics:
        assert topic.normal and topic.findings == [] and topic.text == NORMAL_SENTENCES[topic.topic]
    assert not p.finding_map.any()
    assert [(a.question, a.answer, a.box) for a in p.truth.answers] == [
        (QUESTIONS[0], "no", None), (QUESTIONS[1], "0", None), (QUESTIONS[2], "no liver lesion", None)]
    assert p.truth.engine.name == "phantom-truth" and p.truth.engine.version == "1"


def test_forced_findings_are_painted_in_order():
    for seed, plan in ((19, EVERYTHING_A), (16, EVERYTHING_B)):
        p = phantom(seed, findings=plan)
        for topic in p.truth.topics:
            assert [f.type for f in topic.findings] == plan[topic.topic]
            assert topic.normal is (not plan[topic.topic])
            assert topic.text == (None if plan[topic.topic] else NORMAL_SENTENCES[topic.topic])
    partial = phantom(16, findings={"lungs": ["mass"], "liver": []})
    lungs = next(t for t in partial.truth.topics if t.topic == "lungs")
    liver = next(t for t in partial.truth.topics if t.topic == "liver")
    assert [f.type for f in lungs.findings] == ["mass"] and liver.normal


@pytest.mark.parametrize(("seed", "plan"), FINDING_PHANTOMS)
def test_each_finding_is_boxed_exactly_and_has_its_hu(seed, plan):
    p = phantom(seed, findings=plan)
    sigma = draw_geometry(seed).noise_hu
    findings = all_findings(p)
    assert int(p.finding_map.max()) == len(findings)
    for number, f in enumerate(findings, start=1):
        mask = p.finding_map == number
        k, r, c = (np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3))
        assert f.box.voxel == (k[0], r[0], c[0], k[-1] + 1, r[-1] + 1, c[-1] + 1), f.text
        assert f.box.outside(p.hu.shape) is None
        low, high = FINDING_HU[f.type]
        slack = 3 * sigma / np.sqrt(mask.sum()) + 1
        assert low - slack <= np.median(p.hu[mask]) <= high + slack, f.text
        assert np.all(p.anatomy[mask] == LABEL[FINDING_LABEL[f.type]]), f.text
        assert f.confidence == 1.0 and f.size_mm > 0 and f.location
        assert f"{f.size_mm:.0f} mm" in f.text and f.type in FINDING_TYPES[next(
            t.topic for t in p.truth.topics if f in t.findings)]


@pytest.mark.parametrize(("seed", "plan"), FINDING_PHANTOMS)
def test_finding_boxes_do_not_overlap(seed, plan):
    boxes = [f.box.voxel for f in all_findings(phantom(seed, findings=plan))]
    assert len(boxes) >= 2
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not all(a[j] < b[j + 3] and b[j] < a[j + 3] for j in range(3)), (a, b)


def test_lung_lesions_lie_inside_a_named_lobe_of_their_side():
    for seed, plan in FINDING_PHANTOMS[:4]:
        p = phantom(seed, findings=plan)
        body_axis = centroid(p.anatomy > 0)[2]
        for number, f in enumerate(all_findings(p), start=1):
            if f.type not in ("nodule", "mass"):
                continue
            mask = p.finding_map == number
            assert np.all(p.anatomy[mask] == LABEL["lung"])
            side = "right" if centroid(mask)[2] < body_axis else "left"
            assert re.fullmatch(rf"{side} (upper|lower|middle) lobe", f.location), f.location
            assert side == "right" or "middle" not in f.location
            assert (f.size_mm < 30) if f.type == "nodule" else (30 <= f.size_mm <= 50)


def test_pleural_fluid_is_posterior_and_air_anterior_without_vessels():
    p = phantom(19, findings=EVERYTHING_A)
    lung = p.anatomy == LABEL["lung"]
    for number, f in enumerate(all_findings(p), start=1):
        mask = p.finding_map == number
        if f.type == "pleural effusion":
            assert centroid(mask)[1] > centroid(lung)[1]  # dependent: towards the patient's back
            assert centroid(mask)[0] < centroid(lung)[0]  # at the base
        elif f.type == "pneumothorax":
            assert centroid(mask)[1] < centroid(lung)[1]  # non-dependent: in front
            assert p.hu[mask].max() < -850  # no vessel (40 HU) survives inside the air
        else:
            continue
        assert re.fullmatch(r"(right|left) pleural space", f.location)


def test_cardiothoracic_ratio_from_the_label_map():
    for seed in SMALL_SEEDS[:3]:
        big, normal = phantom(seed, findings={**NONE, "heart": ["cardiomegaly"]}), phantom(seed, findings=NONE)
        ratio = {}
        for name, p in (("big", big), ("normal", normal)):
            heart = widest_mm(p.anatomy == LABEL["heart"], p.pixel_spacing_mm)
            ratio[name] = heart / widest_mm(p.anatomy == LABEL["lung"], p.pixel_spacing_mm)
        assert ratio["big"] > 0.55 and 0.38 <= ratio["normal"] < 0.5
        finding = next(t for t in big.truth.topics if t.topic == "heart").findings[0]
        assert f"ratio {ratio['big']:.2f}" in finding.text
        assert finding.size_mm == round(widest_mm(big.anatomy == LABEL["heart"], big.pixel_spacing_mm))


def test_pericardial_effusion_surrounds_the_heart():
    p = phantom(16, findings=EVERYTHING_B)
    number = 1 + [f.type for f in all_findings(p)].index("pericardial effusion")
    finding = all_findings(p)[number - 1]
    heart = np.argwhere(p.anatomy == LABEL["heart"])
    k0, r0, c0, k1, r1, c1 = finding.box.voxel
    assert (heart.min(0) >= (k0, r0, c0)).all() and (heart.max(0) < (k1, r1, c1)).all()
    assert 5 <= finding.size_mm <= 15


def test_bone_lesions_are_named_by_vertebral_level_from_the_top():
    p = phantom(28, findings=EVERYTHING_B)
    levels = [f"T{i}" for i in range(1, 13)] + ["L1", "L2"]
    found = []
    for number, f in enumerate(all_findings(p), start=1):
        if f.type in ("lytic lesion", "sclerotic lesion"):
            level = re.fullmatch(r"(T\d+|L\d) vertebral body", f.location).group(1)
            found.append((levels.index(level), centroid(p.finding_map == number)[0]))
            assert f.text == f"{f.size_mm:.0f} mm {f.type} in the {level} vertebral body."
    (level_a, k_a), (level_b, k_b) = found
    assert level_a != level_b  # this seed puts its two lesions in different vertebrae
    assert (level_a < level_b) == (k_a > k_b)  # T1 is at the top, and k ascends towards the head


def test_answers_follow_the_truth():
    p = phantom(19, findings=EVERYTHING_A)
    by_type: dict[str, list] = {}
    for f in all_findings(p):
        by_type.setdefault(f.type, []).append(f)
    effusion, nodule = by_type["pleural effusion"][0], by_type["nodule"][0]
    liver = max(by_type["hypodense lesion"], key=lambda f: f.size_mm)
    assert [(a.question, a.answer, a.box, a.confidence) for a in p.truth.answers] == [
        (QUESTIONS[0], "yes", effusion.box, 1.0),
        (QUESTIONS[1], "1", nodule.box, 1.0),
        (QUESTIONS[2], f"{liver.size_mm:.0f} mm", liver.box, 1.0),
    ]


def test_findings_change_only_their_own_voxels():
    normal = phantom(22, normal=True)
    sick = phantom(22, findings={**NONE, "lungs": ["nodule"], "liver": ["hypodense lesion"]})
    painted = sick.finding_map > 0
    assert painted.any() and np.array_equal(sick.anatomy, normal.anatomy)
    assert np.array_equal(sick.hu[~painted], normal.hu[~painted])
    assert not np.array_equal(sick.hu[painted], normal.hu[painted])


@pytest.mark.parametrize(("findings", "message"), [
    ({"spleen": ["cyst"]}, "unknown topic"),
    ({"lungs": ["cyst"]}, "unknown type 'cyst'"),
    ({"lungs": "nodule"}, "must be a list"),
    ({"pleura": ["pneumothorax"] * 3}, "one per side"),
    ({"heart": ["cardiomegaly", "pericardial effusion"]}, "at most one"),
])
def test_bad_requests_are_refused_with_a_reason(findings, message):
    with pytest.raises(ValueError, match=message):
        render_phantom(4, findings=findings)


def test_negative_seed_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        render_phantom(-1)


def test_write_phantom_study_round_trips(tmp_path):
    seed = 19
    truth_path = write_phantom_study(tmp_path / "study", seed)
    p = phantom(seed)
    assert truth_path == tmp_path / "study" / "truth.json"
    assert StudyResult.load(truth_path).to_dict() == p.truth.to_dict()
    files = sorted((tmp_path / "study" / "dicom").glob("*.dcm"))
    assert len(files) == p.hu.shape[0]
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    assert np.array_equal(hu, p.hu)
    first = slices[0]
    assert {ds.SeriesInstanceUID for ds in slices} == {p.truth.series_instance_uid}
    assert first.SeriesDescription == f"Axial {p.slice_thickness_mm:g} mm"
    assert float(first.SliceThickness) == p.slice_thickness_mm
    assert [float(v) for v in first.PixelSpacing] == [p.pixel_spacing_mm] * 2
    assert [float(v) for v in first.ImagePositionPatient] == pytest.approx(p.origin_mm, abs=1e-3)
    assert float(slices[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]) == pytest.approx(
        p.slice_spacing_mm, abs=1e-3)


@pytest.mark.slow
def test_random_draws_mix_normal_and_abnormal_topics():
    normal_count, total, kinds = 0, 0, set()
    for seed in range(30):
        p = render_phantom(seed)
        for topic in p.truth.topics:
            total += 1
            normal_count += topic.normal
            assert len(topic.findings) <= 2
            kinds.update(f.type for f in topic.findings)
    assert 0.3 < normal_count / total < 0.7
    assert kinds == {kind for kinds_ in FINDING_TYPES.values() for kind in kinds_}
