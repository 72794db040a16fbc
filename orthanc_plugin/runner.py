"""The runner: a process of its own that takes jobs from the store and carries them out.

Started and supervised by the plugin, or on its own against any Orthanc
(`readout runner --orthanc URL`). Each engine is loaded once. A job is claimed under a lease
that a heartbeat thread renews; each step (fetch, load, read, write, store) updates the job's
step, progress and timings. Transient trouble (Orthanc unreachable) is retried with backoff;
bad input fails the job at once with the reason; the study itself is never touched.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from importlib import import_module
from pathlib import Path
from typing import Any

import pydicom

from dicom_sr.seg import write_segmentation
from dicom_sr.sr import write_report
from engines.errors import CheckpointError, EngineError
from engines.results import FindingsError
from engines.series import load_study_volume
from engines.volume import VolumeError
from orthanc_plugin.active_rules import ActiveRules
from orthanc_plugin.destinations import deliver
from orthanc_plugin.intake import PAGE, Intake, series_record
from orthanc_plugin.jobs import Job, JobStore
from orthanc_plugin.orthanc_client import OrthancClient, OrthancError
from orthanc_plugin.rules import select_series
from orthanc_plugin.settings import Settings, load_settings
from orthanc_plugin.studies import read_study

log = logging.getLogger("readout.runner")
CATCH_UP_EVERY_S = 10.0  # how often studies seen arriving but never called stable are looked at
SEEN_EVERY_S = 5.0  # how often the runner notes in the store that it is alive (GET /readout/health)
REQUEST_OPTIONS = ("rollouts", "temperature", "pruning", "reground", "entropy_threshold")


class Cancelled(Exception):
    """The job was cancelled or taken over while this runner worked on it."""


class NoSeriesFits(ValueError):
    """No series of the study fits the job's rule."""


BAD_INPUT = (VolumeError, EngineError, FindingsError, CheckpointError, NoSeriesFits)


def load_engine(name: str, options: dict[str, Any]):
    """An engine by name: ``factory`` ("module:callable") in its settings, else Readout's registry.

    The engine's settings other than the read-request options (``rollouts`` ...) are its
    constructor's arguments, e.g. ``model_path`` and ``device`` for medgemma.
    """
    arguments = {k: v for k, v in options.items() if k != "factory" and k not in REQUEST_OPTIONS}
    factory = options.get("factory")
    if factory:
        module, _, attribute = factory.partition(":")
        return getattr(import_module(module), attribute)(**arguments)
    # torch: only when an engine is really needed
    from engines.registry import create_engine

    return create_engine(name, **arguments)


class Runner:
    def __init__(self, client: OrthancClient, store: JobStore, settings: Settings, *,
                 owner: str | None = None, parent_pid: int | None = None) -> None:
        self.client = client
        self.store = store
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.parent_pid = parent_pid
        self.engines: dict[str, Any] = {}
        self._seen = 0.0
        self._caught_up = 0.0
        self.rules = ActiveRules(settings, store)
        self.intake = Intake(store, client.get_json, self.rules.get)

    # --- the loop ------------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("runner %s started", self.owner)
        self.rules.get()
        while not stop.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.info("Orthanc (pid %d) is gone: runner stops", self.parent_pid)
                return
            try:
                busy = self.run_once()
            except OrthancError as error:
                log.warning("Orthanc unavailable (%s); waiting", error)
                busy = False
                stop.wait(max(2.0, self.settings.poll_s))
            if time.time() - self._seen > SEEN_EVERY_S:
                self._seen = time.time()
                self.store.set_setting("runner_seen", {"owner": self.owner, "at": self._seen})
            if not busy:
                stop.wait(self.settings.poll_s)

    def run_once(self) -> bool:
        """One round: intake, then one job, then due deliveries. True when there was work."""
        # A full page of changes means more are waiting; fewer means intake has caught up, and
        # the loop may rest: polling flat out while Orthanc ingests would slow the ingest down.
        busy = self.intake.poll() == PAGE
        if time.time() - self._caught_up > CATCH_UP_EVERY_S:
            self._caught_up = time.time()
            busy = self.intake.catch_up() > 0 or busy
        job = self.store.claim(self.owner, self.settings.lease_s)
        if job is not None:
            self.execute(job)
            busy = True
        for job, name in self.store.due_deliveries(stale_after_s=self.settings.forward_timeout_s + 30):
            deliver(self.store, self.client, self.settings, job, name)
            busy = True
        return busy

    # --- one job -------------------------------------------------------------------------------

    def execute(self, job: Job) -> None:
        log.info("job %d: claimed (attempt %d), rule %s, engine %s", job.id, job.attempts, job.rule, job.engine)
        lost = threading.Event()
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self.settings.heartbeat_s):
                if not self.store.heartbeat(job.id, self.owner, self.settings.lease_s):
                    lost.set()
                    return

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            self._steps(job, lost)
        except Cancelled:
            log.info("job %d: cancelled or taken over; stopped", job.id)
        except BAD_INPUT as error:
            log.info("job %d: failed: %s", job.id, error)
            self.store.fail(job.id, str(error), owner=self.owner)
        except OrthancError as error:
            self._retry_or_fail(job, str(error))
        except Exception as error:  # a bug or a broken engine: record it on the job, keep running
            log.exception("job %d: internal error", job.id)
            self._retry_or_fail(job, f"internal error: {type(error).__name__}: {error}")
        finally:
            done.set()
            beat.join()

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        if job.attempts >= self.settings.read_attempts:
            self.store.fail(job.id, f"{reason} (gave up after {job.attempts} attempts)", owner=self.owner)
        else:
            delay = self.settings.read_backoff_s * 2 ** (job.attempts - 1)
            log.info("job %d: %s; retrying in %.0f s", job.id, reason, delay)
            self.store.fail(job.id, reason, retry_in_s=delay, owner=self.owner)

    def _step(self, job: Job, lost: threading.Event, step: str, progress: float, state: str = "running") -> None:
        if lost.is_set() or not self.store.update(job.id, self.owner, step=step, progress=progress, state=state):
            raise Cancelled
        log.info("job %d: %s", job.id, step)

    def _steps(self, job: Job, lost: threading.Event) -> None:
        timings: dict[str, float] = {"queued_s": round(time.time() - job.created_at, 3)} if job.attempts == 1 else {}
        # torch: only in the runner, only when reading
        from engines.report import ReadRequest


        def timed(name: str, started: float) -> None:
            timings[name] = round(time.monotonic() - started, 3)
            self.store.update(job.id, self.owner, timings={**job.timings, **timings})

        options = self.settings.engines.get(job.engine)
        if options is None:
            raise EngineError(f"engine {job.engine!r} is not configured on this runner "
                              f"(configured: {', '.join(self.settings.engines) or 'none'})")
        if not (job.series or {}).get("id"):
            job = self._select_again(job)
        with tempfile.TemporaryDirectory(prefix="readout-") as folder:
            self._step(job, lost, "fetching", 5)
            started = time.monotonic()
            self.client.download_series(job.series["id"], Path(folder))
            timed("fetch_s", started)

            self._step(job, lost, "loading", 20)
            started = time.monotonic()
            volume, _ = load_study_volume(Path(folder))
            timed("load_s", started)

        self._step(job, lost, "reading", 30)
        started = time.monotonic()
        if job.engine not in self.engines:
            self.engines[job.engine] = load_engine(job.engine, options)
            timed("engine_load_s", started)
            started = time.monotonic()
        request = ReadRequest(topics=tuple(job.request["topics"]), questions=tuple(job.request["questions"]),
                              **{k: options[k] for k in REQUEST_OPTIONS if k in options})
        result = self.engines[job.engine].run(volume, request)
        timed("engine_s", started)

        self._step(job, lost, "writing", 85)
        started = time.monotonic()
        seg = write_segmentation(result, volume, rule=job.rule, read=job.version)
        sr = write_report(result, volume, seg, rule=job.rule, read=job.version, predecessor=self._predecessor(job))
        outputs: dict[str, Any] = {"sr": sr.SOPInstanceUID, "seg": seg.SOPInstanceUID if seg is not None else None,
                                   "findings": sum(len(t.findings) for t in result.topics), "report": result.as_text()}
        timed("write_s", started)
        self.store.update(job.id, self.owner, outputs=outputs)

        self._step(job, lost, "storing", 90, state="storing")
        started = time.monotonic()
        outputs["sr_orthanc_id"] = self.client.store_instance(_encode(sr))
        if seg is not None:
            outputs["seg_orthanc_id"] = self.client.store_instance(_encode(seg))
        outputs["stored"] = True
        timed("store_s", started)
        timings["total_s"] = round(sum(v for k, v in timings.items() if k != "queued_s"), 3)
        self.store.update(job.id, self.owner, outputs=outputs, timings={**job.timings, **timings})
        finished = self.store.finish_storing(job.id, self.owner)
        log.info("job %d: stored (%d findings), %s", job.id, outputs["findings"], finished.state)

    def _select_again(self, job: Job) -> Job:
        """Choose the series of a job that had none: an admin retried it, likely after changing the
        rules, so the rule of that name as it is now applies (the job's own copy if it is gone)."""
        study = read_study(self.client.get_json, job.study_id)
        try:
            rule = self.rules.get().get(job.rule)
        except KeyError:
            rule = self.rules.validate({"rules": [job.request]}).rules[0]
        choice = select_series(rule, study.info)
        if choice.series is None:
            raise NoSeriesFits(choice.summary())
        self.store.update(job.id, self.owner, series=series_record(choice), request=rule.to_json())
        return self.store.get(job.id)

    def _predecessor(self, job: Job) -> pydicom.Dataset | None:
        """The SR of the newest earlier read of this study by this rule that stored one."""
        for earlier in self.store.list(study=job.study_id, limit=1000):  # newest first
            if earlier.rule == job.rule and earlier.version < job.version and earlier.outputs.get("sr_orthanc_id"):
                data = self.client.instance_file(earlier.outputs["sr_orthanc_id"])
                return pydicom.dcmread(io.BytesIO(data))
        return None


def _encode(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def run_runner(orthanc_url: str, settings_path: Path | None, database: Path | None, user: str | None,
               parent_pid: int | None) -> None:
    """Run jobs for the Orthanc at ``orthanc_url`` until stopped (the `readout runner` command).

    Credentials come from the environment: READOUT_ORTHANC_TOKEN (what the plugin passes its
    runner) or, with ``user``, READOUT_ORTHANC_PASSWORD.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines narrate every copied module
    settings = load_settings(settings_path) if settings_path else load_settings()
    auth = (user, os.environ.get("READOUT_ORTHANC_PASSWORD", "")) if user else None
    client = OrthancClient(orthanc_url, token=os.environ.get("READOUT_ORTHANC_TOKEN"), auth=auth)
    store = JobStore(database or settings.database)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Runner(client, store, settings, parent_pid=parent_pid).run_forever(stop)
