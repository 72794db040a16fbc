"""Dispatch: deliver a job's outputs to its destinations, each on its own retry schedule.

Orthanc does the sending (its DICOM modalities for C-STORE, its DICOMweb client for STOW-RS),
so deliveries show up in Orthanc's own job list too. A failed delivery is retried with
exponential backoff and gives up after the configured number of attempts; other deliveries
and other jobs go on meanwhile.
"""

from __future__ import annotations

import logging
import time

from orthanc_plugin.jobs import Job, JobStore
from orthanc_plugin.orthanc_client import OrthancClient, OrthancError
from orthanc_plugin.settings import Destination, Settings

log = logging.getLogger("readout.dispatch")


def send(client: OrthancClient, destination: Destination, instance_ids: list[str], timeout_s: float) -> None:
    """One synchronous delivery attempt; raises OrthancError when it fails."""
    if destination.kind == "dicom":
        client.post_json(f"/modalities/{destination.name}/store",
                         {"Resources": instance_ids, "Synchronous": True, "Timeout": int(timeout_s)},
                         timeout_s=timeout_s + 10)
    else:
        answer = client.post_json(f"/dicom-web/servers/{destination.name}/stow",
                                  {"Resources": instance_ids, "Synchronous": True}, timeout_s=timeout_s + 10)
        failed = (answer or {}).get("FailedSOPInstanceUIDs") if isinstance(answer, dict) else None
        if failed:
            raise OrthancError(f"the DICOMweb server refused {len(failed)} instance(s)")


def deliver(store: JobStore, client: OrthancClient, settings: Settings, job: Job, name: str) -> Job:
    """Try one delivery of ``job``'s outputs to destination ``name`` and record the outcome."""
    state = job.destinations.get(name, {})
    attempts = int(state.get("attempts", 0)) + 1
    destination = settings.destinations.get(name)
    if destination is None:
        return store.set_destination(job.id, name, state="failed", attempts=attempts,
                                     last_error=f"no destination named {name!r} in the settings")
    instance_ids = [job.outputs[k] for k in ("sr_orthanc_id", "seg_orthanc_id") if job.outputs.get(k)]
    store.set_destination(job.id, name, state="sending", attempts=attempts, sending_since=time.time())
    started = time.monotonic()
    try:
        send(client, destination, instance_ids, settings.forward_timeout_s)
    except OrthancError as error:
        reason = str(error)
        if attempts >= settings.forward_attempts:
            log.warning("job %d: delivery to %s failed for good after %d attempts", job.id, name, attempts)
            return store.set_destination(job.id, name, state="failed", last_error=reason)
        delay = settings.forward_delay_s(attempts)
        log.info("job %d: delivery to %s failed (attempt %d), next in %.0f s", job.id, name, attempts, delay)
        return store.set_destination(job.id, name, state="retrying", last_error=reason,
                                     next_attempt_at=time.time() + delay)
    seconds = round(time.monotonic() - started, 3)
    log.info("job %d: delivered to %s in %.2f s", job.id, name, seconds)
    store.add_timing(job.id, f"forward_{name}_s", seconds)
    return store.set_destination(job.id, name, state="done", last_error=None, delivered_s=seconds)
