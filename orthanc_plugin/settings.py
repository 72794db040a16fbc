"""Readout's settings file (`config/readout.json`): where things live, timings, engines, destinations."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SETTINGS = Path(__file__).resolve().parents[1] / "config" / "readout.json"


class SettingsError(ValueError):
    """The settings file is missing, not JSON, or names something impossible."""


@dataclass(frozen=True)
class Destination:
    """Where finished outputs go: a DICOM node (C-STORE) or a DICOMweb server (STOW-RS).

    Orthanc does the sending: `readout serve` declares each destination in Orthanc's
    ``DicomModalities`` or ``DicomWeb.Servers`` under the same name.
    """

    name: str
    kind: str  # "dicom" or "dicomweb"
    aet: str = ""
    host: str = ""
    port: int = 104
    url: str = ""
    username: str = ""
    password: str = ""

    def orthanc_entry(self) -> Any:
        """The value Orthanc's configuration holds for this destination."""
        if self.kind == "dicom":
            return [self.aet, self.host, self.port]
        entry: dict[str, Any] = {"Url": self.url}
        if self.username:
            entry.update(Username=self.username, Password=self.password)
        return entry


@dataclass(frozen=True)
class Settings:
    rules_path: Path
    database: Path
    stable_age_s: int = 60
    authentication: bool = False
    users: dict[str, str] = field(default_factory=dict)
    lease_s: float = 60.0
    heartbeat_s: float = 5.0
    poll_s: float = 1.0
    read_attempts: int = 3
    read_backoff_s: float = 30.0
    forward_attempts: int = 8
    forward_backoff_s: float = 10.0
    forward_backoff_max_s: float = 600.0
    forward_timeout_s: float = 30.0
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    destinations: dict[str, Destination] = field(default_factory=dict)

    def forward_delay_s(self, attempts: int) -> float:
        """Exponential backoff before delivery attempt ``attempts + 1``."""
        return min(self.forward_backoff_max_s, self.forward_backoff_s * 2 ** max(0, attempts - 1))


def load_settings(path: Path | str = DEFAULT_SETTINGS) -> Settings:
    """Read the settings file; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise SettingsError(f"settings file {path}: not JSON ({error})") from None
    base = path.resolve().parent
    orthanc, runner, forwarding = raw.get("orthanc", {}), raw.get("runner", {}), raw.get("forwarding", {})
    destinations = {}
    for name, spec in raw.get("destinations", {}).items():
        kind = spec.get("kind")
        if kind == "dicom" and not (spec.get("aet") and spec.get("host")):
            raise SettingsError(f"{path}: destination {name!r} (dicom) needs aet, host and port")
        if kind == "dicomweb" and not spec.get("url"):
            raise SettingsError(f"{path}: destination {name!r} (dicomweb) needs url")
        if kind not in ("dicom", "dicomweb"):
            raise SettingsError(f"{path}: destination {name!r}: kind must be 'dicom' or 'dicomweb', not {kind!r}")
        try:
            destinations[name] = Destination(name=name, **{k: v for k, v in spec.items() if k != "$comment"})
        except TypeError as error:
            raise SettingsError(f"{path}: destination {name!r}: {error}") from None
    try:
        return Settings(
            rules_path=base / raw.get("rules", "rules.json"),
            database=base / raw.get("database", "readout.db"),
            stable_age_s=int(orthanc.get("stable_age_s", 60)),
            authentication=bool(orthanc.get("authentication", False)),
            users=dict(orthanc.get("users", {})),
            lease_s=float(runner.get("lease_s", 60)),
            heartbeat_s=float(runner.get("heartbeat_s", 5)),
            poll_s=float(runner.get("poll_s", 1.0)),
            read_attempts=int(runner.get("read_attempts", 3)),
            read_backoff_s=float(runner.get("read_backoff_s", 30)),
            forward_attempts=int(forwarding.get("attempts", 8)),
            forward_backoff_s=float(forwarding.get("backoff_s", 10)),
            forward_backoff_max_s=float(forwarding.get("backoff_max_s", 600)),
            forward_timeout_s=float(forwarding.get("timeout_s", 30)),
            engines=dict(raw.get("engines", {"demo": {}})),
            destinations=destinations,
        )
    except (TypeError, ValueError) as error:
        raise SettingsError(f"{path}: {error}") from None
