"""SR and SEG written from findings: round trip through highdicom, real validators, determinism."""

from __future__ import annotations

import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_sr import codes as readout_codes
from dicom_sr.conformance import dciodvfy_errors, dsrdump_errors
from dicom_sr.seg import write_segmentation
from dicom_sr.sr import write_report
from engines.results import FindingsError, StudyResult
from engines.series import load_study_volume
from engines.volume import load_series
from orthanc_plugin.cli import main
from tests.sr_reading import read_groups

# Between them these two phantoms carry every finding type of the vocabulary.
ALL_TYPES_A = {"lungs": ["nodule", "mass"], "pleura": ["pleural effusion"], "heart": ["cardiomegaly"],
               "liver": ["hypodense lesion"], "bones": ["lytic lesion"]}
ALL_TYPES_B = {"lungs": [], "pleura": ["pneumothorax"], "heart": ["pericardial effusion"],
               "liver": [], "bones": ["sclerotic lesion"]}


@pytest.fixture(scope="module", params=[("A", 11, ALL_TYPES_A), ("B", 12, ALL_TYPES_B)], ids=["A", "B"])
def exported(request, make_phantom_study, tmp_path_factory):
    _, seed, findings = request.param
    study = make_phantom_study(seed, findings)
    out = tmp_path_factory.mktemp("export")
    assert main(["export", "--findings", str(study / "truth.json"), str(study / "dicom"), "--out", str(out)]) == 0
    truth = StudyResult.load(study / "truth.json")
    volume, _ = load_study_volume(study / "dicom")
    return truth, volume, out


def _rasterize(truth: StudyResult, shape) -> list[np.ndarray]:
    masks = []
    for topic in truth.topics:
        for finding in topic.findings:
            if finding.box is not None:
                mask = np.zeros(shape, dtype=bool)
                k0, r0, c0, k1, r1, c1 = finding.box.voxel
                mask[k0:k1, r0:r1, c0:c1] = True
                masks.append(mask)
    return masks


def test_sr_round_trip_gives_every_finding(exported):
    truth, volume, out = exported
    groups = read_groups(out / "sr.dcm")
    n_findings = 0
    for topic in truth.topics:
        for number, finding in enumerate(topic.findings, start=1):
            n_findings += 1
            group = groups[f"{topic.topic}: {finding.type} {number}"]
            assert group["text"] == finding.text
            assert group["type_code"] == readout_codes.finding_type_code(finding.type).value
            assert group["site_code"] == readout_codes.TOPIC_SITES[topic.topic].value
            expected_side = readout_codes.laterality(finding.location)
            assert group["laterality_code"] == (expected_side.value if expected_side else None)
            assert group["certainty_percent"] == pytest.approx(finding.confidence * 100)
            assert group["diameter_mm"] == pytest.approx(finding.size_mm)
            k0, r0, c0, k1, r1, c1 = finding.box.voxel
            assert group["graphic_type"] == "POLYLINE"
            assert group["rectangle"] == [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]
            assert group["key_sop_uid"] == volume.sop_instance_uids[(k0 + k1 - 1) // 2]
            assert group["purpose_codes"] == ["75958009"]
            assert sorted(group["kinds"]) == ["planar", "volumetric"]
        if not topic.findings:
            assert groups[f"{topic.topic}: normal"]["text"] == topic.text
    finding_groups = [label for label, g in groups.items() if "volumetric" in g["kinds"]]
    assert n_findings >= 3 and len(finding_groups) == n_findings
    for answer in truth.answers:
        assert groups[f"question: {answer.question}"]["text"] == answer.answer


def test_seg_voxels_equal_rasterized_boxes(exported):
    truth, volume, out = exported
    seg = hd.seg.segread(out / "seg.dcm")
    expected = _rasterize(truth, volume.shape)
    assert seg.get_segment_numbers() == list(range(1, len(expected) + 1))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids),
        segment_numbers=list(range(1, len(expected) + 1)),
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (*volume.shape, len(expected))
    for s, mask in enumerate(expected):
        assert np.array_equal(pixels[..., s].astype(bool), mask), f"segment {s + 1}"


def test_seg_segments_match_sr_groups(exported):
    _, _, out = exported
    groups = read_groups(out / "sr.dcm")
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.SegmentationType == "BINARY"
    for item in seg.SegmentSequence:
        group = groups[item.TrackingID]
        assert group["tracking_uid"] == item.TrackingUID
        assert group["segment_number"] == item.SegmentNumber
        topic, rest = item.TrackingID.split(": ", 1)
        assert item.SegmentLabel == f"{topic} {rest.rsplit(' ', 1)[0]}"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    # Empty frames are omitted: every stored frame holds part of a box.
    assert all(frame.any() for frame in seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns))


def test_outputs_pass_dciodvfy_and_dsrdump(exported):
    _, _, out = exported
    assert dciodvfy_errors(out / "sr.dcm") == []
    assert dciodvfy_errors(out / "seg.dcm") == []
    assert dsrdump_errors(out / "sr.dcm") == []


def test_sr_header_flags_and_equipment(exported):
    _, volume, out = exported
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == volume.study_instance_uid
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    [equipment] = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "Readout"]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.ManufacturerModelName == "phantom-truth" and equipment.SoftwareVersions == "1"
    assert equipment.DeviceUID.startswith("2.25.")


def test_same_read_gives_same_uids_and_another_rule_new_ones(make_phantom_study, tmp_path):
    study = make_phantom_study(11, ALL_TYPES_A)
    args = ["export", "--findings", str(study / "truth.json"), str(study / "dicom")]
    for name, rule in (("a", "manual"), ("b", "manual"), ("c", "chest-ct")):
        assert main([*args, "--out", str(tmp_path / name), "--rule", rule]) == 0
    uid = {n: pydicom.dcmread(tmp_path / n / "sr.dcm").SOPInstanceUID for n in "abc"}
    seg_uid = {n: pydicom.dcmread(tmp_path / n / "seg.dcm").SOPInstanceUID for n in "abc"}
    assert uid["a"] == uid["b"] and seg_uid["a"] == seg_uid["b"]
    assert uid["a"] != uid["c"] and seg_uid["a"] != seg_uid["c"]


def test_normal_study_writes_sr_only(make_phantom_study, tmp_path, capsys):
    study = make_phantom_study(5, normal=True)
    assert main(["export", "--findings", str(study / "truth.json"), str(study / "dicom"), "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "seg.dcm").exists()
    groups = read_groups(tmp_path / "sr.dcm")
    for topic in ("lungs", "pleura", "heart", "liver", "bones"):
        assert groups[f"{topic}: normal"]["type_code"] == "17621005"
    assert "SEG: none" in capsys.readouterr().out
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def _one_box_result(volume, box) -> StudyResult:
    return StudyResult.from_dict({
        "series_instance_uid": volume.series_instance_uid,
        "engine": {"name": "test", "version": "1"},
        "topics": [{"topic": "liver", "normal": False, "findings": [
            {"type": "hypodense lesion", "text": "Läsion ≥ 5 mm in the right hepatic lobe.", "location": "right hepatic lobe",
             "confidence": 0.5, "box": {"voxel": box}}]},
            {"topic": "spleen-ish", "normal": False, "findings": [{"type": "odd thing", "text": "Free vocabulary."}]}],
    })


def test_real_ct_with_empty_character_set(real_data, tmp_path):
    paths = sorted((real_data / "dcmqi-ct-3slice").glob("*.dcm"))
    assert pydicom.dcmread(paths[0]).SpecificCharacterSet == ""  # the quirk under test
    volume = load_series(paths)
    result = _one_box_result(volume, [0, 100, 120, 3, 180, 200])
    seg = write_segmentation(result, volume)
    sr = write_report(result, volume, seg)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    for path in (tmp_path / "sr.dcm", tmp_path / "seg.dcm"):
        assert dciodvfy_errors(path) == []
    assert dsrdump_errors(tmp_path / "sr.dcm") == []
    groups = read_groups(tmp_path / "sr.dcm")
    assert groups["liver: hypodense lesion 1"]["type_code"] == "52988006"  # no SCT concept: Lesion
    assert "site_code" not in groups["spleen-ish: odd thing 1"]  # unknown topic: no finding site
    assert groups["liver: hypodense lesion 1"]["text"].startswith("Läsion ≥")


def test_utf8_patient_name_survives(make_phantom_study, tmp_path):
    study = make_phantom_study(11, ALL_TYPES_A)
    work = tmp_path / "dicom"
    shutil.copytree(study / "dicom", work)
    for path in work.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
        ds.save_as(path)
    volume, _ = load_study_volume(work)
    result = StudyResult.load(study / "truth.json")
    seg = write_segmentation(result, volume)
    sr = write_report(result, volume, seg)
    sr.save_as(tmp_path / "sr.dcm")
    seg.save_as(tmp_path / "seg.dcm")
    for path in (tmp_path / "sr.dcm", tmp_path / "seg.dcm"):
        back = pydicom.dcmread(path)
        assert str(back.PatientName) == "Müller^Jürgen"
        assert dciodvfy_errors(path) == []


def test_multiframe_source(make_phantom_study, tmp_path):
    study = make_phantom_study(11, ALL_TYPES_A)
    frames = [pydicom.dcmread(p) for p in sorted((study / "dicom").glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        frames, series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    volume = load_series([tmp_path / "enhanced.dcm"])
    assert set(volume.frame_numbers) == set(range(1, len(frames) + 1))
    result = StudyResult.load(study / "truth.json")
    result.series_instance_uid = volume.series_instance_uid
    seg = write_segmentation(result, volume)
    sr = write_report(result, volume, seg)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    back = hd.seg.segread(tmp_path / "seg.dcm")
    expected = _rasterize(result, volume.shape)
    for s, mask in enumerate(expected, start=1):
        # Readout's k order mapped to the source's frame numbers.
        pixels = back.get_pixels_by_source_frame(
            source_sop_instance_uid=volume.sop_instance_uids[0],
            source_frame_numbers=list(volume.frame_numbers),
            segment_numbers=[s],
            assert_missing_frames_are_empty=True,
        )
        assert np.array_equal(pixels[..., 0].astype(bool), mask)


def test_box_outside_volume_is_refused(make_phantom_study, tmp_path, capsys):
    study = make_phantom_study(11, ALL_TYPES_A)
    volume, _ = load_study_volume(study / "dicom")
    data = StudyResult.load(study / "truth.json").to_dict()
    k = volume.shape[0]
    data["topics"][0]["findings"][0]["box"] = {"voxel": [k - 2, 0, 0, k + 3, 5, 5]}
    bad = tmp_path / "bad.json"
    StudyResult.from_dict(data).save(bad)
    code = main(["export", "--findings", str(bad), str(study / "dicom"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "topics[0].findings[0].box" in err and "outside the volume" in err
    with pytest.raises(FindingsError):
        write_report(StudyResult.from_dict(data), volume, None)
