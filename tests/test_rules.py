"""orthanc_plugin.rules: load and validate routing rules, match studies, choose series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from engines.phantom import TOPICS, phantom_datasets, render_phantom
from orthanc_plugin.rules import (
    RulesError,
    RuleSet,
    SeriesInfo,
    StudyInfo,
    load_rules,
    rules_schema,
    select_series,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "rules.json"

AXIAL = "1\\0\\0\\0\\1\\0"
CORONAL = "1\\0\\0\\0\\0\\-1"
SAGITTAL = "0\\1\\0\\0\\0\\-1"


def series(
    orthanc_id: str,
    number: int,
    description: str,
    *,
    thickness: float | None = 1.0,
    instances: int = 100,
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    orientation: str | None = AXIAL,
    **tags: Any,
) -> SeriesInfo:
    base = {"Modality": "CT", "SeriesNumber": str(number), "SeriesDescription": description, "ImageType": image_type}
    if thickness is not None:
        base["SliceThickness"] = f"{thickness:.3f}"
    if orientation is not None:
        base["ImageOrientationPatient"] = orientation
    return SeriesInfo(orthanc_id, base | tags, instances)


def study(*members: SeriesInfo, **tags: Any) -> StudyInfo:
    base = {"ModalitiesInStudy": "CT", "StudyDescription": "CT CHEST", "PatientName": "Doe^Jane"}
    return StudyInfo("study-1", base | tags, members)


def chest_study() -> StudyInfo:
    """A localizer, a thick (5 mm) and a thin (1 mm) axial series."""
    return study(
        series("scout", 1, "Scout", thickness=None, instances=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
               orientation=CORONAL),
        series("thick", 2, "Chest 5 mm", thickness=5.0, instances=60),
        series("thin", 3, "Chest 1 mm", thickness=1.0, instances=300),
    )


def one_rule(**fields: Any) -> RuleSet:
    return load_rules({"rules": [{"name": "r", "engine": "demo"} | fields]})


def holds(cond: dict[str, Any], **tags: Any) -> bool:
    return one_rule(when=cond).rules[0].matches(StudyInfo("s", tags))[0]


def problems(source: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load_rules(source, **kwargs)
    return str(caught.value).splitlines()


# --- The example file --------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(rules_schema())
    assert rules_schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_example_rules_load():
    rules = load_rules(EXAMPLE, known_engines={"demo"}, known_destinations=set())
    assert [r.name for r in rules.rules] == ["chest-ct"]
    rule = rules.get("chest-ct")
    assert rule.engine == "demo"
    assert rule.topics == ("lungs", "pleura", "heart", "liver", "bones")
    assert rule.questions == ("Is there a pleural effusion?", "How many lung nodules are there?")
    assert rule.destinations == ()
    assert (rule.priority, rule.continue_) == (5, False)
    assert rule.series == {
        "modality": "CT", "orientation": "axial", "image_type_excludes": ["LOCALIZER"], "min_slices": 20,
        "slice_thickness_mm": {"min": 0.5, "max": 5}, "pick": "thinnest",
    }
    assert rule.description


def _simplified(ds: Dataset) -> dict[str, str]:
    """Tags the way Orthanc's simplified JSON gives them: strings, several values joined by backslashes."""
    return {
        e.keyword: "\\".join(map(str, e.value)) if isinstance(e.value, MultiValue) else str(e.value)
        for e in ds
        if e.keyword and e.VR not in ("SQ", "OB", "OW", "UN")
    }


def test_phantom_study_goes_to_demo_on_its_axial_series():
    datasets = phantom_datasets(render_phantom(1))
    by_series: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    members = tuple(SeriesInfo(uid, _simplified(group[0]), len(group)) for uid, group in by_series.items())
    first = _simplified(datasets[0])
    phantom = StudyInfo("phantom", first | {"ModalitiesInStudy": "CT"}, members)

    rules = load_rules(EXAMPLE)
    assert [r.name for r in rules.match(phantom)] == ["chest-ct"]
    choice = select_series(rules.get("chest-ct"), phantom)
    assert choice.series is not None and choice.series.orthanc_id == datasets[0].SeriesInstanceUID


def test_ct_chest_matches_and_mr_or_head_ct_gets_no_rule():
    rules = load_rules(EXAMPLE)
    assert [r.name for r in rules.match(study())] == ["chest-ct"]
    assert [r.name for r in rules.match(study(StudyDescription="", BodyPartExamined="Thorax"))] == ["chest-ct"]
    assert rules.match(study(ModalitiesInStudy="MR", StudyDescription="MR chest")) == []
    assert rules.match(study(StudyDescription="CT HEAD", BodyPartExamined="HEAD")) == []

    held, reasons = rules.get("chest-ct").matches(study(ModalitiesInStudy="MR", StudyDescription="MR chest"))
    assert not held
    assert reasons == ["ModalitiesInStudy 'MR' not in ['CT']"]


# --- Conditions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "tags", "expected"),
    [
        ({"tag": "BodyPartExamined", "equals": "chest"}, {"BodyPartExamined": " CHEST "}, True),
        ({"tag": "BodyPartExamined", "equals": "chest"}, {"BodyPartExamined": "CHESTABDOMEN"}, False),
        ({"tag": "SeriesNumber", "equals": 3}, {"SeriesNumber": "3.0"}, True),
        ({"tag": "SeriesNumber", "equals": 3}, {"SeriesNumber": "4"}, False),
        ({"tag": "StudyDescription", "matches": "(?i)thorax"}, {"StudyDescription": "CT Thorax w/o"}, True),
        ({"tag": "StudyDescription", "matches": "thorax"}, {"StudyDescription": "CT Thorax"}, False),
        ({"tag": "StudyDescription", "matches": "^chest"}, {"StudyDescription": "CT chest"}, False),
        ({"tag": "Modality", "in": ["CT", "MR"]}, {"Modality": "mr"}, True),
        ({"tag": "Modality", "in": ["CT", "MR"]}, {"Modality": "PT"}, False),
        ({"tag": "SliceThickness", "gt": 2.5}, {"SliceThickness": "2.5"}, False),
        ({"tag": "SliceThickness", "ge": 2.5}, {"SliceThickness": "2.5"}, True),
        ({"tag": "SliceThickness", "lt": 3}, {"SliceThickness": "2.5"}, True),
        ({"tag": "SliceThickness", "le": 2}, {"SliceThickness": "2.5"}, False),
        ({"tag": "SliceThickness", "between": [1, 5]}, {"SliceThickness": "5"}, True),
        ({"tag": "SliceThickness", "between": [1, 5]}, {"SliceThickness": "1"}, True),
        ({"tag": "SliceThickness", "between": [1, 5]}, {"SliceThickness": "5.01"}, False),
        ({"tag": "StudyDescription", "gt": 1}, {"StudyDescription": "CT"}, False),  # not a number
        # Multi-valued: a condition holds if any value does.
        ({"tag": "ModalitiesInStudy", "in": ["SR"]}, {"ModalitiesInStudy": "CT\\SR"}, True),
        ({"tag": "ModalitiesInStudy", "equals": "sr"}, {"ModalitiesInStudy": ["CT", "SR"]}, True),
        ({"tag": "ModalitiesInStudy", "equals": "CT\\SR"}, {"ModalitiesInStudy": "CT\\SR"}, False),
        ({"tag": "ImageType", "equals": "axial"}, {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}, True),
        ({"tag": "ImageType", "equals": "AXIAL"}, {"ImageType": "ORIGINAL\\PRIMARY"}, False),
        ({"tag": "PixelSpacing", "lt": 1}, {"PixelSpacing": "1.5\\0.7"}, True),
        ({"tag": "PixelSpacing", "lt": 1}, {"PixelSpacing": [1.5, 1.2]}, False),
        # Missing tags never hold, whatever the test; `not` of them does.
        ({"tag": "BodyPartExamined", "equals": "CHEST"}, {}, False),
        ({"tag": "BodyPartExamined", "matches": ".*"}, {}, False),
        ({"tag": "BodyPartExamined", "matches": ".*"}, {"BodyPartExamined": ""}, False),
        ({"tag": "BodyPartExamined", "matches": ".*"}, {"BodyPartExamined": None}, False),
        ({"not": {"tag": "BodyPartExamined", "equals": "CHEST"}}, {}, True),
        ({"not": {"tag": "Modality", "equals": "CT"}}, {"Modality": "CT"}, False),
        ({"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "SliceThickness", "lt": 2}]},
         {"Modality": "CT", "SliceThickness": "1"}, True),
        ({"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "SliceThickness", "lt": 2}]},
         {"Modality": "CT", "SliceThickness": "3"}, False),
        ({"any": [{"tag": "Modality", "equals": "MR"}, {"tag": "SliceThickness", "lt": 2}]},
         {"Modality": "CT", "SliceThickness": "1"}, True),
        ({"any": [{"tag": "Modality", "equals": "MR"}, {"tag": "SliceThickness", "lt": 2}]},
         {"Modality": "CT", "SliceThickness": "3"}, False),
        ({"all": [{"any": [{"tag": "Modality", "equals": "MR"}, {"not": {"tag": "Modality", "equals": "PT"}}]},
                  {"not": {"all": [{"tag": "Modality", "equals": "CT"}, {"tag": "Rows", "lt": 100}]}}]},
         {"Modality": "CT", "Rows": "512"}, True),
    ],
)
def test_condition(cond, tags, expected):
    assert holds(cond, **tags) is expected


def test_reasons_name_the_tests_that_decided():
    cond = {"all": [{"tag": "ModalitiesInStudy", "in": ["CT"]},
                    {"any": [{"tag": "StudyDescription", "matches": "(?i)chest"},
                             {"tag": "BodyPartExamined", "equals": "CHEST"}]},
                    {"not": {"tag": "StudyDescription", "matches": "(?i)phantom-qa"}}]}
    rule = one_rule(when=cond).rules[0]

    held, reasons = rule.matches(StudyInfo("s", {"ModalitiesInStudy": "CT\\SR", "StudyDescription": "CT CHEST"}))
    assert held
    assert reasons == [  # a held `any` names only what held; the missing BodyPartExamined is left out
        "ModalitiesInStudy 'CT\\SR' in ['CT']",
        "StudyDescription 'CT CHEST' matches '(?i)chest'",
        "StudyDescription 'CT CHEST' does not match '(?i)phantom-qa'",
    ]

    held, reasons = rule.matches(StudyInfo("s", {"ModalitiesInStudy": "CT", "StudyDescription": "Head"}))
    assert not held
    assert reasons == [  # a failed `all` names only what failed
        "StudyDescription 'Head' does not match '(?i)chest'",
        "BodyPartExamined is missing",
    ]

    numeric = one_rule(when={"tag": "SliceThickness", "between": [0.5, 5]}).rules[0]
    assert numeric.matches(StudyInfo("s", {"SliceThickness": "7"})) == (
        False, ["SliceThickness '7' is not between 0.5 and 5"])
    assert numeric.matches(StudyInfo("s", {"SliceThickness": "n/a"})) == (False, ["SliceThickness 'n/a' is not a number"])
    assert one_rule().rules[0].matches(StudyInfo("s", {}))[0] is True  # no `when`: every study


# --- Series selection --------------------------------------------------------------------------


def test_thinnest_series_is_chosen_with_reasons_for_the_others():
    rule = load_rules(EXAMPLE).get("chest-ct")
    choice = select_series(rule, chest_study())

    assert choice.series is not None and choice.series.orthanc_id == "thin"
    assert list(choice.reasons) == ["scout", "thick", "thin"]
    assert choice.reasons["thin"] == "chosen: thinnest of 2 candidates (1 mm, 300 instances)"
    assert choice.reasons["thick"] == "passed over: 5 mm, 60 instances (chosen: 1 mm, 300 instances)"
    assert choice.reasons["scout"].startswith("refused: ImageType includes LOCALIZER")
    assert "1 instance, fewer than 20" in choice.reasons["scout"]
    assert "orientation coronal, not axial" in choice.reasons["scout"]
    assert choice.summary() == "rule chest-ct reads series 3 (Chest 1 mm): thinnest of 2 candidates (1 mm, 300 instances)"


def test_largest_picks_most_instances_and_thinnest_breaks_ties_by_instances():
    largest = one_rule(series={"pick": "largest", "image_type_excludes": ["localizer"]}).rules[0]
    choice = select_series(largest, study(series("a", 1, "A", thickness=1, instances=80),
                                          series("b", 2, "B", thickness=3, instances=120)))
    assert choice.series.orthanc_id == "b"
    assert choice.reasons["b"] == "chosen: largest of 2 candidates (3 mm, 120 instances)"

    tie = study(series("a", 1, "A", thickness=2, instances=80), series("b", 2, "B", thickness=2, instances=90))
    assert select_series(one_rule().rules[0], tie).series.orthanc_id == "b"


@pytest.mark.parametrize(
    ("iop", "orientation"),
    [
        (AXIAL, "axial"),
        (CORONAL, "coronal"),
        (SAGITTAL, "sagittal"),
        ("0.9848\\0.1736\\0\\-0.1736\\0.9848\\0", "axial"),  # rotated in plane
        ("1\\0\\0\\0\\0.8\\-0.6", "axial"),  # tilted 37 degrees: still closest to axial
        ([0.0, 1.0, 0.0, 0.0, 0.0, -1.0], "sagittal"),
    ],
)
def test_orientation_comes_from_the_slice_normal(iop, orientation):
    for wanted in ("axial", "coronal", "sagittal"):
        rule = one_rule(series={"orientation": wanted}).rules[0]
        choice = select_series(rule, study(series("s", 1, "S", orientation=iop)))
        assert (choice.series is not None) is (wanted == orientation)
        if wanted != orientation:
            assert choice.reasons["s"] == f"refused: orientation {orientation}, not {wanted}"


def test_series_tests_refuse_with_reasons():
    rule = one_rule(series={
        "modality": ["CT", "PT"], "orientation": "axial", "image_type_includes": ["primary", "axial"],
        "description": "(?i)lung|chest", "body_part": "(?i)chest", "slice_thickness_mm": {"min": 0.5, "max": 3},
        "min_slices": 20,
    }).rules[0]
    candidates = study(
        series("mr", 1, "Chest", Modality="MR", BodyPartExamined="CHEST"),
        series("no-iop", 2, "Chest", orientation=None, BodyPartExamined="CHEST"),
        series("derived", 3, "Chest", image_type="DERIVED\\SECONDARY", BodyPartExamined="CHEST"),
        series("abdomen", 4, "Abdomen", BodyPartExamined="ABDOMEN"),
        series("no-part", 5, "Chest"),
        series("thick", 6, "Chest", thickness=4, BodyPartExamined="CHEST"),
        series("thin", 6, "Chest", thickness=0.4, BodyPartExamined="CHEST"),
        series("unknown", 7, "Chest", thickness=None, BodyPartExamined="CHEST"),
        series("short", 8, "Chest", instances=1, BodyPartExamined="CHEST"),
        series("spacing", 9, "Lung", thickness=None, SpacingBetweenSlices="2", BodyPartExamined="CHEST"),
    )
    choice = select_series(rule, candidates)
    assert choice.series.orthanc_id == "spacing"  # SpacingBetweenSlices stands in for SliceThickness
    assert choice.reasons == {
        "mr": "refused: Modality MR, not CT or PT",
        "no-iop": "refused: orientation unknown, not axial",
        "derived": "refused: ImageType lacks PRIMARY, AXIAL",
        "abdomen": "refused: SeriesDescription 'Abdomen' does not match '(?i)lung|chest' "
                   "and BodyPartExamined 'ABDOMEN' does not match '(?i)chest'",
        "no-part": "refused: BodyPartExamined is missing",
        "thick": "refused: slices 4 mm thick, thicker than 3 mm",
        "thin": "refused: slices 0.4 mm thick, thinner than 0.5 mm",
        "unknown": "refused: slice thickness unknown (no SliceThickness or SpacingBetweenSlices)",
        "short": "refused: 1 instance, fewer than 20",
        "spacing": "chosen: the only candidate (2 mm, 100 instances)",
    }


def test_no_series_fits_names_series_without_patient_data():
    rule = load_rules(EXAMPLE).get("chest-ct")
    scout_only = study(chest_study().series[0], series("thin", 3, "Chest 1 mm", thickness=1.0, instances=10))
    choice = select_series(rule, scout_only)
    assert choice.series is None
    summary = choice.summary()
    assert summary.startswith("no series fits rule chest-ct: series 1 (Scout): ImageType includes LOCALIZER")
    assert summary.endswith("; series 3 (Chest 1 mm): 10 instances, fewer than 20")
    assert "Doe" not in summary and "study-1" not in summary
    assert select_series(rule, study()).summary() == "no series fits rule chest-ct: the study has no series"


# --- Rule order and the dry run ----------------------------------------------------------------


def _two_rules(first_continues: bool) -> RuleSet:
    return load_rules({"rules": [
        {"name": "ct", "engine": "demo", "when": {"tag": "ModalitiesInStudy", "in": ["CT"]},
         "continue": first_continues, "priority": 1},
        {"name": "chest", "engine": "demo", "when": {"tag": "StudyDescription", "matches": "(?i)chest"},
         "priority": 9},
    ]})


def test_first_match_wins_unless_it_continues():
    assert [r.name for r in _two_rules(False).match(study())] == ["ct"]
    assert [r.name for r in _two_rules(True).match(study())] == ["ct", "chest"]
    assert [r.name for r in _two_rules(False).match(study(ModalitiesInStudy="MR"))] == ["chest"]
    assert _two_rules(False).match(study(ModalitiesInStudy="MR", StudyDescription="Head")) == []


def test_explain_is_a_json_dry_run():
    rules = _two_rules(False)
    report = rules.explain(chest_study())
    assert json.loads(json.dumps(report)) == report
    assert report == {
        "matched": ["ct"],
        "rules": [
            {"rule": "ct", "matched": True, "reasons": ["ModalitiesInStudy 'CT' in ['CT']"],
             "series": {"chosen": "thin", "reasons": {
                 # No series tests: even the localizer is a candidate; a known thickness beats an unknown one.
                 "scout": "passed over: thickness unknown, 1 instance (chosen: 1 mm, 300 instances)",
                 "thick": "passed over: 5 mm, 60 instances (chosen: 1 mm, 300 instances)",
                 "thin": "chosen: thinnest of 3 candidates (1 mm, 300 instances)"}}},
            {"rule": "chest", "matched": False,
             "reasons": ["not tried: rule ct matched first and does not continue"]},
        ],
    }

    mr = rules.explain(study(ModalitiesInStudy="MR", StudyDescription="MR brain"))
    assert mr["matched"] == []
    assert [(r["rule"], r["matched"], "series" in r) for r in mr["rules"]] == [("ct", False, False),
                                                                                 ("chest", False, False)]
    assert mr["rules"][1]["reasons"] == ["StudyDescription 'MR brain' does not match '(?i)chest'"]


# --- Round trip and lookup ---------------------------------------------------------------------


def test_to_json_fills_defaults_and_round_trips():
    rules = load_rules('{"rules": [{"name": "bare", "engine": "demo"}]}')
    assert rules.to_json() == {"rules": [{
        "name": "bare", "description": "", "series": {"pick": "thinnest"}, "engine": "demo",
        "topics": list(TOPICS), "questions": [], "destinations": [], "priority": 0, "continue": False,
    }]}
    example = load_rules(EXAMPLE)
    assert load_rules(example.to_json()) == example
    assert load_rules(json.dumps(example.to_json())).to_json() == example.to_json()
    assert len({example.get("chest-ct")}) == 1  # rules are hashable, e.g. for sets of matched rules


def test_loaded_rules_do_not_share_the_callers_data():
    source = {"rules": [{"name": "r", "engine": "demo", "series": {"min_slices": 20}}]}
    rules = load_rules(source)
    source["rules"][0]["series"]["min_slices"] = 1
    assert rules.get("r").series["min_slices"] == 20
    rules.to_json()["rules"][0]["series"]["min_slices"] = 2
    assert rules.get("r").series["min_slices"] == 20


def test_get_unknown_rule_raises_key_error():
    with pytest.raises(KeyError, match="no rule named 'nope'"):
        load_rules(EXAMPLE).get("nope")


# --- Invalid rules -----------------------------------------------------------------------------


def test_bad_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text('{"rules": [\n  {"name": "a",\n   "engine": }\n]}\n')
    assert problems(path) == [f"{path}: line 3 column 14: not valid JSON: Expecting value"]
    assert problems('{"rules": [') == ["rules JSON: line 1 column 12: not valid JSON: Expecting value"]
    assert "pass a pathlib.Path" in problems("config/rules.json")[0]
    missing = tmp_path / "absent.json"
    assert problems(missing) == [f"{missing}: cannot read the rules file: No such file or directory"]


def _rule(**fields: Any) -> dict[str, Any]:
    return {"name": "chest", "engine": "demo"} | fields


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "$: must be object, not array"),
        ({"rules": {}}, "$.rules: must be array, not object"),
        ({"rules": [_rule(priority="high")]}, "$.rules[0].priority: must be integer, not string"),
        ({"rules": [_rule(engine=None)]}, "$.rules[0].engine: must be string, not null"),
        ({"rules": [{"name": "chest"}]}, "$.rules[0]: 'engine' is a required property"),
        ({"rules": [_rule(topic=["lungs"])]},
         "$.rules[0]: Additional properties are not allowed ('topic' was unexpected)"),
        ({"rules": [_rule(when={"tag": "Modality", "contains": "CT"})]},
         "$.rules[0].when: Additional properties are not allowed ('contains' was unexpected)"),
        ({"rules": [_rule(when={"tag": "Modality"})]},
         "$.rules[0].when: a tag condition takes exactly one operator: equals, matches, in, gt, ge, lt, le or between"),
        ({"rules": [_rule(when={"any": [{"tag": "Modality", "equals": "CT", "in": ["CT"]}]})]},
         ("$.rules[0].when.any[0]: a tag condition takes exactly one operator: equals, matches, in, gt, ge, lt, le "
          "or between")),
        ({"rules": [_rule(when={"all": []})]}, "$.rules[0].when.all: [] should be non-empty"),
        ({"rules": [_rule(when={"tag": "Rows", "between": [1]})]}, "$.rules[0].when.between: [1] is too short"),
        ({"rules": [_rule(series={"orientation": "sideways"})]},
         "$.rules[0].series.orientation: 'sideways' is not one of ['axial', 'coronal', 'sagittal']"),
        ({"rules": [_rule(series={"pick": "newest"})]},
         "$.rules[0].series.pick: 'newest' is not one of ['thinnest', 'largest']"),
    ],
)
def test_schema_problems_name_their_json_path(data, expected):
    assert problems(data) == [expected]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rules": [_rule(when={"not": {"tag": "StudyDescription", "matches": "(?i)chest("}})]},
         "$.rules[0].when.not.matches: '(?i)chest(' is not a valid regular expression: missing ), "),
        ({"rules": [_rule(series={"description": "*lung"})]},
         "$.rules[0].series.description: '*lung' is not a valid regular expression: nothing to repeat"),
        ({"rules": [_rule(name="a"), _rule(series={"slice_thickness_mm": {"min": 5, "max": 1}})]},
         "$.rules[1].series.slice_thickness_mm: min 5 is above max 1"),
        ({"rules": [_rule(when={"tag": "Rows", "between": [512, 256]})]},
         "$.rules[0].when.between: low 512 is above high 256"),
        ({"rules": [_rule(when={"any": [{"tag": "Modality", "equals": "CT"}, {"tag": "BodyPart", "equals": "CHEST"}]})]},
         "$.rules[0].when.any[1].tag: 'BodyPart' is not a DICOM keyword; did you mean 'BodyPartExamined'?"),
        ({"rules": [_rule(topics=["lungs", "lung"])]},
         "$.rules[0].topics[1]: unknown topic 'lung'; topics are lungs, pleura, heart, liver, bones"),
        ({"rules": [_rule(), _rule(engine="other")]}, "$.rules[1].name: 'chest' is already the name of $.rules[0]"),
        ({"rules": [_rule(), _rule(name="Chest")]}, "$.rules[1].name: 'Chest' is already the name of $.rules[0]"),
    ],
)
def test_semantic_problems_name_their_json_path(data, expected):
    (line,) = problems(data)
    assert line.startswith(expected)  # a regex problem ends in Python's own words, which vary by version


def test_known_engines_and_destinations():
    data = {"rules": [_rule(engine="ct-fm", destinations=["pacs", "archive"])]}
    assert problems(data, known_engines=["demo"], known_destinations=["pacs"]) == [
        "$.rules[0].engine: unknown engine 'ct-fm'; engines are demo",
        "$.rules[0].destinations[1]: unknown destination 'archive'; destinations are pacs",
    ]
    assert load_rules(data).get("chest").destinations == ("pacs", "archive")  # unchecked without a list
    assert problems({"rules": [_rule(destinations=["pacs", "pacs"])]}) == [
        "$.rules[0].destinations: ['pacs', 'pacs'] has non-unique elements"]


def test_every_problem_is_reported_at_once():
    data = {"rules": [
        _rule(topics=["lung"], series={"slice_thickness_mm": {"min": 5, "max": 1}}),
        _rule(when={"tag": "StudyDescripton", "matches": "["}),
    ]}
    lines = problems(data)
    assert [line.split(":")[0] for line in lines] == [
        "$.rules[0].series.slice_thickness_mm",
        "$.rules[0].topics[0]",
        "$.rules[1].name",
        "$.rules[1].when.tag",
        "$.rules[1].when.matches",
    ]
