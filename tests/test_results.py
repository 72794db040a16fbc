"""The findings model: schema validation with named fields, volume checks, round trip."""

from __future__ import annotations

import json

import pytest

from engines.results import Box, FindingsError, StudyResult


def _doc(**changes) -> dict:
    doc = {
        "series_instance_uid": "1.2.3.4",
        "engine": {"name": "demo", "version": "0.1.0"},
        "topics": [
            {"topic": "lungs", "normal": False, "findings": [
                {"type": "nodule", "text": "12 mm solid nodule in the right upper lobe.", "size_mm": 12.0,
                 "location": "right upper lobe", "confidence": 0.91, "box": {"voxel": [3, 10, 20, 8, 30, 40]},
                 "agreement": 0.8, "entropy": 0.12}]},
            {"topic": "heart", "normal": True, "findings": [], "text": "Heart size is normal."},
        ],
        "answers": [{"question": "Is there a pleural effusion?", "answer": "no", "confidence": 0.97}],
        "timings": {"total_s": 1.5},
    }
    doc.update(changes)
    return doc


def test_round_trip_keeps_extra_fields(tmp_path):
    result = StudyResult.from_dict(_doc())
    path = tmp_path / "f.json"
    result.save(path)
    again = json.loads(path.read_text())
    assert again == _doc()
    assert StudyResult.load(path).topics[0].findings[0].extra == {"agreement": 0.8, "entropy": 0.12}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["topics"][0]["findings"][0]["box"].update(voxel=[1, 2, 3]), "topics[0].findings[0].box.voxel"),
        (lambda d: d["topics"][0]["findings"][0].update(confidence=1.5), "topics[0].findings[0].confidence"),
        (lambda d: d["topics"][0]["findings"][0].pop("text"), "topics[0].findings[0]: 'text' is a required property"),
        (lambda d: d["topics"][1].update(normal="yes"), "topics[1].normal"),
        (lambda d: d.pop("engine"), "top level: 'engine' is a required property"),
        (lambda d: d.update(series_instance_uid="not a uid"), "series_instance_uid"),
        (lambda d: d["topics"][0]["findings"][0]["box"].update(voxel=[8, 10, 20, 3, 30, 40]), "need 0 <= k0 < k1"),
        (lambda d: d["topics"][1]["findings"].append({"type": "x", "text": "y"}), "marked normal but has findings"),
    ],
)
def test_invalid_findings_name_the_field(mutate, message):
    doc = _doc()
    mutate(doc)
    with pytest.raises(FindingsError) as err:
        StudyResult.from_dict(doc)
    assert message in str(err.value)


def test_unknown_topic_is_allowed():
    doc = _doc()
    doc["topics"].append({"topic": "thyroid", "normal": False, "findings": [{"type": "nodule", "text": "Thyroid nodule."}]})
    assert StudyResult.from_dict(doc).topics[2].topic == "thyroid"


def test_box_must_fit_the_volume():
    result = StudyResult.from_dict(_doc())
    result.check_fits((8, 30, 40))
    with pytest.raises(FindingsError, match=r"topics\[0\]\.findings\[0\]\.box .* c1=40 exceeds the volume's 39 c positions"):
        result.check_fits((8, 30, 39))


def test_load_reports_unreadable_and_non_json(tmp_path):
    with pytest.raises(FindingsError, match="cannot read findings file"):
        StudyResult.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(FindingsError, match="is not JSON"):
        StudyResult.load(bad)


def test_text_report_is_topic_by_topic():
    text = StudyResult.from_dict(_doc()).as_text()
    lungs, heart, questions = text.index("LUNGS"), text.index("HEART"), text.index("QUESTIONS")
    assert lungs < text.index("12 mm solid nodule") < heart < text.index("Heart size is normal.") < questions
    assert "(confidence 91%, slices 3-7)" in text
    assert "Is there a pleural effusion? no (confidence 97%)" in text


def test_box_key_slice_is_the_middle():
    assert Box((3, 0, 0, 8, 1, 1)).key_slice == 5
    assert Box((4, 0, 0, 5, 1, 1)).key_slice == 4
