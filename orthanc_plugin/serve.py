"""`readout serve`: Orthanc with Readout and DICOMweb, configured from Readout's settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import requests

from orthanc_plugin.settings import Settings

PLUGINS = Path("/usr/share/orthanc/plugins")
ENTRY = '''"""Loaded by Orthanc's Python plugin: Readout's environment on the path, then the plugin."""
import sys

sys.path[:0] = {paths!r}
from orthanc_plugin import plugin  # noqa: E402

plugin.register()
'''


def orthanc_configuration(settings: Settings, settings_path: Path, storage: Path, http_port: int, dicom_port: int,
                          stable_age_s: int | None = None) -> dict[str, Any]:
    """Orthanc's configuration: loopback HTTP, AE title ORTHANC, the plugins, the destinations."""
    destinations = settings.destinations.values()
    return {
        "Name": "Readout",
        "StorageDirectory": str(storage / "orthanc-db"),
        "IndexDirectory": str(storage / "orthanc-db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": settings.authentication,
        "RegisteredUsers": settings.users,
        "StableAge": settings.stable_age_s if stable_age_s is None else stable_age_s,
        "DicomModalities": {d.name: d.orthanc_entry() for d in destinations if d.kind == "dicom"},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                     "Servers": {d.name: d.orthanc_entry() for d in destinations if d.kind == "dicomweb"}},
        "Plugins": [str(PLUGINS / "libOrthancPython.so"), str(PLUGINS / "libOrthancDicomWeb.so")],
        "PythonScript": str(storage / "readout_entry.py"),
        "PythonVerbose": False,
        "Readout": {"Settings": str(settings_path.resolve()), "Database": str(storage / "readout.db"),
                    "Python": sys.executable},
    }


def write_configuration(settings: Settings, settings_path: Path, storage: Path, http_port: int, dicom_port: int,
                        stable_age_s: int | None = None) -> Path:
    """Write ``storage/orthanc.json`` and the tiny script Orthanc's Python plugin loads."""
    storage = storage.resolve()
    storage.mkdir(parents=True, exist_ok=True)
    paths = [sysconfig.get_paths()["purelib"], str(Path(__file__).resolve().parents[1])]
    (storage / "readout_entry.py").write_text(ENTRY.format(paths=paths))
    config = orthanc_configuration(settings, settings_path, storage, http_port, dicom_port, stable_age_s)
    path = storage / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _environment() -> dict[str, str]:
    # DCMTK (Orthanc's DICOM stack) leaves Nagle's algorithm on unless TCP_NODELAY is set: each
    # small instance then waits ~40 ms for an acknowledgement (DCMTK FAQ #48).
    return {**os.environ, "TCP_NODELAY": os.environ.get("TCP_NODELAY", "1")}


def exec_orthanc(config: Path, verbose: bool = False) -> None:
    """Replace this process with Orthanc (foreground; Ctrl-C stops it)."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    os.execve(binary, [binary, *(["--verbose"] if verbose else []), str(config)], _environment())


def start_orthanc(config: Path, log: Path) -> subprocess.Popen:
    """Start Orthanc in the background with its log in ``log`` (for tests and benchmarks)."""
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    with log.open("ab") as out:
        return subprocess.Popen([binary, str(config)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_environment())


def wait_until_up(url: str, timeout_s: float = 30.0, auth: tuple[str, str] | None = None) -> None:
    """Wait until Orthanc answers on ``url`` (its /system route); TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/system", auth=auth, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Orthanc at {url} did not come up within {timeout_s:.0f} s")
