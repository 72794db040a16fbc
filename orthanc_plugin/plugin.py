"""The part of Readout that lives inside Orthanc: admin routes, the runner's supervisor, metrics.

The only module that imports Orthanc's `orthanc`. Nothing slow runs here: reads happen in the
runner, a separate process this module starts when Orthanc is up, restarts if it dies and
stops with Orthanc. New studies reach the runner through Orthanc's change log (see
`intake.py`), so no change callback has to do (or persist) anything.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from typing import Any

import orthanc

from orthanc_plugin.api import AdminApi
from orthanc_plugin.jobs import JobStore
from orthanc_plugin.orthanc_client import OrthancError
from orthanc_plugin.settings import load_settings

METRICS_EVERY_S = 5.0
RESTART_DELAY_S = (1, 2, 5, 10, 30)  # after the runner's 1st, 2nd ... consecutive quick exit


class _InOrthanc:
    """Orthanc's REST API through the plugin SDK (the admin routes' view of the server)."""

    def get_json(self, path: str) -> Any:
        try:
            return json.loads(orthanc.RestApiGet(path))
        except orthanc.OrthancException as error:
            raise OrthancError(f"GET {path}: {error}", 404) from None

    def post_json(self, path: str, body: Any) -> Any:
        try:
            return json.loads(orthanc.RestApiPost(path, json.dumps(body)))
        except orthanc.OrthancException as error:
            raise OrthancError(f"POST {path}: {error}", 400) from None


class _OrthancLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = f"Readout: {self.format(record)}"
        if record.levelno >= logging.ERROR:
            orthanc.LogError(message)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(message)
        else:
            orthanc.LogInfo(message)


class Supervisor:
    """Keeps one runner process alive while Orthanc runs."""

    def __init__(self, command: list[str], environment: dict[str, str]) -> None:
        self.command = command
        self.environment = environment
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._watch, name="readout-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _watch(self) -> None:
        quick_exits = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            self.process = subprocess.Popen(self.command, env=self.environment)
            logging.getLogger("readout").info("runner started (pid %d)", self.process.pid)
            while self.process.poll() is None and not self.stopping.wait(0.5):
                pass
            if self.stopping.is_set():
                return
            quick_exits = quick_exits + 1 if time.monotonic() - started < 60 else 0
            delay = RESTART_DELAY_S[min(quick_exits, len(RESTART_DELAY_S) - 1)]
            logging.getLogger("readout").warning("runner exited (code %s); restarting in %d s", self.process.returncode, delay)
            self.stopping.wait(delay)

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.thread.join(timeout=15)


def register() -> None:
    """Called by the file Orthanc loads: wire the routes and the runner's life to Orthanc's."""
    handler = _OrthancLog()
    log = logging.getLogger("readout")
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    config = json.loads(orthanc.GetConfiguration()).get("Readout", {})
    settings = load_settings(config["Settings"])
    store = JobStore(config.get("Database") or settings.database)
    api = AdminApi(store, settings, _InOrthanc())
    state: dict[str, Any] = {}

    def rest(output, uri: str, **request) -> None:
        query = dict(request.get("get", {}))
        status, answer = api.handle(request["method"], request["groups"][0], query, request.get("body") or b"")
        body = json.dumps(answer, indent=1)
        if status < 300:
            output.AnswerBuffer(body, "application/json")
        elif status == 405:  # Orthanc insists on its dedicated method (and sets the Allow header)
            output.SendMethodNotAllowed(answer["allow"])
        else:
            output.SendHttpStatus(status, body, len(body))

    def metrics() -> None:
        while not state["stopping"].wait(METRICS_EVERY_S):
            try:
                counts = store.counts()
                for name, value in counts.items():
                    orthanc.SetMetricsValue(f"readout_jobs_{name}", value, orthanc.MetricsType.DEFAULT)
                durations = [j.timings.get("total_s", 0.0) for j in store.list(state="done", limit=50)]
                if durations:
                    orthanc.SetMetricsValue("readout_job_seconds_mean_last50", sum(durations) / len(durations),
                                            orthanc.MetricsType.DEFAULT)
            except Exception:  # metrics must never take Orthanc down
                log.exception("metrics update failed")

    def on_change(change_type, level, resource) -> None:
        if change_type == orthanc.ChangeType.ORTHANC_STARTED:
            port = json.loads(orthanc.GetConfiguration()).get("HttpPort", 8042)
            environment = dict(os.environ, READOUT_ORTHANC_TOKEN=orthanc.GenerateRestApiAuthorizationToken())
            command = [config["Python"], "-m", "orthanc_plugin.cli", "runner", "--orthanc", f"http://127.0.0.1:{port}",
                       "--settings", config["Settings"], "--database", str(store.path), "--parent-pid", str(os.getpid())]
            state["stopping"] = threading.Event()
            state["supervisor"] = Supervisor(command, environment)
            state["supervisor"].start()
            state["metrics"] = threading.Thread(target=metrics, name="readout-metrics", daemon=True)
            state["metrics"].start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED and "supervisor" in state:
            state["stopping"].set()
            state["supervisor"].stop()

    orthanc.RegisterRestCallback("/readout/(.*)", rest)
    orthanc.RegisterOnChangeCallback(on_change)
    log.info("plugin registered; job store %s", store.path)
