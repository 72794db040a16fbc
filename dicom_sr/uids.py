"""Deterministic UIDs: re-running the same read rewrites the same objects instead of adding new ones."""

from __future__ import annotations

import uuid

# Name-based (version 5) UUIDs under Readout's own namespace give 2.25 UIDs that need no
# organisation root. (pydicom's generate_uid ignores its entropy sources when prefix=None.)
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/readout/orthanc-readout/uids")


def derived_uid(*parts: str) -> str:
    """A 2.25 UID that is a pure function of ``parts``."""
    if not parts or any(not isinstance(p, str) for p in parts):
        raise TypeError("derived_uid needs one or more strings")
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0).join(parts)).int}"


def output_uid(study_uid: str, rule: str, engine: str, engine_version: str, kind: str) -> str:
    """The UID of an output object or series of one read.

    ``kind`` names the object, e.g. ``sr-series``, ``sr-instance``, ``seg-series``,
    ``seg-instance``; the same (study, rule, engine, version, kind) always gives the same UID.
    """
    return derived_uid(study_uid, rule, engine, engine_version, kind)


def device_uid(engine: str) -> str:
    """The Device Observer UID of an engine: stable across versions and studies."""
    return derived_uid("device", engine)
