"""Readout's settings file and the Orthanc configuration `readout serve` writes from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orthanc_plugin.serve import write_configuration
from orthanc_plugin.settings import DEFAULT_SETTINGS, SettingsError, load_settings


def _write(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "readout.json"
    path.write_text(json.dumps(settings))
    return path


def test_shipped_settings_load_with_relative_paths_resolved() -> None:
    settings = load_settings(DEFAULT_SETTINGS)
    assert settings.rules_path == DEFAULT_SETTINGS.parent / "rules.json" and settings.rules_path.exists()
    assert settings.stable_age_s == 60 and "demo" in settings.engines
    assert settings.forward_delay_s(1) == settings.forward_backoff_s
    assert settings.forward_delay_s(3) == 4 * settings.forward_backoff_s
    assert settings.forward_delay_s(50) == settings.forward_backoff_max_s


@pytest.mark.parametrize("destination, message", [
    ({"kind": "dicom", "aet": "PACS"}, "needs aet, host and port"),
    ({"kind": "dicomweb"}, "needs url"),
    ({"kind": "ftp"}, "kind must be 'dicom' or 'dicomweb'"),
    ({"kind": "dicom", "aet": "PACS", "host": "h", "colour": "red"}, "colour"),
])
def test_bad_destinations_are_refused_by_name(tmp_path: Path, destination: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as error:
        load_settings(_write(tmp_path, {"destinations": {"pacs": destination}}))
    assert "'pacs'" in str(error.value)


def test_missing_or_broken_settings_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SettingsError, match="bad.json: not JSON"):
        load_settings(tmp_path / "bad.json")


def test_orthanc_configuration_declares_plugins_destinations_and_security(tmp_path: Path) -> None:
    path = _write(tmp_path, {
        "orthanc": {"stable_age_s": 7, "authentication": True, "users": {"admin": "pw"}},
        "destinations": {"pacs": {"kind": "dicom", "aet": "PACS", "host": "10.0.0.5", "port": 104},
                         "web": {"kind": "dicomweb", "url": "http://archive/dicom-web/", "username": "u", "password": "p"}},
    })
    config_path = write_configuration(load_settings(path), path, tmp_path / "storage", 8142, 4142)
    config = json.loads(config_path.read_text())
    assert (config["HttpPort"], config["DicomPort"], config["DicomAet"]) == (8142, 4142, "ORTHANC")
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {"admin": "pw"} and config["StableAge"] == 7
    assert config["DicomModalities"] == {"pacs": ["PACS", "10.0.0.5", 104]}
    assert config["DicomWeb"]["Servers"] == {"web": {"Url": "http://archive/dicom-web/", "Username": "u", "Password": "p"}}
    assert all(Path(p).name in ("libOrthancPython.so", "libOrthancDicomWeb.so") for p in config["Plugins"])
    entry = Path(config["PythonScript"])
    assert entry.exists() and entry.suffix == ".py" and "plugin.register()" in entry.read_text()
    assert Path(config["Readout"]["Database"]).parent == (tmp_path / "storage").resolve()
    assert json.loads(write_configuration(load_settings(path), path, tmp_path / "s2", 1, 2, stable_age_s=3)
                      .read_text())["StableAge"] == 3
