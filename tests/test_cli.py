"""The `readout` command: inspect, export, phantom; exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orthanc_plugin.cli import main


def test_phantom_then_inspect_json(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "study"), "--seed", "3"]) == 0
    assert (tmp_path / "study" / "truth.json").is_file()
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "study" / "dicom"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    truth = json.loads((tmp_path / "study" / "truth.json").read_text())
    assert report["selected_series"] == truth["series_instance_uid"]
    assert "thinnest axial CT series" in report["reason"]
    [series] = report["series"]
    assert series["modality"] == "CT" and series["slices"] == report["volume"]["shape"][0]
    assert report["volume"]["orientation"] == "axial"
    assert len(report["volume"]["spacing_mm"]) == 3 and len(report["volume"]["origin_mm"]) == 3


def test_inspect_error_is_json_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty"), "--json"]) == 2
    captured = capsys.readouterr()
    assert "error" in json.loads(captured.out)
    assert captured.err.startswith("readout: ") and captured.err.count("\n") == 1


def test_export_prints_report_and_paths(make_phantom_study, tmp_path, capsys):
    study = make_phantom_study(21, {"lungs": ["nodule"], "heart": [], "pleura": [], "liver": [], "bones": []})
    assert main(["export", "--findings", str(study / "truth.json"), str(study / "dicom"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("LUNGS") < out.index("solid nodule") < out.index("HEART") < out.index("SR:")
    assert f"SR:  {tmp_path / 'sr.dcm'}" in out and f"SEG: {tmp_path / 'seg.dcm'} (1 segments)" in out


def test_export_series_not_in_folder(make_phantom_study, tmp_path, capsys):
    study = make_phantom_study(21, {"lungs": ["nodule"], "heart": [], "pleura": [], "liver": [], "bones": []})
    other = make_phantom_study(22, normal=True)
    code = main(["export", "--findings", str(study / "truth.json"), str(other / "dicom"), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert json.loads((study / "truth.json").read_text())["series_instance_uid"] in err


def test_bad_findings_file_exit_2_without_traceback(make_phantom_study, tmp_path):
    study = make_phantom_study(22, normal=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"series_instance_uid": "1.2", "engine": {"name": "x"}, "topics": []}))
    proc = subprocess.run(
        [sys.executable, "-m", "orthanc_plugin.cli", "export", "--findings", str(bad), str(study / "dicom"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr == "readout: findings JSON: engine: 'version' is a required property\n"


@pytest.mark.parametrize("argv", [["inspect"], ["export", "x"], ["nope"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
