"""`readout demo` (`make demo`): the real flow on this machine, end to end.

Orthanc with Readout starts, a phantom study goes in over DICOM with dcmtk's storescu as a
modality would send it, the runner reads it, and the SR and SEG land in the same study.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from tqdm import tqdm

from engines.phantom import write_phantom_study
from orthanc_plugin.serve import start_orthanc, wait_until_up, write_configuration
from orthanc_plugin.settings import DEFAULT_SETTINGS, load_settings

STORESCU = "/usr/bin/storescu"  # dcmtk's (pynetdicom installs a script of the same name)
DEMO_STABLE_AGE_S = 3


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait(url: str, what: str, check, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check(requests.get(url, timeout=10).json())
        except (requests.RequestException, ValueError, KeyError, IndexError):
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def run_demo(storage: Path, http_port: int = 8042, dicom_port: int = 4242, seed: int = 7, stay: bool = True) -> int:
    """Run the demo; with ``stay``, leave Orthanc running until Ctrl-C."""
    for port in (http_port, dicom_port):
        if not _port_free(port):
            print(f"readout demo: port {port} is in use (another Orthanc?); stop it or pass other ports", file=sys.stderr)
            return 2
    shutil.rmtree(storage, ignore_errors=True)  # a fresh Orthanc: the demo study must be new to it
    config = write_configuration(load_settings(DEFAULT_SETTINGS), DEFAULT_SETTINGS, storage, http_port, dicom_port,
                                 stable_age_s=DEMO_STABLE_AGE_S)
    url = f"http://127.0.0.1:{http_port}"
    print(f"Starting Orthanc with Readout ({config}).")
    print(f"StableAge is {DEMO_STABLE_AGE_S} s for this demo (the default is 60 s: Orthanc waits that long after a "
          "study's last image before calling it complete).")
    orthanc = start_orthanc(config, storage / "orthanc.log")
    try:
        wait_until_up(url)
        _wait(f"{url}/readout/health", "Readout's runner", lambda h: h["runner"]["ok"])
        with tempfile.TemporaryDirectory() as folder:
            write_phantom_study(Path(folder), seed)
            print(f"Sending phantom study (seed {seed}) with storescu to ORTHANC@127.0.0.1:{dicom_port} ...")
            subprocess.run([STORESCU, "-aec", "ORTHANC", "+sd", "127.0.0.1", str(dicom_port), str(Path(folder) / "dicom")],
                           check=True, capture_output=True)
        study_id = _wait(f"{url}/studies", "the study", lambda s: s[0])
        study_uid = requests.get(f"{url}/studies/{study_id}", timeout=10).json()["MainDicomTags"]["StudyInstanceUID"]
        job = _follow(f"{url}/readout/jobs?study={study_uid}")
        _print_result(url, study_id, job)
        if stay and job["state"] == "done":
            print("\nOrthanc keeps running with Readout; Ctrl-C stops it.")
            orthanc.wait()
        return 0 if job["state"] == "done" else 1
    except KeyboardInterrupt:
        return 0
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)


def _follow(jobs_url: str) -> dict:
    """Show the job's progress until it ends."""
    job = _wait(jobs_url, "the job (StableAge, then the rules)", lambda jobs: jobs[0])
    with tqdm(total=100, desc="reading", unit="%", file=sys.stderr, disable=None) as bar:
        while job["state"] not in ("done", "failed", "cancelled"):
            bar.set_description(job["step"] or job["state"])
            bar.n = job["progress"]
            bar.refresh()
            time.sleep(0.3)
            job = requests.get(jobs_url, timeout=10).json()[0]
        bar.n = job["progress"]
        bar.refresh()
    return job


def _print_result(url: str, study_id: str, job: dict) -> None:
    print()
    if job["state"] != "done":
        print(f"Job {job['id']} {job['state']}: {job['error']}")
        return
    print(job["outputs"]["report"])
    timings = job["timings"]
    print("\nTimings: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f} s" for k, v in timings.items()))
    print(f"\nOrthanc Explorer: {url}/app/explorer.html#study?uuid={study_id}")
    for series in requests.get(f"{url}/studies/{study_id}/series", timeout=10).json():
        tags = series["MainDicomTags"]
        if tags.get("Modality") in ("SR", "SEG"):
            print(f"  {tags['Modality']:3} series {tags.get('SeriesNumber', '')}: {tags.get('SeriesDescription', '')} "
                  f"({url}/app/explorer.html#series?uuid={series['ID']})")
    print(f"Job: {url}/readout/jobs/{job['id']}")
