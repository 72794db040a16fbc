"""Readout inside the real Orthanc: a modality sends a study, Readout reads it and stores SR + SEG.

Integration tests: each starts Orthanc 1.10 with the Python and DICOMweb plugins and Readout
(`readout serve`'s configuration), sends studies with dcmtk's storescu and watches the admin API.
The runner uses a test engine of known output (tests/orthanc_engines.py); the shipped demo
engine goes through the same flow in test_demo_engine_reads_a_study_in_orthanc.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_sr.conformance import dciodvfy_errors, dsrdump_errors
from orthanc_plugin.jobs import JobStore
from tests.orthanc_server import (
    REPO,
    STORESCU,
    TEST_SETTINGS,
    PlainOrthanc,
    ReadoutServer,
    small_study,
)
from tests.sr_reading import read_groups

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path):
    made: list[ReadoutServer] = []

    def make(**kwargs) -> ReadoutServer:
        made.append(ReadoutServer(tmp_path / f"server{len(made)}", **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def _download(server: ReadoutServer, series: dict, path: Path) -> Path:
    path.write_bytes(server.request("GET", f"/instances/{series['Instances'][0]}/file").content)
    return path


def test_study_sent_with_storescu_gets_one_conformant_sr_and_seg(server, tmp_path: Path) -> None:
    orthanc = server().start()
    study_uid, _ = small_study(tmp_path / "study", seed=11)
    orthanc.send(tmp_path / "study")
    [job] = orthanc.wait_jobs(study_uid)
    assert job["rule"] == "chest-ct" and job["engine"] == "demo" and job["progress"] == 100
    assert job["error"] is None and job["timings"]["total_s"] > 0
    assert {"fetch_s", "load_s", "engine_s", "write_s", "store_s"} <= set(job["timings"])

    series = orthanc.series_by_modality(study_uid)
    assert len(series["SR"]) == 1 and len(series["SEG"]) == 1
    assert len(series["SR"][0]["Instances"]) == 1 and len(series["SEG"][0]["Instances"]) == 1
    sr_path = _download(orthanc, series["SR"][0], tmp_path / "sr.dcm")
    seg_path = _download(orthanc, series["SEG"][0], tmp_path / "seg.dcm")
    assert pydicom.dcmread(sr_path).SOPInstanceUID == job["outputs"]["sr"]
    assert pydicom.dcmread(seg_path).SOPInstanceUID == job["outputs"]["seg"]
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(seg_path) == []
    assert dsrdump_errors(sr_path) == []
    groups = read_groups(sr_path)
    nodules = [g for g in groups.values() if g.get("text") == "Test nodule at the centre of the volume."]
    assert len(nodules) == 1  # the finding the engine produced, and only it

    # Loop guard: our outputs made the study change again; after it is stable, still one job.
    orthanc.wait(lambda: orthanc.get(f"/studies/{orthanc.study_id(study_uid)}")["IsStable"], "the study to settle")
    orthanc.wait(lambda: orthanc.get("/readout/health")["jobs"]["queued"] == 0, "an idle queue")
    assert len(orthanc.jobs(study_uid)) == 1
    assert len(orthanc.series_by_modality(study_uid)["SR"]) == 1


def test_new_image_in_a_read_study_is_read_again_with_a_predecessor(server, tmp_path: Path) -> None:
    orthanc = server().start()
    study_uid, datasets = small_study(tmp_path / "study", seed=12)
    orthanc.send(tmp_path / "study")
    [first] = orthanc.wait_jobs(study_uid)

    extra = copy.deepcopy(datasets[0])  # one more image in a new series of the same study
    extra.SeriesInstanceUID = extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    extra.SeriesNumber = 9
    (tmp_path / "extra").mkdir()
    extra.save_as(tmp_path / "extra" / "extra.dcm", enforce_file_format=True)
    orthanc.send(tmp_path / "extra")
    first_again, second = orthanc.wait_jobs(study_uid, count=2)
    assert first_again["id"] == first["id"] and second["version"] == 2
    assert second["outputs"]["sr"] != first["outputs"]["sr"]

    srs = orthanc.series_by_modality(study_uid)["SR"]
    assert len(srs) == 2
    reports = [pydicom.dcmread(_download(orthanc, s, tmp_path / f"sr{i}.dcm")) for i, s in enumerate(srs)]
    by_uid = {ds.SOPInstanceUID: ds for ds in reports}
    assert "PredecessorDocumentsSequence" not in by_uid[first["outputs"]["sr"]]
    predecessor = by_uid[second["outputs"]["sr"]].PredecessorDocumentsSequence[0]
    referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert referenced == first["outputs"]["sr"]


def test_rules_route_and_select_series(server, tmp_path: Path) -> None:
    orthanc = server().start()
    # An MR study: no rule matches, no job.
    mr_uid, _ = small_study(tmp_path / "mr", seed=13, edit=lambda ds: setattr(ds, "Modality", "MR"))
    # A chest CT with a localizer, a thick series and the thin one.
    ct_uid, thin = small_study(tmp_path / "ct", seed=14)
    variants = tmp_path / "ct-more"
    variants.mkdir()
    thick_uid = pydicom.uid.generate_uid()
    for number, ds in enumerate(thin[::4]):
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = thick_uid, 3, "Axial 5 mm"
        ds.SliceThickness = "5"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(variants / f"thick{number}.dcm", enforce_file_format=True)
    scout = copy.deepcopy(thin[0])
    scout.SeriesInstanceUID, scout.SeriesNumber, scout.SeriesDescription = pydicom.uid.generate_uid(), 1, "Scout"
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(variants / "scout.dcm", enforce_file_format=True)

    orthanc.send(tmp_path / "mr")
    orthanc.send(tmp_path / "ct")
    orthanc.send(variants)
    [job] = orthanc.wait_jobs(ct_uid)
    assert job["series"]["series_instance_uid"] == thin[0].SeriesInstanceUID
    assert any("LOCALIZER" in reason for reason in job["series"]["reasons"].values())

    mr_id = orthanc.study_id(mr_uid)
    orthanc.wait(lambda: orthanc.get(f"/studies/{mr_id}")["IsStable"], "the MR study to be stable")
    orthanc.wait(lambda: orthanc.get("/readout/health")["jobs"]["queued"] == 0, "an idle queue")
    assert orthanc.jobs(mr_uid) == []

    # Dry run: which rule and series, and why.
    answer = orthanc.request("POST", "/readout/rules/test", json={"study": ct_uid}).json()
    assert answer["matched"] == ["chest-ct"]
    chosen = answer["rules"][0]["series"]["chosen"]
    assert orthanc.get(f"/series/{chosen}")["MainDicomTags"]["SeriesInstanceUID"] == thin[0].SeriesInstanceUID
    answer = orthanc.request("POST", "/readout/rules/test", json={"study": mr_uid}).json()
    assert answer["matched"] == [] and "MR" in " ".join(answer["rules"][0]["reasons"])


def test_bad_rules_are_refused_and_the_old_rules_keep_working(server, tmp_path: Path) -> None:
    orthanc = server().start()
    before = orthanc.get("/readout/rules")["active"]
    bad = json.loads((tmp_path / "server0" / "rules.json").read_text())
    bad["rules"][0]["series"]["slice_thickness_mm"] = {"min": 5, "max": 1}
    response = orthanc.request("PUT", "/readout/rules", data=json.dumps(bad))
    assert response.status_code == 400
    assert "$.rules[0].series.slice_thickness_mm" in response.json()["error"]
    assert orthanc.get("/readout/rules")["active"] == before

    # The same mistake written straight into the file: refused, reported, old rules still route.
    (tmp_path / "server0" / "rules.json").write_text(json.dumps(bad))
    orthanc.wait(lambda: orthanc.get("/readout/health")["rules"]["file_error"], "the refusal to be reported")
    study_uid, _ = small_study(tmp_path / "study", seed=15)
    orthanc.send(tmp_path / "study")
    [job] = orthanc.wait_jobs(study_uid)
    assert job["rule"] == "chest-ct"

    good = json.loads(json.dumps(bad))
    good["rules"][0]["series"]["slice_thickness_mm"] = {"min": 0.5, "max": 3}
    assert orthanc.request("PUT", "/readout/rules", data=json.dumps(good)).status_code == 200
    assert orthanc.get("/readout/rules")["active"]["rules"][0]["series"]["slice_thickness_mm"]["max"] == 3
    assert orthanc.get("/readout/health")["rules"]["file_error"] is None


def test_bad_input_fails_with_a_reason_and_other_studies_are_read(server, tmp_path: Path) -> None:
    orthanc = server().start()
    broken_uid, datasets = small_study(tmp_path / "broken", seed=16)
    # A slice missing from the middle of the series: not a volume Readout can trust.
    middle = len(datasets) // 2
    for path in sorted((tmp_path / "broken").iterdir()):
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in {d.SOPInstanceUID for d in datasets[middle - 3:middle + 3]}:
            path.unlink()
    # A study whose only CT "series" is three images: no series fits the rule.
    small_uid, _ = small_study(tmp_path / "three", seed=17)
    for path in sorted((tmp_path / "three").iterdir())[3:]:
        path.unlink()
    # A study with one corrupt file: its pixel data cut short.
    corrupt_uid, _ = small_study(tmp_path / "corrupt", seed=26)
    victim = sorted((tmp_path / "corrupt").iterdir())[40]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(victim, enforce_file_format=True)
    good_uid, _ = small_study(tmp_path / "good", seed=18)
    for name in ("broken", "three", "corrupt", "good"):
        orthanc.send(tmp_path / name)

    [broken] = orthanc.wait_jobs(broken_uid, states=("failed",))
    assert "gap" in broken["error"] or "missing" in broken["error"], broken["error"]
    [small] = orthanc.wait_jobs(small_uid, states=("failed",))
    assert "no series fits rule chest-ct" in small["error"] and "fewer than 20" in small["error"]
    [corrupt] = orthanc.wait_jobs(corrupt_uid, states=("failed",))
    assert "pixel" in corrupt["error"].lower() and "internal error" not in corrupt["error"], corrupt["error"]
    orthanc.wait_jobs(good_uid)
    assert orthanc.get("/system")["DicomAet"] == "ORTHANC"  # Orthanc is fine
    assert len(orthanc.get("/studies")) == 4  # nothing was deleted
    assert "SR" not in orthanc.series_by_modality(broken_uid)

    # The admin accepts short series, then retries: the job chooses its series again and reads it.
    rules = orthanc.get("/readout/rules")["active"]
    rules["rules"][0]["series"]["min_slices"] = 3
    assert orthanc.request("PUT", "/readout/rules", data=json.dumps(rules)).status_code == 200
    assert orthanc.request("POST", f"/readout/jobs/{small['id']}/retry").status_code == 200
    [small] = orthanc.wait_jobs(small_uid)
    assert small["series"]["instances"] == 3 and small["outputs"]["sr"]


def _mid_read(server, tmp_path: Path, seed: int) -> tuple[ReadoutServer, str]:
    """A server whose engine takes 4 s, with a study sent and its job caught mid-read."""
    orthanc = server()
    orthanc.settings["engines"]["demo"]["seconds"] = 4.0
    orthanc.start()
    study_uid, _ = small_study(tmp_path / "study", seed=seed)
    orthanc.send(tmp_path / "study")
    orthanc.wait(lambda: orthanc.jobs(study_uid)[0]["step"] == "reading", "the job to be mid-read")
    return orthanc, study_uid


def test_runner_killed_mid_job_is_restarted_and_the_job_finishes_once(server, tmp_path: Path) -> None:
    orthanc, study_uid = _mid_read(server, tmp_path, seed=19)
    first_runner = orthanc.runner_pid()
    os.kill(first_runner, signal.SIGKILL)
    orthanc.wait(lambda: orthanc.runner_pid() not in (None, first_runner), "the supervisor to restart the runner")
    [job] = orthanc.wait_jobs(study_uid)
    assert job["attempts"] == 2
    series = orthanc.series_by_modality(study_uid)
    assert len(series["SR"]) == 1 and len(series["SEG"]) == 1


def test_orthanc_killed_mid_job_finishes_after_restart_and_reads_what_arrived_meanwhile(server, tmp_path: Path) -> None:
    orthanc, study_uid = _mid_read(server, tmp_path, seed=20)
    runner = orthanc.runner_pid()
    orthanc.kill()
    # The orphaned runner notices Orthanc is gone and stops by itself.
    subprocess.run(["timeout", "30", "tail", f"--pid={runner}", "-f", "/dev/null"], check=False)
    assert subprocess.run(["kill", "-0", str(runner)], capture_output=True, check=False).returncode != 0

    orthanc.start()
    # A study sent now, and one that arrived before the crash, are both read.
    later_uid, _ = small_study(tmp_path / "later", seed=21)
    orthanc.send(tmp_path / "later")
    [job] = orthanc.wait_jobs(study_uid)
    orthanc.wait_jobs(later_uid)
    series = orthanc.series_by_modality(study_uid)
    assert len(series["SR"]) == 1 and len(series["SEG"]) == 1
    assert job["attempts"] >= 2


def test_study_that_arrived_while_the_runner_was_down_is_read(server, tmp_path: Path) -> None:
    orthanc = server()
    orthanc.start()
    runner = orthanc.runner_pid()
    os.kill(runner, signal.SIGSTOP)  # the runner is down (frozen) while the study arrives and settles
    try:
        study_uid, _ = small_study(tmp_path / "study", seed=22)
        orthanc.send(tmp_path / "study")
        orthanc.wait(lambda: orthanc.get(f"/studies/{orthanc.study_id(study_uid)}")["IsStable"], "stability")
        assert orthanc.jobs(study_uid) == []
    finally:
        os.kill(runner, signal.SIGKILL)
    orthanc.wait_jobs(study_uid)


def test_study_still_arriving_when_orthanc_died_is_read_after_restart(server, tmp_path: Path) -> None:
    orthanc = server()
    orthanc.settings["orthanc"]["stable_age_s"] = 30  # the study cannot become stable before the crash
    orthanc.start()
    study_uid, _ = small_study(tmp_path / "study", seed=23)
    orthanc.send(tmp_path / "study")
    orthanc.wait(lambda: orthanc.get("/readout/health") and orthanc.study_id(study_uid), "the study")
    time.sleep(1.5)  # the runner notes the new series
    orthanc.kill()
    orthanc.start()
    orthanc.wait_jobs(study_uid, timeout_s=60)


def test_admin_api_answers(server, tmp_path: Path) -> None:
    orthanc = server().start()
    study_uid, _ = small_study(tmp_path / "study", seed=24)
    orthanc.send(tmp_path / "study")
    [job] = orthanc.wait_jobs(study_uid)
    for key in ("id", "state", "study_instance_uid", "rule", "engine", "progress", "error", "timings", "outputs"):
        assert key in job
    assert orthanc.get(f"/readout/jobs/{job['id']}")["outputs"]["sr"] == job["outputs"]["sr"]
    assert orthanc.jobs("1.2.3.4") == []
    assert [j["id"] for j in orthanc.get("/readout/jobs?state=done")] == [job["id"]]

    # Read it now, explicitly: a new version.
    response = orthanc.request("POST", "/readout/jobs", json={"study": study_uid, "engine": "demo", "topics": ["lungs"]})
    assert response.status_code == 200, response.text
    orthanc.wait_jobs(study_uid, count=2)
    assert orthanc.get("/readout/engines")[0]["name"] == "demo"
    assert orthanc.get("/readout/health")["status"] == "ok"
    def metrics() -> str:
        return orthanc.request("GET", "/tools/metrics-prometheus").text

    orthanc.wait(lambda: "readout_jobs_done 2 " in metrics(), "job counts in Orthanc's metrics", 20)
    assert "readout_jobs_failed 0 " in metrics() and "readout_job_seconds_mean_last50" in metrics()

    errors = {
        ("GET", "/readout/jobs/999999"): 404, ("POST", "/readout/jobs/999999/retry"): 404,
        ("POST", f"/readout/jobs/{job['id']}/cancel"): 409, ("POST", f"/readout/jobs/{job['id']}/retry"): 409,
        ("GET", "/readout/jobs?state=sleeping"): 400, ("DELETE", "/readout/jobs"): 405, ("GET", "/readout/nothing"): 404,
    }
    for (method, path), status in errors.items():
        response = orthanc.request(method, path)
        assert response.status_code == status, (method, path, response.text)
        assert status == 405 or response.json()["error"]
    for body, status in (({"study": "1.2.3"}, 404), ({"study": study_uid}, 400), ({"study": study_uid, "rule": "nope"}, 404),
                         ({"study": study_uid, "engine": "demo", "topics": ["spleen"]}, 400)):
        response = orthanc.request("POST", "/readout/jobs", json=body)
        assert response.status_code == status, (body, response.text)
    assert orthanc.request("POST", "/readout/jobs", data="not json").status_code == 400


def test_admin_api_needs_authentication_and_logs_carry_no_patient_data(server, tmp_path: Path) -> None:
    orthanc = server(auth=("admin", "s3cret"))
    orthanc.settings["orthanc"].update(authentication=True, users={"admin": "s3cret"})
    orthanc.start()
    assert requests.get(orthanc.url + "/readout/jobs", timeout=10).status_code == 401
    assert requests.get(orthanc.url + "/readout/jobs", auth=("admin", "wrong"), timeout=10).status_code == 401
    assert orthanc.request("GET", "/readout/jobs").status_code == 200

    def identify(ds) -> None:
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "MRN-5551234"

    study_uid, _ = small_study(tmp_path / "study", seed=25, edit=identify)
    orthanc.send(tmp_path / "study")
    orthanc.wait_jobs(study_uid)
    log = orthanc.log.read_text(errors="replace")
    assert "job 1: stored" in log  # the log is the one the runner wrote to
    for secret in ("Doe", "Jane", "MRN-5551234", "5551234"):
        assert secret not in log


@pytest.fixture
def pacs(tmp_path: Path):
    made: list[PlainOrthanc] = []

    def make(name: str) -> PlainOrthanc:
        made.append(PlainOrthanc(tmp_path / name, aet=name.upper()))
        return made[-1]

    yield make
    for p in made:
        p.stop()


def _forwarding_server(server, dicom: PlainOrthanc, web: PlainOrthanc, attempts: int) -> ReadoutServer:
    orthanc = server()
    orthanc.settings["forwarding"].update(attempts=attempts, backoff_s=0.5, backoff_max_s=1.0)
    orthanc.settings["destinations"] = {
        "pacs": {"kind": "dicom", "aet": dicom.aet, "host": "127.0.0.1", "port": dicom.dicom_port},
        "archive": {"kind": "dicomweb", "url": f"{web.url}/dicom-web/"},
    }
    rules = json.loads((Path(__file__).parents[1] / "config" / "rules.json").read_text())
    rules["rules"][0]["destinations"] = ["pacs", "archive"]
    orthanc.rules = rules
    return orthanc.start()


def test_outputs_are_forwarded_over_dicom_and_dicomweb(server, pacs, tmp_path: Path) -> None:
    dicom, web = pacs("pacs").start(), pacs("archive").start()
    orthanc = _forwarding_server(server, dicom, web, attempts=5)
    study_uid, _ = small_study(tmp_path / "study", seed=30)
    orthanc.send(tmp_path / "study")
    [job] = orthanc.wait_jobs(study_uid)
    outputs = {job["outputs"]["sr"], job["outputs"]["seg"]}
    assert dicom.sop_instance_uids() == outputs and web.sop_instance_uids() == outputs  # SR and SEG, nothing else
    assert {d["state"] for d in job["destinations"].values()} == {"done"}
    assert {"forward_pacs_s", "forward_archive_s"} <= set(job["timings"])


def test_a_destination_that_is_down_is_retried_and_does_not_block_other_jobs(server, pacs, tmp_path: Path) -> None:
    dicom, web = pacs("pacs"), pacs("archive").start()  # the DICOM destination is down
    orthanc = _forwarding_server(server, dicom, web, attempts=100)
    first_uid, _ = small_study(tmp_path / "first", seed=31)
    orthanc.send(tmp_path / "first")
    orthanc.wait(lambda: orthanc.jobs(first_uid)[0]["destinations"]["pacs"]["attempts"] >= 2, "delivery retries")
    [first] = orthanc.jobs(first_uid)
    assert first["state"] == "forwarding" and first["destinations"]["pacs"]["state"] in ("retrying", "sending")
    assert first["destinations"]["archive"]["state"] == "done"  # the other destination was not held up

    second_uid, _ = small_study(tmp_path / "second", seed=32)
    orthanc.send(tmp_path / "second")
    orthanc.wait(lambda: orthanc.jobs(second_uid)[0]["outputs"].get("stored"), "the next study to be read and stored")

    dicom.start()  # the PACS is back: both jobs deliver by themselves
    first, second = orthanc.wait_jobs(first_uid)[0], orthanc.wait_jobs(second_uid)[0]
    assert dicom.sop_instance_uids() == {first["outputs"]["sr"], first["outputs"]["seg"],
                                         second["outputs"]["sr"], second["outputs"]["seg"]}


def test_a_delivery_that_gives_up_fails_the_job_and_an_admin_can_retry_it(server, pacs, tmp_path: Path) -> None:
    dicom, web = pacs("pacs"), pacs("archive").start()
    orthanc = _forwarding_server(server, dicom, web, attempts=2)
    study_uid, _ = small_study(tmp_path / "study", seed=33)
    orthanc.send(tmp_path / "study")
    [job] = orthanc.wait_jobs(study_uid, states=("failed",))
    assert job["error"].startswith("destination pacs:") and job["destinations"]["pacs"]["attempts"] == 2
    assert job["destinations"]["archive"]["state"] == "done"

    dicom.start()
    response = orthanc.request("POST", f"/readout/jobs/{job['id']}/retry")
    assert response.status_code == 200 and response.json()["state"] == "forwarding"
    [job] = orthanc.wait_jobs(study_uid)
    assert job["attempts"] == 1  # delivered again, not read again
    assert dicom.sop_instance_uids() == {job["outputs"]["sr"], job["outputs"]["seg"]}


def test_demo_engine_reads_a_study_in_orthanc(tmp_path: Path) -> None:
    """`readout demo --exit`: the real flow with the shipped demo engine (what `make demo` runs)."""
    from tests.orthanc_server import free_port

    readout = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "readout"
    command = [str(readout) if readout.exists() else "readout", "demo", "--exit", "--storage", str(tmp_path / "demo"),
               "--http-port", str(free_port()), "--dicom-port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for topic in ("LUNGS", "PLEURA", "HEART", "LIVER", "BONES", "QUESTIONS"):
        assert f"\n{topic}\n" in result.stdout
    assert "SR  series 9901" in result.stdout and "Timings: queued" in result.stdout
    assert "StableAge is 3 s" in result.stdout


def test_a_runner_started_on_its_own_reads_for_a_remote_orthanc(pacs, tmp_path: Path) -> None:
    """`readout runner --orthanc URL`: no plugin in that Orthanc; the change log drives the runner."""
    remote = pacs("remote").start()
    settings = json.loads(json.dumps(TEST_SETTINGS))
    settings["rules"] = str(Path(__file__).parents[1] / "config" / "rules.json")
    (tmp_path / "readout.json").write_text(json.dumps(settings))
    log = (tmp_path / "runner.log").open("w")
    runner = subprocess.Popen([sys.executable, "-m", "orthanc_plugin.cli", "runner", "--orthanc", remote.url,
                               "--settings", str(tmp_path / "readout.json"), "--database", str(tmp_path / "jobs.db")],
                              stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        store = JobStore(tmp_path / "jobs.db")
        deadline = time.monotonic() + 60
        while store.get_setting("changes_cursor") is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the runner starts from the newest change
        study_uid, _ = small_study(tmp_path / "study", seed=40)
        result = subprocess.run([STORESCU, "-aec", remote.aet, "+sd", "127.0.0.1", str(remote.dicom_port),
                                 str(tmp_path / "study")], capture_output=True, timeout=120, check=False)
        assert result.returncode == 0
        while time.monotonic() < deadline + 60 and not [j for j in store.list(study=study_uid) if j.state == "done"]:
            time.sleep(0.3)
        [job] = store.list(study=study_uid)
        assert job.state == "done", (job.state, job.error, (tmp_path / "runner.log").read_text()[-2000:])
        assert job.outputs["sr"] in remote.sop_instance_uids()
    finally:
        runner.terminate()
        runner.wait(timeout=30)


def test_medgemma_engine_reads_through_orthanc(server, tiny_folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Rules route a study to the MedGemma engine (a tiny random Gemma 3 here): same runner, same writers."""
    orthanc = server()
    orthanc.settings["engines"] = {"medgemma": {"model_path": str(tiny_folder), "max_new_tokens": 8, "rollouts": 2,
                                                "pruning": {"keep": "ratio", "keep_value": 0.5, "scope": "shared"}}}
    rules = json.loads((REPO / "config" / "rules.json").read_text())
    rules["rules"][0]["engine"] = "medgemma"
    orthanc.rules = rules
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # inherited by Orthanc and its runner: nothing may be fetched
    orthanc.start()
    study_uid, _ = small_study(tmp_path / "study", seed=41)
    orthanc.send(tmp_path / "study")
    [job] = orthanc.wait_jobs(study_uid, timeout_s=180)
    assert job["engine"] == "medgemma" and "LUNGS" in job["outputs"]["report"]
    sr_series = orthanc.series_by_modality(study_uid)["SR"]
    assert len(sr_series) == 1 and "medgemma" in sr_series[0]["MainDicomTags"]["SeriesDescription"]
    sr_path = _download(orthanc, sr_series[0], tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == [] and dsrdump_errors(sr_path) == []
