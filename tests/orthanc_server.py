"""The real Orthanc with Readout, started by the integration tests, plus small study builders."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydicom.dataset import Dataset

from engines.phantom import ct_series_datasets, render_phantom, write_datasets
from orthanc_plugin.serve import start_orthanc, wait_until_up, write_configuration
from orthanc_plugin.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
STORESCU = "/usr/bin/storescu"  # dcmtk's; pynetdicom puts its own script of that name in the venv

# Fast settings for tests: short stability, leases and backoffs; the centre-box engine.
TEST_SETTINGS: dict[str, Any] = {
    "rules": "rules.json",
    "database": "readout.db",
    "orthanc": {"stable_age_s": 2},
    "runner": {"lease_s": 6, "heartbeat_s": 1, "poll_s": 0.3, "read_attempts": 3, "read_backoff_s": 1},
    "forwarding": {"attempts": 30, "backoff_s": 0.5, "backoff_max_s": 2, "timeout_s": 5},
    "engines": {"demo": {"factory": "tests.orthanc_engines:create"}},
    "destinations": {},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ReadoutServer:
    """Orthanc + Readout in a folder of its own; start, stop, kill -9, talk to it."""

    folder: Path
    settings: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(TEST_SETTINGS)))
    rules: dict[str, Any] | None = None
    auth: tuple[str, str] | None = None
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def start(self) -> ReadoutServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_path = self.folder / "readout.json"
        settings_path.write_text(json.dumps(self.settings))
        rules_path = self.folder / "rules.json"
        if not rules_path.exists():
            rules_path.write_text(json.dumps(self.rules) if self.rules else (REPO / "config" / "rules.json").read_text())
        config = write_configuration(load_settings(settings_path), settings_path, self.folder / "storage",
                                     self.http_port, self.dicom_port)
        os.environ["PYTHONPATH"] = str(REPO)  # the runner imports the tests' engine
        self.process = start_orthanc(config, self.log)
        wait_until_up(self.url, auth=self.auth)
        self.wait(lambda: self.get("/readout/health")["runner"]["ok"], "the runner to start", 60)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """kill -9 Orthanc (its runner notices and stops by itself)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def runner_pid(self) -> int | None:
        """The pid of the runner Orthanc supervises, or None between two runners."""
        assert self.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "orthanc_plugin.cli runner"],
                             capture_output=True, text=True, check=False).stdout.split()
        assert len(out) <= 1, f"expected one runner under Orthanc, found {out}"
        return int(out[0]) if out else None

    # --- HTTP -------------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, auth=self.auth, timeout=60, **kwargs)

    def get(self, path: str) -> Any:
        response = self.request("GET", path)
        response.raise_for_status()
        return response.json()

    def jobs(self, study: str | None = None) -> list[dict]:
        return self.get("/readout/jobs" + (f"?study={study}" if study else ""))

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = condition()
            except (requests.RequestException, KeyError, IndexError):
                value = None
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; log tail:\n"
                             + self.log.read_text(errors="replace")[-3000:])

    def wait_jobs(self, study_uid: str, count: int = 1, states: tuple[str, ...] = ("done",),
                  timeout_s: float = 90) -> list[dict]:
        """Wait until ``study_uid`` has ``count`` jobs, all in ``states``; returns them (oldest first)."""
        def ready() -> list[dict] | None:
            jobs = self.jobs(study_uid)
            return jobs[::-1] if len(jobs) == count and all(j["state"] in states for j in jobs) else None

        return self.wait(ready, f"{count} job(s) of the study in {states}", timeout_s)

    # --- DICOM ------------------------------------------------------------------------------------

    def send(self, folder: Path) -> None:
        """Send every file in ``folder`` as a modality would: dcmtk's storescu."""
        result = subprocess.run([STORESCU, "-aec", "ORTHANC", "+sd", "-R", "127.0.0.1", str(self.dicom_port), str(folder)],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]

    def study_id(self, study_uid: str) -> str:
        found = self.request("POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).json()
        assert len(found) == 1, f"study not in Orthanc: {found}"
        return found[0]

    def series_by_modality(self, study_uid: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for series in self.get(f"/studies/{self.study_id(study_uid)}/series"):
            out.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
        return out


def small_study(folder: Path, seed: int, *, description: str = "CT chest upper abdomen",
                edit: Callable[[Dataset], None] | None = None) -> tuple[str, list[Dataset]]:
    """A phantom CT at a quarter of the resolution (fast to send), written to ``folder``.

    Returns the StudyInstanceUID and the datasets (for building variants).
    """
    phantom = render_phantom(seed)
    hu = np.ascontiguousarray(phantom.hu[:, ::4, ::4])
    spacing = phantom.pixel_spacing_mm * 4
    datasets = ct_series_datasets(hu, (spacing, spacing), phantom.slice_spacing_mm, phantom.origin_mm, seed=seed,
                                  slice_thickness_mm=phantom.slice_thickness_mm,
                                  series_description=f"Axial {phantom.slice_thickness_mm:g} mm")
    for ds in datasets:
        ds.StudyDescription = description
        if edit is not None:
            edit(ds)
    write_datasets(datasets, folder)
    return datasets[0].StudyInstanceUID, datasets


@dataclass
class PlainOrthanc:
    """A second Orthanc (DICOMweb plugin only) standing in for the hospital PACS."""

    folder: Path
    aet: str = "PACS"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> PlainOrthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps({
            "Name": self.aet, "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StableAge": 2,
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"], "DicomWeb": {"Enable": True},
        }))
        self.process = start_orthanc(config, self.folder / "orthanc.log")
        wait_until_up(self.url)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def sop_instance_uids(self) -> set[str]:
        instances = requests.get(f"{self.url}/instances?expand", timeout=30).json()
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
