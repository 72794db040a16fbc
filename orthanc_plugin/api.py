"""The admin REST API under `/readout/`, as plain functions of (method, path, query, body).

The plugin routes Orthanc's REST callbacks here, so every route sits behind Orthanc's own
authentication; the handlers know nothing of Orthanc's Python module, which keeps them
testable without a server. Answers are JSON; a bad request gets a 4xx with a message.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Protocol

from orthanc_plugin.active_rules import ActiveRules
from orthanc_plugin.intake import enqueue_read
from orthanc_plugin.jobs import STATES, JobError, JobStore
from orthanc_plugin.orthanc_client import OrthancError
from orthanc_plugin.rules import RulesError
from orthanc_plugin.settings import Settings
from orthanc_plugin.studies import StoredStudy, read_study

# An explicit read (POST /readout/jobs without a rule) reads the thinnest CT series that is not a localizer.
DEFAULT_SERIES = {"modality": "CT", "image_type_excludes": ["LOCALIZER"], "min_slices": 3, "pick": "thinnest"}
RUNNER_STALE_S = 30.0


class Orthanc(Protocol):
    def get_json(self, path: str) -> Any: ...
    def post_json(self, path: str, body: Any) -> Any: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminApi:
    def __init__(self, store: JobStore, settings: Settings, orthanc: Orthanc) -> None:
        self.store = store
        self.settings = settings
        self.orthanc = orthanc
        self.rules = ActiveRules(settings, store)

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        """Answer one request: (HTTP status, JSON-serializable body)."""
        routes = [
            ("GET", r"jobs", self.list_jobs), ("POST", r"jobs", self.create_job),
            ("GET", r"jobs/(\d+)", self.get_job), ("POST", r"jobs/(\d+)/retry", self.retry_job),
            ("POST", r"jobs/(\d+)/cancel", self.cancel_job), ("GET", r"rules", self.get_rules),
            ("PUT", r"rules", self.put_rules), ("POST", r"rules/test", self.test_rules),
            ("GET", r"engines", self.engines), ("GET", r"health", self.health),
        ]
        path = path.strip("/")
        allowed = []
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                allowed.append(verb)
                if verb == method:
                    try:
                        return handler(*match.groups(), query=query, body=body)
                    except ApiError as error:
                        return error.status, {"error": str(error)}
                    except JobError as error:
                        return (404 if str(error).startswith("no job") else 409), {"error": str(error)}
        if allowed:
            return 405, {"error": f"{method} not allowed on /readout/{path}; use {', '.join(allowed)}",
                         "allow": ",".join(allowed)}
        return 404, {"error": f"no such endpoint: /readout/{path}"}

    # --- jobs ----------------------------------------------------------------------------------

    def list_jobs(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        state = query.get("state")
        if state and state not in STATES:
            raise ApiError(400, f"unknown state {state!r}; states: {', '.join(STATES)}")
        try:
            limit = int(query.get("limit", 100))
        except ValueError:
            raise ApiError(400, "limit must be an integer") from None
        jobs = self.store.list(state=state, study=query.get("study"), limit=limit)
        return 200, [job.to_json() for job in jobs]

    def get_job(self, job_id: str, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, self.store.get(int(job_id)).to_json()

    def retry_job(self, job_id: str, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, self.store.retry(int(job_id)).to_json()

    def cancel_job(self, job_id: str, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, self.store.cancel(int(job_id)).to_json()

    def create_job(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        """Read a study now: ``{"study", "rule"}`` or ``{"study", "engine", "topics", "questions", ...}``."""
        request = _json_object(body)
        study = self._study(request)
        if "rule" in request:
            try:
                rule = self.rules.get().get(request["rule"])
            except KeyError:
                raise ApiError(404, f"no rule named {request['rule']!r}") from None
        else:
            if "engine" not in request:
                raise ApiError(400, "give a rule name, or an engine (with topics, questions, destinations, series)")
            spec = {"name": "api", "engine": request["engine"], "series": request.get("series", DEFAULT_SERIES)}
            spec.update({k: request[k] for k in ("topics", "questions", "destinations") if k in request})
            try:
                rule = self.rules.validate({"rules": [spec]}).rules[0]
            except RulesError as error:
                raise ApiError(400, str(error).replace("$.rules[0]", "$")) from None
        return 200, enqueue_read(self.store, study, rule).to_json()

    def _study(self, request: dict) -> StoredStudy:
        key = request.get("study")
        if not isinstance(key, str) or not key:
            raise ApiError(400, '"study" must be an Orthanc study id or a StudyInstanceUID')
        found = self.orthanc.post_json("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": key}})
        study_id = found[0] if found else key
        try:
            return read_study(self.orthanc.get_json, study_id)
        except OrthancError:
            raise ApiError(404, f"no study {key!r} in Orthanc") from None

    # --- rules ---------------------------------------------------------------------------------

    def get_rules(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        active = self.rules.get()
        return 200, {"file": str(self.settings.rules_path), "active": active.to_json(), "file_error": self.rules.error}

    def put_rules(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        try:
            rules = self.rules.replace(body.decode("utf-8"))
        except (RulesError, UnicodeDecodeError) as error:
            raise ApiError(400, f"rules refused; the previous rules stay active. {error}") from None
        self.rules.get()
        return 200, {"active": rules.to_json()}

    def test_rules(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        request = _json_object(body)
        study = self._study(request)
        answer = self.rules.get().explain(study.info)
        answer.update(study=study.info.orthanc_id, source_series=len(study.info.series),
                      readout_series=len(study.output_series))
        return 200, answer

    # --- installation --------------------------------------------------------------------------

    def engines(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, [{"name": name, "settings": {k: v for k, v in options.items() if k != "factory"}}
                     for name, options in self.settings.engines.items()]

    def health(self, *, query: dict[str, str], body: bytes) -> tuple[int, Any]:
        seen = self.store.get_setting("runner_seen")
        age = None if seen is None else round(time.time() - seen["at"], 1)
        runner_ok = age is not None and age < RUNNER_STALE_S
        rules_error = self.rules.error
        return 200, {
            "status": "ok" if runner_ok and not rules_error else "degraded",
            "runner": {"last_seen_s_ago": age, "ok": runner_ok},
            "rules": {"active": len(self.rules.get().rules), "file_error": rules_error},
            "jobs": self.store.counts(),
        }


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return value
