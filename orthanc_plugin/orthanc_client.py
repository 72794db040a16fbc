"""Orthanc's REST API as the runner uses it: over HTTP, so a runner may live on another machine."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import requests


class OrthancError(RuntimeError):
    """Orthanc answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OrthancClient:
    """A small client: JSON GET/POST, series download, instance upload.

    ``token`` is the value of an Authorization header (the plugin hands its runner one made by
    ``GenerateRestApiAuthorizationToken``); ``auth`` is (user, password) for a remote Orthanc.
    """

    def __init__(self, url: str, *, token: str | None = None, auth: tuple[str, str] | None = None,
                 timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = token
        if auth:
            self.session.auth = auth
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        timeout = kwargs.pop("timeout", self.timeout_s)
        # A GET is safe to repeat: Orthanc now and then closes a kept-alive connection unanswered.
        attempts = 2 if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self.session.request(method, self.url + path, timeout=timeout, **kwargs)
                break
            except requests.RequestException as error:
                if attempt == attempts or not isinstance(error, requests.ConnectionError):
                    raise OrthancError(f"Orthanc at {self.url} unreachable: {type(error).__name__}") from None
        if response.status_code >= 400:
            detail = response.text[:300].replace("\n", " ")
            raise OrthancError(f"Orthanc {method} {path}: HTTP {response.status_code} {detail}", response.status_code)
        return response

    def get_json(self, path: str) -> Any:
        return self._request("GET", path).json()

    def post_json(self, path: str, body: Any, timeout_s: float | None = None) -> Any:
        response = self._request("POST", path, json=body, timeout=timeout_s or self.timeout_s)
        return response.json() if response.content else None

    def store_instance(self, data: bytes) -> str:
        """POST one DICOM file; returns Orthanc's instance id (storing it again is harmless)."""
        answer = self._request("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"}).json()
        return answer["ID"]

    def download_series(self, series_id: str, folder: Path) -> int:
        """Write every instance of a series into ``folder``; returns the file count."""
        archive = self._request("GET", f"/series/{series_id}/archive").content
        folder.mkdir(parents=True, exist_ok=True)
        count = 0
        with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
            for number, name in enumerate(n for n in zipped.namelist() if not n.endswith("/")):
                (folder / f"{number:06d}.dcm").write_bytes(zipped.read(name))
                count += 1
        return count

    def instance_file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file").content
