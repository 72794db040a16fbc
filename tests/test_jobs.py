"""orthanc_plugin.jobs: the SQLite job store — versions, claims and leases, retries, destinations."""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from orthanc_plugin.jobs import FINAL, STATES, Job, JobError, JobStore

LONG = 60.0  # a lease that does not run out during a test


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "db" / "jobs.sqlite")


def add(store: JobStore, study: str = "orthanc-study-1", rule: str = "chest", **extra: Any) -> Job:
    """Enqueue a job with plausible defaults; ``extra`` overrides any of them."""
    args: dict[str, Any] = {
        "study_id": study, "study_instance_uid": f"1.2.3.{study}", "rule": rule,
        "engine": "phantom", "request": {"rule": rule, "topics": ["lung"]}, "fingerprint": "abc123",
    }
    return store.enqueue(**{**args, **extra})


def forwarding(store: JobStore, *destinations: str) -> Job:
    """A job whose outputs are stored and that now forwards them to ``destinations``."""
    job = add(store, destinations=destinations)
    store.claim("runner-a", LONG)
    store.update(job.id, "runner-a", state="storing", outputs={"stored": True, "sr_orthanc_id": "sr1"})
    finished = store.finish_storing(job.id, "runner-a")
    assert finished.state == "forwarding"
    return finished


# --- enqueue -----------------------------------------------------------------------------------


def test_enqueue_fills_fields(store):
    job = add(store, priority=3, destinations=("pacs", "web"), series={"chosen": "s1"})
    assert job.id >= 1
    assert (job.study_id, job.rule, job.engine, job.fingerprint) == ("orthanc-study-1", "chest", "phantom", "abc123")
    assert job.study_instance_uid.startswith("1.2.3.")
    assert job.request == {"rule": "chest", "topics": ["lung"]}
    assert job.priority == 3 and job.version == 1
    assert job.state == "queued" and job.step == "" and job.progress == 0 and job.error is None
    assert job.attempts == 0 and job.next_attempt_at is None
    assert job.lease_owner is None and job.lease_expires_at is None
    assert job.series == {"chosen": "s1"}
    assert job.timings == {} and job.outputs == {}
    assert job.destinations == {"pacs": {"state": "pending", "attempts": 0}, "web": {"state": "pending", "attempts": 0}}
    assert job.created_at == pytest.approx(time.time(), abs=5) and job.updated_at == job.created_at
    assert job.finished_at is None
    assert store.get(job.id) == job


def test_version_counts_reads_of_the_same_study_and_rule(store):
    assert [add(store).version for _ in range(3)] == [1, 2, 3]
    assert add(store, rule="head").version == 1
    assert add(store, study="orthanc-study-2").version == 1
    assert add(store).version == 4
    assert store.latest("orthanc-study-1", "chest").version == 4
    assert store.latest("orthanc-study-1", "head").version == 1
    assert store.latest("orthanc-study-1", "abdomen") is None


def test_job_enqueued_failed_is_final(store):
    job = add(store, state="failed", error="no axial CT series")
    assert job.state == "failed" and job.error == "no axial CT series"
    assert job.finished_at is not None
    assert store.claim("runner-a", LONG) is None


def test_enqueue_refuses_unknown_state(store):
    with pytest.raises(ValueError):
        add(store, state="queud")


# --- claim -------------------------------------------------------------------------------------


def test_claim_takes_higher_priority_first_then_oldest(store):
    low = add(store, study="a")
    high_old = add(store, study="b", priority=5)
    high_new = add(store, study="c", priority=5)
    order = [store.claim("runner-a", LONG).id for _ in range(3)]
    assert order == [high_old.id, high_new.id, low.id]
    assert store.claim("runner-a", LONG) is None


def test_claim_sets_running_attempts_and_lease(store):
    queued = add(store)
    before = time.time()
    job = store.claim("runner-a", 30.0)
    assert job.id == queued.id
    assert job.state == "running" and job.step == "claimed"
    assert job.attempts == 1
    assert job.lease_owner == "runner-a"
    assert before + 30.0 <= job.lease_expires_at <= time.time() + 30.0


def test_claim_returns_none_when_nothing_runnable(store):
    assert store.claim("runner-a", LONG) is None
    job = add(store)
    store.cancel(job.id)
    assert store.claim("runner-a", LONG) is None


def test_retrying_job_is_claimable_only_when_due(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.fail(job.id, "Orthanc is busy", retry_in_s=LONG, owner="runner-a")
    assert store.get(job.id).state == "retrying"
    assert store.claim("runner-b", LONG) is None
    store.update(job.id, next_attempt_at=time.time() - 1)
    again = store.claim("runner-b", LONG)
    assert again.id == job.id and again.attempts == 2 and again.lease_owner == "runner-b"
    assert again.error is None and again.next_attempt_at is None


def test_expired_lease_is_claimed_by_another_owner(store):
    job = add(store)
    store.claim("runner-a", 0.05)
    time.sleep(0.07)
    taken = store.claim("runner-b", LONG)
    assert taken.id == job.id and taken.lease_owner == "runner-b" and taken.attempts == 2
    assert store.heartbeat(job.id, "runner-a", LONG) is False
    assert store.update(job.id, "runner-a", step="segmenting") is False
    assert store.get(job.id).step == "claimed"


def test_expired_storing_lease_is_claimed_too(store):
    job = add(store)
    store.claim("runner-a", 0.05)
    assert store.update(job.id, "runner-a", state="storing")
    time.sleep(0.07)
    taken = store.claim("runner-b", LONG)
    assert taken.id == job.id and taken.state == "running" and taken.lease_owner == "runner-b"


def test_live_lease_is_not_claimed(store):
    add(store)
    store.claim("runner-a", LONG)
    assert store.claim("runner-b", LONG) is None


def _claim_all(path: str, owner: str, start: Any, out: Any) -> None:
    """Claim until nothing is left (at most 100 times); report the ids, or the error, so the test never hangs."""
    claimed: list[int] | str = []
    try:
        store = JobStore(path)
        start.wait(timeout=30)
        for _ in range(100):
            job = store.claim(owner, LONG)
            if job is None:
                break
            claimed.append(job.id)
    except Exception as error:  # noqa: BLE001 - the parent reports it instead of waiting on a dead worker
        claimed = f"{type(error).__name__}: {error}"
    out.put((owner, claimed))


def test_concurrent_claims_never_share_a_job(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    ids = [add(store, study=f"study-{i}").id for i in range(20)]
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(str(path), f"runner-{i}", start, out)) for i in range(4)]
    for worker in workers:
        worker.start()
    results = dict(out.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0
    errors = {owner: r for owner, r in results.items() if isinstance(r, str)}
    assert not errors, errors
    claimed = [job_id for owner_ids in results.values() for job_id in owner_ids]
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert sorted(claimed) == ids
    for owner, owner_ids in results.items():
        assert all(store.get(i).lease_owner == owner for i in owner_ids)
    assert all(store.get(i).attempts == 1 for i in ids)


# --- heartbeat and update ----------------------------------------------------------------------


def test_heartbeat_renews_only_for_the_owner(store):
    job = add(store)
    first = store.claim("runner-a", 1.0).lease_expires_at
    assert store.heartbeat(job.id, "runner-a", LONG) is True
    assert store.get(job.id).lease_expires_at > first + 30
    assert store.heartbeat(job.id, "runner-b", 1000.0) is False
    assert store.get(job.id).lease_expires_at < time.time() + 100


def test_heartbeat_false_after_cancel(store):
    job = add(store)
    store.claim("runner-a", LONG)
    cancelled = store.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.lease_owner is None and cancelled.finished_at is not None
    assert store.heartbeat(job.id, "runner-a", LONG) is False
    assert store.update(job.id, "runner-a", state="storing") is False
    assert store.get(job.id).state == "cancelled"


def test_update_with_owner_applies_only_while_owner_holds_lease(store):
    job = add(store)
    assert store.update(job.id, "runner-a", step="nope") is False  # queued: nobody holds it
    store.claim("runner-a", LONG)
    assert store.update(job.id, "runner-b", step="nope") is False
    assert store.update(job.id, "runner-a", step="segmenting", progress=40.0, timings={"load_s": 1.5}) is True
    got = store.get(job.id)
    assert (got.step, got.progress, got.timings) == ("segmenting", 40.0, {"load_s": 1.5})
    assert store.update(job.id, step="admin") is True  # no owner: always applies
    assert store.update(10_000, step="x") is False


def test_update_refuses_unknown_field_and_state(store):
    job = add(store)
    with pytest.raises(TypeError, match="priority"):
        store.update(job.id, priority=9)
    with pytest.raises(ValueError, match="finished"):
        store.update(job.id, state="finished")
    assert store.get(job.id).state == "queued" and store.get(job.id).priority == 0


def test_update_leaving_active_state_clears_lease(store):
    job = add(store)
    store.claim("runner-a", LONG)
    assert store.update(job.id, "runner-a", state="storing")
    assert store.get(job.id).lease_owner == "runner-a"  # storing is still under the lease
    assert store.update(job.id, "runner-a", state="forwarding")
    got = store.get(job.id)
    assert got.lease_owner is None and got.lease_expires_at is None and got.finished_at is None


@pytest.mark.parametrize("state", FINAL)
def test_final_states_set_finished_at(store, state):
    job = add(store)
    store.claim("runner-a", LONG)
    assert store.update(job.id, "runner-a", state=state)
    got = store.get(job.id)
    assert got.finished_at == pytest.approx(time.time(), abs=5)
    assert got.lease_owner is None


def test_add_timing_keeps_the_others(store):
    job = add(store)
    store.add_timing(job.id, "load_s", 1.23456)
    store.add_timing(job.id, "infer_s", 2.0)
    assert store.get(job.id).timings == {"load_s": 1.235, "infer_s": 2.0}


# --- fail, retry, cancel -----------------------------------------------------------------------


def test_fail_without_retry_is_final(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.fail(job.id, "not a CT", owner="runner-a")
    got = store.get(job.id)
    assert got.state == "failed" and got.error == "not a CT"
    assert got.finished_at is not None and got.next_attempt_at is None and got.lease_owner is None


def test_fail_with_retry_schedules_next_attempt(store):
    job = add(store)
    store.claim("runner-a", LONG)
    before = time.time()
    store.fail(job.id, "Orthanc timed out", retry_in_s=20.0, owner="runner-a")
    got = store.get(job.id)
    assert got.state == "retrying" and got.error == "Orthanc timed out"
    assert before + 20.0 <= got.next_attempt_at <= time.time() + 20.0
    assert got.finished_at is None and got.lease_owner is None


def test_fail_by_an_owner_that_lost_the_lease_is_ignored(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.cancel(job.id)
    store.fail(job.id, "late", owner="runner-a")
    assert store.get(job.id).state == "cancelled"


def test_retry_failed_job_requeues_it(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.update(job.id, "runner-a", step="segmenting", progress=50.0)
    store.fail(job.id, "engine crashed", owner="runner-a")
    again = store.retry(job.id)
    assert again.state == "queued" and again.error is None
    assert again.attempts == 1 and again.progress == 0 and again.step == ""
    assert store.claim("runner-b", LONG).id == job.id


def test_retry_retrying_job_makes_it_due_now(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.fail(job.id, "busy", retry_in_s=LONG, owner="runner-a")
    again = store.retry(job.id)
    assert again.state == "queued" and again.next_attempt_at is None
    assert store.claim("runner-a", LONG).id == job.id


def test_retry_clears_finished_at(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.fail(job.id, "engine crashed", owner="runner-a")
    again = store.retry(job.id)
    assert again.state == "queued"
    assert again.finished_at is None and again.to_json()["finished"] is None


def test_retry_with_stored_outputs_only_redelivers(store):
    job = forwarding(store, "pacs", "web", "archive")
    store.set_destination(job.id, "pacs", state="done", delivered_s=0.5)
    store.set_destination(job.id, "web", state="failed", attempts=3, last_error="HTTP 503")
    failed = store.set_destination(job.id, "archive", state="failed", attempts=3, last_error="association refused")
    assert failed.state == "failed"
    again = store.retry(job.id)
    assert again.state == "forwarding" and again.step == "forwarding" and again.error is None
    assert again.destinations == {
        "pacs": {"state": "done", "attempts": 0, "delivered_s": 0.5},
        "web": {"state": "pending", "attempts": 0},
        "archive": {"state": "pending", "attempts": 0},
    }
    assert again.outputs["stored"] is True and again.attempts == 1
    assert store.claim("runner-b", LONG) is None  # nothing is read again
    assert sorted(name for _, name in store.due_deliveries(stale_after_s=60)) == ["archive", "web"]


def test_retry_done_job_is_refused(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.update(job.id, "runner-a", state="storing")
    assert store.finish_storing(job.id, "runner-a").state == "done"
    with pytest.raises(JobError, match="done"):
        store.retry(job.id)
    with pytest.raises(JobError, match="done"):
        store.cancel(job.id)


def test_retry_queued_or_running_job_is_refused(store):
    job = add(store)
    with pytest.raises(JobError, match="queued"):
        store.retry(job.id)
    store.claim("runner-a", LONG)
    with pytest.raises(JobError, match="running"):
        store.retry(job.id)


def test_unknown_job_is_refused(store):
    with pytest.raises(JobError, match="no job 42"):
        store.get(42)
    with pytest.raises(JobError):
        store.cancel(42)
    with pytest.raises(JobError):
        store.retry(42)


def test_set_destination_of_unknown_job_is_refused(store):
    with pytest.raises(JobError):
        store.set_destination(42, "pacs", state="done")


# --- destinations ------------------------------------------------------------------------------


def test_finish_storing_without_destinations_is_done(store):
    job = add(store)
    store.claim("runner-a", LONG)
    store.update(job.id, "runner-a", state="storing")
    done = store.finish_storing(job.id, "runner-a")
    assert done.state == "done" and done.step == "done" and done.progress == 100
    assert done.finished_at is not None and done.lease_owner is None


def test_finish_storing_with_destinations_forwards(store):
    job = forwarding(store, "pacs")
    assert job.step == "forwarding" and job.progress == 95 and job.finished_at is None
    assert job.lease_owner is None
    assert [(j.id, name) for j, name in store.due_deliveries(stale_after_s=60)] == [(job.id, "pacs")]


def test_all_destinations_done_ends_the_job(store):
    job = forwarding(store, "pacs", "web")
    half = store.set_destination(job.id, "pacs", state="done")
    assert half.state == "forwarding" and half.finished_at is None
    done = store.set_destination(job.id, "web", state="done")
    assert done.state == "done" and done.progress == 100 and done.step == "done"
    assert done.finished_at is not None and done.error is None
    assert store.due_deliveries(stale_after_s=60) == []


def test_one_failed_destination_fails_the_job(store):
    job = forwarding(store, "pacs", "web", "archive")
    store.set_destination(job.id, "pacs", state="done")
    store.set_destination(job.id, "web", state="failed", last_error="HTTP 503 from STOW-RS")
    assert store.get(job.id).state == "forwarding"  # archive still to deliver
    failed = store.set_destination(job.id, "archive", state="done")
    assert failed.state == "failed" and failed.step == "failed" and failed.finished_at is not None
    assert "web" in failed.error and "HTTP 503 from STOW-RS" in failed.error
    assert "pacs" not in failed.error and "archive" not in failed.error


def test_retrying_destination_is_due_only_when_its_time_comes(store):
    later = forwarding(store, "pacs")
    store.set_destination(later.id, "pacs", state="retrying", attempts=1, last_error="refused",
                          next_attempt_at=time.time() + LONG)
    now = forwarding(store, "pacs", "web")
    store.set_destination(now.id, "web", state="retrying", attempts=1, next_attempt_at=time.time() - 1)
    due = [(job.id, name) for job, name in store.due_deliveries(stale_after_s=60)]
    assert due == [(now.id, "pacs"), (now.id, "web")]
    store.set_destination(now.id, "pacs", state="sending", sending_since=time.time())
    assert [(job.id, name) for job, name in store.due_deliveries(stale_after_s=60)] == [(now.id, "web")]


def test_set_destination_refuses_unknown_state(store):
    job = forwarding(store, "pacs")
    with pytest.raises(ValueError, match="delivered"):
        store.set_destination(job.id, "pacs", state="delivered")
    assert store.get(job.id).destinations["pacs"]["state"] == "pending"


def test_set_destination_on_cancelled_job_does_not_revive_it(store):
    job = forwarding(store, "pacs")
    store.cancel(job.id)
    got = store.set_destination(job.id, "pacs", state="done")
    assert got.state == "cancelled" and got.destinations["pacs"]["state"] == "done"


# --- listing -----------------------------------------------------------------------------------


def test_list_filters_by_state_and_study(store):
    a1 = add(store, study="orthanc-a", study_instance_uid="1.2.840.1")
    a2 = add(store, study="orthanc-a", study_instance_uid="1.2.840.1", rule="head")
    b = add(store, study="orthanc-b", study_instance_uid="1.2.840.2")
    store.cancel(a2.id)
    assert [j.id for j in store.list()] == [b.id, a2.id, a1.id]  # newest first
    assert [j.id for j in store.list(state="queued")] == [b.id, a1.id]
    assert [j.id for j in store.list(state="cancelled")] == [a2.id]
    assert [j.id for j in store.list(study="1.2.840.1")] == [a2.id, a1.id]
    assert [j.id for j in store.list(study="orthanc-a")] == [a2.id, a1.id]
    assert [j.id for j in store.list(study="orthanc-b", state="queued")] == [b.id]
    assert store.list(study="orthanc-b", state="cancelled") == []
    assert [j.id for j in store.list(limit=1)] == [b.id]


def test_counts_has_every_state(store):
    assert store.counts() == {s: 0 for s in STATES}
    add(store)
    add(store)
    add(store, state="failed", error="no series")
    store.claim("runner-a", LONG)
    counts = store.counts()
    assert set(counts) == set(STATES)
    assert counts["queued"] == 1 and counts["running"] == 1 and counts["failed"] == 1
    assert sum(counts.values()) == 3


# --- settings and JSON -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [17, "cursor", None, [1, "two"], {"owner": "runner-a", "at": 1.5}, True])
def test_settings_round_trip(store, value):
    store.set_setting("key", value)
    assert store.get_setting("key", "default") == value


def test_settings_default_and_overwrite(store):
    assert store.get_setting("missing") is None
    assert store.get_setting("missing", [1]) == [1]
    store.set_setting("cursor", 5)
    store.set_setting("cursor", 6)
    assert store.get_setting("cursor") == 6


def test_store_reopens_the_same_file(tmp_path):
    job = add(JobStore(tmp_path / "jobs.sqlite"))
    assert JobStore(tmp_path / "jobs.sqlite").get(job.id) == job


def test_to_json(store):
    job = add(store, study="orthanc-a", study_instance_uid="1.2.840.1", destinations=("pacs",))
    store.claim("runner-a", LONG)
    store.update(job.id, "runner-a", progress=33.333, timings={"load_s": 0.5},
                 outputs={"stored": True, "sr_orthanc_id": "sr1"})
    shown = store.get(job.id).to_json()
    assert shown["id"] == job.id and shown["state"] == "running"
    assert shown["study_instance_uid"] == "1.2.840.1" and shown["study"] == "orthanc-a"
    assert shown["rule"] == "chest" and shown["engine"] == "phantom" and shown["version"] == 1
    assert shown["progress"] == 33.3 and shown["error"] is None and shown["attempts"] == 1
    assert shown["timings"] == {"load_s": 0.5}
    assert shown["outputs"] == {"stored": True, "sr_orthanc_id": "sr1"}
    assert shown["destinations"] == {"pacs": {"state": "pending", "attempts": 0}}
    assert shown["created"].endswith("Z") and shown["finished"] is None and shown["next_attempt_at"] is None
    store.fail(job.id, "boom")
    shown = store.get(job.id).to_json()
    assert shown["state"] == "failed" and shown["error"] == "boom" and shown["finished"].endswith("Z")


def test_delivery_left_sending_by_a_dead_runner_is_due_again(store):
    job = add(store, destinations=("pacs",))
    store.update(job.id, state="forwarding")
    store.set_destination(job.id, "pacs", state="sending", attempts=1, sending_since=time.time())
    assert store.due_deliveries(stale_after_s=60) == []
    store.set_destination(job.id, "pacs", sending_since=time.time() - 61)
    assert [(j.id, name) for j, name in store.due_deliveries(stale_after_s=60)] == [(job.id, "pacs")]
