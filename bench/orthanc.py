"""Benchmark: Readout inside a real Orthanc, from C-STORE to the SR stored back into the study.

Three measurements in one run, each against a fresh Orthanc 1.10 on free loopback ports with
its storage in a temporary folder (StableAge 2 s; runner polls every 0.3 s):

1. Latency, one phantom study at a time: the moment Orthanc calls the study stable (GET
   /studies/{id} ``IsStable``, polled every 50 ms from the end of storescu; the StableStudy
   ``Date`` in /changes has only second resolution) to the job done (SR and SEG stored), split
   into intake and the job's own step timings. One warm-up study (it pays for loading the
   engine), then the median of the next ones.
2. C-STORE ingest throughput: small 64x64 CT instances sent by one ``/usr/bin/storescu``
   association to Orthanc with only the DICOMweb plugin (a) and with Readout (b); rounds
   alternate a/b (ABBA order), each on fresh storage. Once with study descriptions that the
   chest rule does not match, once with ones it does (the runner then reads while Orthanc
   ingests). Ratios b/a are measured in the same run because the machine may be shared.
   DCMTK leaves Nagle's algorithm on by default; with many small instances every C-STORE then
   waits ~40 ms for a delayed ACK and ingest is bound by that, not by CPU, which would hide any
   cost of the plugin. So these runs set TCP_NODELAY=1 for Orthanc and storescu alike; one small
   reference round with DCMTK's default shows what that regime looks like.
3. Twenty phantom studies sent at once by twenty storescu processes; all jobs must end done.

    .venv/bin/python bench/orthanc.py            # prints the section, writes it into bench/RESULTS.md
    .venv/bin/python bench/orthanc.py --quick    # tiny sizes, a few minutes; prints only

Job timestamps to the millisecond come from the job store file itself (read-only): the admin
API rounds ``created``/``finished`` to whole seconds. Target for 2: ratio b/a <= 1.05.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engines.phantom import (
    ct_series_datasets,
    phantom_uid,
    write_datasets,
    write_phantom_study,
)
from orthanc_plugin.serve import (
    orthanc_configuration,
    start_orthanc,
    wait_until_up,
    write_configuration,
)
from orthanc_plugin.settings import load_settings

STORESCU = "/usr/bin/storescu"  # dcmtk's; the venv's pynetdicom storescu is another program
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Orthanc flow (bench/orthanc.py)"
STABLE_AGE_S = 2
RUNNER = {"lease_s": 30, "heartbeat_s": 1, "poll_s": 0.3}
STABLE_POLL_S = 0.05
JOB_POLL_S = 0.1

LATENCY_SEEDS = (101, 102, 103, 104)  # the first is the warm-up
BURST_SEEDS = tuple(range(201, 221))
SMALL_SLICES, SMALL_SIZE, SMALL_SPACING_MM, SMALL_THICKNESS_MM = 100, 64, 5.0, 2.5
SMALL_STUDIES = 20  # x SMALL_SLICES instances
ROUNDS = 5
NAGLE_STUDIES = 2  # studies sent with DCMTK's default network setting (slow: ~11 instances/s), for reference
QUICK = {"latency_seeds": LATENCY_SEEDS[:2], "burst_seeds": BURST_SEEDS[:3], "small_studies": 2, "rounds": 1}
FULL = {"latency_seeds": LATENCY_SEEDS, "burst_seeds": BURST_SEEDS, "small_studies": SMALL_STUDIES, "rounds": ROUNDS}
STEPS = ("queued_s", "fetch_s", "load_s", "engine_load_s", "engine_s", "write_s", "store_s")


# --- Orthanc -------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    dicom_port: int
    storage: Path
    http: requests.Session
    dcmtk_env: dict[str, str]  # the environment storescu runs in (the same TCP_NODELAY as Orthanc)

    def get(self, path: str):
        return self.request("GET", path).json()

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One request, tried again when Orthanc dropped a kept-alive connection (KeepAliveTimeout 1 s)."""
        for attempt in range(3):
            try:
                response = self.http.request(method, self.url + path, timeout=30, **kwargs)
                break
            except requests.ConnectionError:
                if attempt == 2:
                    raise
                time.sleep(0.05)
        response.raise_for_status()
        return response

    @property
    def database(self) -> Path:
        return self.storage / "readout.db"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports (bound to port 0 together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_settings(folder: Path) -> Path:
    path = folder / "readout-settings.json"
    path.write_text(json.dumps({
        "rules": str(ROOT / "config" / "rules.json"), "database": str(folder / "unused.db"),
        "orthanc": {"stable_age_s": STABLE_AGE_S}, "runner": RUNNER, "engines": {"demo": {}}, "destinations": {},
    }, indent=2))
    return path


def _configure(settings_path: Path, storage: Path, readout: bool) -> Path:
    http_port, dicom_port = free_ports(2)
    settings = load_settings(settings_path)
    if readout:
        return write_configuration(settings, settings_path, storage, http_port, dicom_port)
    # The same configuration without the Python plugin: only DICOMweb is loaded.
    storage.mkdir(parents=True, exist_ok=True)
    config = orthanc_configuration(settings, settings_path, storage.resolve(), http_port, dicom_port)
    config["Plugins"] = [p for p in config["Plugins"] if "DicomWeb" in p]
    for key in ("PythonScript", "PythonVerbose", "Readout"):
        del config[key]
    path = storage / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, wait; then make sure nothing of its process group (the runner) is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # start_orthanc gives Orthanc a session of its own, so its group holds Orthanc and the runner only.
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        os.killpg(process.pid, sig)
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def dcmtk_environment(nodelay: bool) -> dict[str, str]:
    """The environment with DCMTK's Nagle setting: TCP_NODELAY=1 disables it, absent keeps DCMTK's default (on)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return {**env, "TCP_NODELAY": "1"} if nodelay else env


@contextlib.contextmanager
def orthanc(settings_path: Path, storage: Path, *, readout: bool, nodelay: bool = False) -> Iterator[Server]:
    """A running Orthanc (with Readout's runner seen alive when ``readout``); always stopped after.

    Orthanc (and so its runner) inherits this process's environment: with ``nodelay`` it runs with
    TCP_NODELAY=1, as does every storescu sent to it.
    """
    config = json.loads(_configure(settings_path, storage, readout).read_text())
    env = dcmtk_environment(nodelay)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        process = start_orthanc(storage / "orthanc.json", storage / "orthanc.log")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        server = Server(f"http://127.0.0.1:{config['HttpPort']}", config["DicomPort"], storage, requests.Session(), env)
        wait_until_up(server.url, timeout_s=60)
        if readout:
            _wait_for_runner(server)
        yield server
    except BaseException:
        kept = Path(tempfile.gettempdir()) / "readout-bench-orthanc-failed.log"
        with contextlib.suppress(OSError):
            kept.write_bytes((storage / "orthanc.log").read_bytes())
            print(f"  Orthanc's log (with the runner's) kept in {kept}", file=sys.stderr)
        raise
    finally:
        _stop(process)
        if readout:
            _scan_runner_log(storage / "orthanc.log")


RUNNER_TROUBLE = {"Orthanc unavailable": "runner waits: Orthanc unavailable", "; retrying in": "job retries",
                  "internal error": "internal errors", "runner exited": "runner restarts"}
TROUBLE: dict[str, int] = dict.fromkeys(RUNNER_TROUBLE.values(), 0)  # over every Orthanc with Readout in this run


def _scan_runner_log(log: Path) -> None:
    """Count the runner's warnings (its log goes to Orthanc's) before the storage is deleted."""
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            for needle, what in RUNNER_TROUBLE.items():
                if needle in line:
                    TROUBLE[what] += 1


def _wait_for_runner(server: Server, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if server.get("/readout/health")["runner"]["ok"]:
                return
        time.sleep(0.2)
    raise TimeoutError(f"Readout's runner was not seen alive within {timeout_s:.0f} s")


def storescu(server: Server, *folders: Path, recurse: bool = False) -> list[str]:
    return [STORESCU, "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port), "+sd", *(["+r"] if recurse else []),
            *map(str, folders)]


def send(server: Server, *folders: Path, recurse: bool = False) -> float:
    """Send folders in one association; returns the wall time."""
    started = time.perf_counter()
    done = subprocess.run(storescu(server, *folders, recurse=recurse), capture_output=True, text=True,
                          env=server.dcmtk_env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited with {done.returncode}: {done.stderr[-500:]}")
    return wall


def study_id(server: Server, study_instance_uid: str) -> str:
    answer = server.request("POST", "/tools/lookup", data=study_instance_uid).json()
    found = [r["ID"] for r in answer if r["Type"] == "Study"]
    if not found:
        raise RuntimeError(f"study {study_instance_uid} is not in Orthanc after storescu")
    return found[0]


def wait_stable(server: Server, orthanc_id: str, timeout_s: float = 60.0) -> float:
    """time.time() of the first poll that finds the study stable."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.get(f"/studies/{orthanc_id}")["IsStable"]:
            return time.time()
        time.sleep(STABLE_POLL_S)
    raise TimeoutError(f"study {orthanc_id} not stable within {timeout_s:.0f} s")


FINAL = ("done", "failed", "cancelled")


def wait_jobs(server: Server, uids: list[str], timeout_s: float) -> list[dict]:
    """Wait until every study in ``uids`` has a job in a final state; returns those jobs."""
    deadline = time.monotonic() + timeout_s
    wanted = set(uids)
    while time.monotonic() < deadline:
        jobs = [j for j in server.get("/readout/jobs?limit=1000") if j["study_instance_uid"] in wanted]
        finished = {j["study_instance_uid"] for j in jobs if j["state"] in FINAL}
        if finished == wanted:
            return jobs
        time.sleep(JOB_POLL_S)
    raise TimeoutError(f"{len(wanted)} studies: not all jobs finished within {timeout_s:.0f} s")


def job_times(server: Server, ids: list[int]) -> dict[int, dict[str, float]]:
    """created/finished as floats from the job store (the API shows whole seconds)."""
    with contextlib.closing(sqlite3.connect(f"file:{server.database}?mode=ro", uri=True)) as db:
        rows = db.execute(f"SELECT id, created_at, finished_at FROM jobs WHERE id IN ({','.join('?' * len(ids))})",
                          ids).fetchall()
    return {row[0]: {"created": row[1], "finished": row[2]} for row in rows}


def wait_idle(server: Server, orthanc_id: str) -> None:
    """Let the study settle again after the SR/SEG arrived (its second StableStudy is handled)."""
    wait_stable(server, orthanc_id)
    time.sleep(2 * RUNNER["poll_s"])


# --- data ----------------------------------------------------------------------------------------


def write_phantoms(folder: Path, seeds: tuple[int, ...]) -> dict[int, tuple[Path, str, int]]:
    """Phantom studies, one folder each: seed -> (dicom folder, StudyInstanceUID, slices)."""
    out = {}
    for seed in seeds:
        write_phantom_study(folder / str(seed), seed)
        dicom = folder / str(seed) / "dicom"
        out[seed] = (dicom, str(phantom_uid(seed, "study")), len(list(dicom.glob("*.dcm"))))
    return out


def write_small_studies(folder: Path, studies: int, *, chest: bool) -> list[Path]:
    """``studies`` x 100 slices of 64x64 CT (a crude chest); the chest rule matches only if ``chest``."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[-1 : 1 : SMALL_SIZE * 1j, -1 : 1 : SMALL_SIZE * 1j]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    lungs = ((np.abs(x) - 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    plane = np.where(body, 40, -1000) + np.where(lungs, -860, 0)
    folders = []
    for i in range(studies):
        seed = (700_000 if chest else 800_000) + i
        hu = np.clip(plane + rng.normal(0, 15, (SMALL_SLICES, SMALL_SIZE, SMALL_SIZE)), -1024, 3000).astype(np.int16)
        half = (SMALL_SIZE - 1) / 2 * SMALL_SPACING_MM
        datasets = ct_series_datasets(hu, (SMALL_SPACING_MM, SMALL_SPACING_MM), SMALL_THICKNESS_MM,
                                      (-half, -half, -125.0), seed=seed, series_description="Axial 2.5 mm")
        if not chest:
            for ds in datasets:
                ds.StudyDescription, ds.BodyPartExamined = "CT abdomen pelvis", "ABDOMEN"
        write_datasets(datasets, folder / f"study{i:02d}")
        folders.append(folder / f"study{i:02d}")
    return folders


def warm_cache(folder: Path) -> None:
    for path in folder.rglob("*.dcm"):
        path.read_bytes()


# --- 1: stable study to SR stored ----------------------------------------------------------------


def measure_latency(server: Server, phantoms: dict[int, tuple[Path, str, int]]) -> list[dict]:
    rows = []
    for seed, (folder, uid, slices) in phantoms.items():
        send_s = send(server, folder)
        sent = time.time()
        orthanc_id = study_id(server, uid)
        stable = wait_stable(server, orthanc_id)
        (job,) = wait_jobs(server, [uid], timeout_s=300)
        if job["state"] != "done":
            raise RuntimeError(f"phantom {seed}: job {job['id']} ended {job['state']}: {job['error']}")
        times = job_times(server, [job["id"]])[job["id"]]
        if server.get(f"/instances/{job['outputs']['sr_orthanc_id']}")["ParentSeries"] is None:
            raise RuntimeError(f"phantom {seed}: SR not in Orthanc")
        wait_idle(server, orthanc_id)
        jobs_now = [j for j in server.get(f"/readout/jobs?study={uid}")]
        t = job["timings"]
        row = {"seed": seed, "slices": slices, "send_s": send_s, "stable_after_s": stable - sent,
               "intake_s": times["created"] - stable, **{k: t.get(k, 0.0) for k in STEPS},
               "total_s": t["total_s"], "stable_to_done_s": times["finished"] - stable,
               "jobs_for_study": len(jobs_now)}
        row["bookkeeping_s"] = times["finished"] - times["created"] - t["queued_s"] - t["total_s"]
        rows.append(row)
        print(f"  latency {seed}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", file=sys.stderr)
    return rows


def latency_table(rows: list[dict]) -> str:
    columns = ("slices", "send_s", "stable_after_s", "intake_s", *STEPS, "bookkeeping_s", "stable_to_done_s")
    heads = ("slices", "storescu s", "sent → stable s", "stable → job created s", "queued s", "fetch s", "load s",
             "engine load s", "engine s", "write s", "store s", "bookkeeping s", "**stable → done s**")
    lines = ["| study | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]

    def line(label: str, values: dict) -> str:
        return f"| {label} | " + " | ".join(
            f"{values[c]:.0f}" if c == "slices" else f"{values[c]:.2f}" for c in columns) + " |"

    warm, rest = rows[0], rows[1:]
    lines.append(line(f"warm-up (seed {warm['seed']}, engine loads)", warm))
    for row in rest:
        lines.append(line(f"seed {row['seed']}", row))
    if rest:
        median = {c: statistics.median(r[c] for r in rest) for c in columns}
        lines.append(line(f"**median of {len(rest)}**", median))
    return "\n".join(lines)


# --- 2: ingest with and without the plugin -------------------------------------------------------


@dataclass
class Ingest:
    label: str
    studies: list[Path]  # one folder per study, all sent in one association
    nodelay: bool
    rounds: int
    runs: dict[str, list[dict]]

    @property
    def instances(self) -> int:
        return len(self.studies) * SMALL_SLICES


def measure_ingest(settings_path: Path, tmp: Path, ingest: Ingest) -> None:
    instances = ingest.instances
    for r in range(ingest.rounds):
        for kind in ("ab" if r % 2 == 0 else "ba"):
            storage = Path(tempfile.mkdtemp(prefix=f"ingest-{kind}{r}-", dir=tmp))
            with orthanc(settings_path, storage, readout=kind == "b", nodelay=ingest.nodelay) as server:
                wall = send(server, *ingest.studies)
                stored = server.get("/statistics")["CountInstances"]
                run = {"wall_s": wall, "stored": stored}
                if kind == "b":
                    jobs = server.get("/readout/jobs?limit=1000")
                    run["jobs"] = len(jobs)
                    run["done"] = sum(j["state"] == "done" for j in jobs)
            if stored < instances:
                raise RuntimeError(f"{ingest.label} {kind}: Orthanc holds {stored} of {instances} instances")
            ingest.runs[kind].append(run)
            print(f"  ingest {ingest.label} round {r + 1} {kind}: {json.dumps(run)}", file=sys.stderr)


def ingest_table(ingests: list[Ingest]) -> str:
    lines = [("| descriptions, DCMTK network setting | instances | rounds | a: DICOMweb only, median s | "
              "b: + Readout, median s | a instances/s | b instances/s | **b / a** | b / a per round | "
              "jobs done / made when ingest ended (b) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ingest in ingests:
        runs, n = ingest.runs, ingest.instances
        a = statistics.median(r["wall_s"] for r in runs["a"])
        b = statistics.median(r["wall_s"] for r in runs["b"])
        per_round = ", ".join(f"{rb['wall_s'] / ra['wall_s']:.2f}" for ra, rb in zip(runs["a"], runs["b"]))
        jobs = ", ".join(f"{r['done']}/{r['jobs']}" for r in runs["b"])
        lines.append(f"| {ingest.label} | {n} | {ingest.rounds} | {a:.2f} | {b:.2f} | {n / a:.0f} | {n / b:.0f} | "
                     f"**{b / a:.3f}** | {per_round} | {jobs} |")
    return "\n".join(lines)


# --- 3: twenty studies at once -------------------------------------------------------------------


def measure_burst(server: Server, phantoms: dict[int, tuple[Path, str, int]], tmp: Path) -> dict:
    uids = [uid for _, uid, _ in phantoms.values()]
    started = time.time()
    logs, processes = [], []
    for seed, (folder, _, _) in phantoms.items():
        log = (tmp / f"storescu-{seed}.log").open("w")
        logs.append(log)
        processes.append(subprocess.Popen(storescu(server, folder), stdout=log, stderr=subprocess.STDOUT,
                                          env=server.dcmtk_env))
    codes = [p.wait() for p in processes]
    sent = time.time()
    for log in logs:
        log.close()
    if any(codes):
        raise RuntimeError(f"storescu exit codes {codes} (logs in {tmp})")
    jobs = wait_jobs(server, uids, timeout_s=900)
    bad = [j for j in jobs if j["state"] != "done"]
    if bad or len(jobs) != len(uids):
        raise RuntimeError(f"burst: {len(jobs)} jobs for {len(uids)} studies; not done: "
                           f"{[(j['id'], j['state'], j['error']) for j in bad]}")
    times = job_times(server, [j["id"] for j in jobs])
    created = [t["created"] for t in times.values()]
    finished = [t["finished"] for t in times.values()]
    totals = [j["timings"]["total_s"] for j in jobs]
    queued = [j["timings"]["queued_s"] for j in jobs]
    return {
        "studies": len(uids), "instances": sum(n for _, _, n in phantoms.values()), "send_s": sent - started,
        "wall_s": max(finished) - started, "per_min": len(jobs) / (max(finished) - min(created)) * 60,
        "total_mean": statistics.mean(totals), "total_max": max(totals),
        "queued_mean": statistics.mean(queued), "queued_max": max(queued),
        "created_after_sent": (min(created) - sent, max(created) - sent),
    }


def burst_table(r: dict) -> str:
    return "\n".join([
        ("| studies (instances) | all storescu done s | **first send → last job done s** | studies/min (job table) | "
         "mean total_s | max total_s | mean queued_s | max queued_s | jobs created, s after last send |"),
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {r['studies']} ({r['instances']}) | {r['send_s']:.1f} | **{r['wall_s']:.1f}** | {r['per_min']:.1f} | "
         f"{r['total_mean']:.2f} | {r['total_max']:.2f} | {r['queued_mean']:.1f} | {r['queued_max']:.1f} | "
         f"{r['created_after_sent'][0]:.1f} to {r['created_after_sent'][1]:.1f} |"),
    ])


# --- report --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"nproc {len(os.sched_getaffinity(0))}, {cpu}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def code_version() -> str:
    """The commit measured, and whether the code under test had uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "orthanc_plugin", "engines", "dicom_sr", "config")
    return f"code {commit}" + (" with uncommitted changes" if dirty else "")


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def record(text: str) -> None:
    """Put the section into RESULTS.md, replacing an earlier version of it."""
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = existing.find(SECTION)
    if start < 0:
        existing = existing.rstrip("\n") + "\n\n" + text + "\n"
    else:
        end = existing.find("\n## ", start + len(SECTION))
        tail = "" if end < 0 else existing[end:]
        existing = existing[:start] + text.rstrip("\n") + "\n" + tail
    RESULTS.write_text(existing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round; prints only")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write bench/RESULTS.md")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if not os.access(STORESCU, os.X_OK):
        sys.exit(f"{STORESCU} not found: install dcmtk")

    began, load_before, code = time.time(), load_average(), code_version()
    with tempfile.TemporaryDirectory(prefix="readout-bench-orthanc-") as name:
        tmp = Path(name)
        settings_path = write_settings(tmp)
        phantoms = write_phantoms(tmp / "phantoms", (*sizes["latency_seeds"], *sizes["burst_seeds"]))
        latency_phantoms = {s: phantoms[s] for s in sizes["latency_seeds"]}
        burst_phantoms = {s: phantoms[s] for s in sizes["burst_seeds"]}
        other = write_small_studies(tmp / "small-other", sizes["small_studies"], chest=False)
        chest = write_small_studies(tmp / "small-chest", sizes["small_studies"], chest=True)
        ingests = [
            Ingest("no match, TCP_NODELAY=1", other, True, sizes["rounds"], {"a": [], "b": []}),
            Ingest("**chest match (runner reads)**, TCP_NODELAY=1", chest, True, sizes["rounds"], {"a": [], "b": []}),
            Ingest("no match, DCMTK default (Nagle on)", other[:NAGLE_STUDIES], False, 1, {"a": [], "b": []}),
        ]
        warm_cache(tmp)
        print(f"data written in {time.time() - began:.0f} s", file=sys.stderr)

        with orthanc(settings_path, tmp / "flow", readout=True) as server:
            version = server.get("/system")["Version"]
            latency = measure_latency(server, latency_phantoms)
            burst = measure_burst(server, burst_phantoms, tmp)
        print(f"  burst: {json.dumps(burst)}", file=sys.stderr)
        for ingest in ingests:
            measure_ingest(settings_path, tmp, ingest)

    servers = 1 + sum(len(i.runs["b"]) for i in ingests)
    trouble = ", ".join(f"{n} {what}" for what, n in TROUBLE.items())
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python bench/orthanc.py" + (" --quick" if args.quick else "")
    n_latency = len(sizes["latency_seeds"]) - 1
    counts = [row["jobs_for_study"] for row in latency]
    one_job = ("Each study got exactly one job: its own SR/SEG arriving did not trigger another read."
               if set(counts) == {1} else f"**Jobs per study: {counts}** (expected one each).")
    text = f"""{SECTION}

{when}; {machine()}; Orthanc {version} (Python + DICOMweb plugins), dcmtk storescu; {code}; `{command}`;
{time.time() - began:.0f} s in all; load average (1/5/15 min) {load_before} at the start, {load_average()} at the end.
StableAge {STABLE_AGE_S} s; runner poll {RUNNER['poll_s']} s, heartbeat {RUNNER['heartbeat_s']} s; demo engine as shipped
(5 topics, 2 questions, 5 rollouts). The machine is shared with other work, so absolute seconds are noisy; the ingest
comparison is a ratio of runs interleaved in the same invocation for that reason.

**1. Stable study to SR stored**, one phantom study at a time (seeds {', '.join(map(str, sizes['latency_seeds']))}; the
first is a warm-up that loads the engine; then the median of {n_latency}); Orthanc run as `readout serve` runs it (DCMTK
defaults). "Stable" is the first 50 ms poll of GET /studies/{{id}} that says `IsStable` (the StableStudy `Date` in
/changes has second resolution); "stable → job created" is the runner's intake (change-log poll, study tags, rules);
"bookkeeping" is the job's time from claim to done not covered by its step timings (job-store writes); "stable → done"
ends at the job's `finished_at` (job store, ms resolution), when SR and SEG are stored. {one_job}

{latency_table(latency)}

**2. C-STORE ingest** of {SMALL_SIZE}x{SMALL_SIZE} CT instances ({SMALL_SLICES} slices of {SMALL_THICKNESS_MM} mm per
study), all in one `/usr/bin/storescu` association, to Orthanc with only the DICOMweb plugin (a) and with Readout (b,
timed once its runner is up); rounds in ABBA order, fresh storage every time; storescu's wall time. With DCMTK's
default (Nagle's algorithm on, since DCMTK 3.6.2) in storescu and in Orthanc, every small instance waits for a delayed
ACK: ingest is bound by ~40 ms stalls, not by CPU, and would hide any cost of the plugin; the main rows therefore run
both with TCP_NODELAY=1. Target b / a <= 1.05.

{ingest_table(ingests)}

**3. {len(burst_phantoms)} phantom studies at once** (seeds {min(burst_phantoms)}-{max(burst_phantoms)}), one
`/usr/bin/storescu` process each, all started together on the server of 1 (engine already loaded, DCMTK defaults);
every job ended done. Studies/min = jobs / (last `finished_at` - first `created_at`).

{burst_table(burst)}

Runner log over all {servers} Orthanc servers with Readout in this run: {trouble}.
"""
    print(text)
    if not (args.quick or args.no_record):
        record(text)


if __name__ == "__main__":
    main()
