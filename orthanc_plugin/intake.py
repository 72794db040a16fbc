"""Intake: stable studies become jobs, one per matching rule.

The trigger is Orthanc's own change log (`/changes`, StableStudy entries) read from a cursor
kept in the job store. The log survives restarts, so studies that became stable while the
runner (or the whole plugin) was down are read when it comes back, and a runner on another
machine sees the same events as one started by the plugin. Studies that were still arriving
when Orthanc stopped never get a StableStudy entry; `Intake.catch_up` finds them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from orthanc_plugin.jobs import Job, JobStore
from orthanc_plugin.orthanc_client import OrthancError
from orthanc_plugin.rules import Rule, RuleSet, SeriesChoice, select_series
from orthanc_plugin.studies import GetJson, StoredStudy, read_study

log = logging.getLogger("readout.intake")
CURSOR = "changes_cursor"
PAGE = 100  # changes read per poll
PENDING = "studies_not_yet_stable"  # Orthanc ids of studies seen arriving, not yet stable


def enqueue_read(store: JobStore, study: StoredStudy, rule: Rule) -> Job:
    """A job reading ``study`` by ``rule``; when no series fits, a failed job that says why."""
    choice = select_series(rule, study.info)
    common: dict[str, Any] = {
        "study_id": study.info.orthanc_id, "study_instance_uid": study.study_instance_uid, "rule": rule.name,
        "engine": rule.engine, "request": rule.to_json(), "fingerprint": study.fingerprint,
        "priority": rule.priority, "destinations": rule.destinations,
    }
    if choice.series is None:
        return store.enqueue(**common, series=series_record(choice), state="failed", error=choice.summary())
    return store.enqueue(**common, series=series_record(choice))


def series_record(choice: SeriesChoice) -> dict[str, Any]:
    """What a job keeps of its series choice: the series read (if any) and why each was taken or not."""
    if choice.series is None:
        return {"reasons": choice.reasons}
    tags = choice.series.tags
    return {"id": choice.series.orthanc_id, "series_instance_uid": tags.get("SeriesInstanceUID", ""),
            "number": tags.get("SeriesNumber", ""), "description": tags.get("SeriesDescription", ""),
            "instances": choice.series.instances, "reasons": choice.reasons}


class Intake:
    """Turns StableStudy changes into jobs; skips studies whose source images were already read."""

    def __init__(self, store: JobStore, get_json: GetJson, rules: Callable[[], RuleSet]) -> None:
        self.store = store
        self.get_json = get_json
        self.rules = rules

    def study_stable(self, study_id: str) -> list[Job]:
        """Enqueue the reads a newly stable study needs (none when only Readout's outputs are new)."""
        study = read_study(self.get_json, study_id)
        if not study.has_sources:
            return []
        jobs = []
        for rule in self.rules().match(study.info):
            latest = self.store.latest(study_id, rule.name)
            if latest is not None and latest.fingerprint == study.fingerprint:
                continue  # same source images: our own outputs arrived, or a repeated event
            job = enqueue_read(self.store, study, rule)
            log.info("job %d: study %s, rule %s, read %d, %s", job.id, study_id, rule.name, job.version, job.state)
            jobs.append(job)
        return jobs

    def poll(self) -> int:
        """Handle the changes since the cursor; returns how many were read (``PAGE`` = more wait).

        The first poll on a new job store starts from the newest change: installing Readout on
        a full PACS must not read its whole history.
        """
        cursor = self.store.get_setting(CURSOR)
        if cursor is None:
            self.store.set_setting(CURSOR, self.get_json("/changes?last")["Last"])
            return 0
        answer = self.get_json(f"/changes?since={cursor}&limit={PAGE}")
        before = set(self.store.get_setting(PENDING, []))
        pending = set(before)
        for change in answer["Changes"]:
            if change["ChangeType"] == "NewSeries":
                pending.add(self._parent_study(change["ID"]))
            elif change["ChangeType"] == "StableStudy":
                self._stable(change["ID"])
                pending.discard(change["ID"])
        pending.discard(None)
        if pending != before:
            self.store.set_setting(PENDING, sorted(pending))
        last = answer["Changes"][-1]["Seq"] if answer["Changes"] else answer["Last"]
        if last > cursor:
            self.store.set_setting(CURSOR, last)
        return len(answer["Changes"])

    def catch_up(self) -> int:
        """Read studies that received images but never became stable in Orthanc's eyes.

        Orthanc keeps its stability timers in memory: a study still receiving when Orthanc
        stopped never gets a StableStudy change. After a restart Orthanc calls such a study
        stable, so a pending study that Orthanc now calls stable is handled here.
        """
        pending = self.store.get_setting(PENDING, [])
        done = []
        for study_id in pending:
            try:
                stable = self.get_json(f"/studies/{study_id}")["IsStable"]
            except OrthancError as error:
                if error.status != 404:
                    raise
                stable = None  # deleted
            if stable:
                self._stable(study_id)
            if stable is not False:
                done.append(study_id)
        if done:
            left = set(self.store.get_setting(PENDING, [])) - set(done)
            self.store.set_setting(PENDING, sorted(left))
        return len(done)

    def _stable(self, study_id: str) -> None:
        try:
            self.study_stable(study_id)
        except OrthancError as error:
            if error.status != 404:
                raise  # Orthanc is unwell: the cursor stays and the change is handled again
            log.info("study %s was deleted before it could be read", study_id)

    def _parent_study(self, series_id: str) -> str | None:
        try:
            return self.get_json(f"/series/{series_id}")["ParentStudy"]
        except OrthancError as error:
            if error.status != 404:
                raise
            return None
