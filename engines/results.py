"""The findings model: what an engine read in one series, grouped by anatomical topic.

This is the one contract between engines and writers, and the format `readout export`
accepts from any model (`findings.schema.json` beside this file). Boxes are half-open voxel
index ranges ``[k0, r0, c0, k1, r1, c1]`` in the Volume's ``[k, r, c]`` space. Fields this
model does not know are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema


class FindingsError(ValueError):
    """Findings JSON that is malformed or does not fit the volume; names the field and problem."""


@dataclass(frozen=True)
class Box:
    """Half-open voxel ranges ``[k0, r0, c0, k1, r1, c1]``."""

    voxel: tuple[int, int, int, int, int, int]

    def __post_init__(self) -> None:
        if len(self.voxel) != 6:
            raise FindingsError(f"box needs 6 voxel indices, got {len(self.voxel)}")
        k0, r0, c0, k1, r1, c1 = self.voxel
        for axis, lo, hi in (("k", k0, k1), ("r", r0, r1), ("c", c0, c1)):
            if lo < 0 or hi <= lo:
                raise FindingsError(f"box {list(self.voxel)}: need 0 <= {axis}0 < {axis}1")

    @property
    def start(self) -> tuple[int, int, int]:
        return self.voxel[:3]

    @property
    def stop(self) -> tuple[int, int, int]:
        return self.voxel[3:]

    @property
    def key_slice(self) -> int:
        """The middle slice of the box, where its rectangle is drawn."""
        return (self.voxel[0] + self.voxel[3] - 1) // 2

    def outside(self, shape: tuple[int, int, int]) -> str | None:
        """Why the box does not fit a volume of ``shape``, or ``None`` if it does."""
        for axis, hi, n in zip("krc", self.stop, shape):
            if hi > n:
                return f"{axis}1={hi} exceeds the volume's {n} {axis} positions"
        return None


@dataclass
class Finding:
    type: str
    text: str
    size_mm: float | None = None
    location: str | None = None
    confidence: float | None = None
    box: Box | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TopicResult:
    topic: str
    normal: bool
    findings: list[Finding] = field(default_factory=list)
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The topic's own sentence, or a plain one when the engine gave none."""
        if self.text:
            return self.text
        return "No abnormality reported." if self.normal else "No reportable findings."


@dataclass
class Answer:
    question: str
    answer: str
    confidence: float | None = None
    box: Box | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineInfo:
    name: str
    version: str


@dataclass
class StudyResult:
    series_instance_uid: str
    engine: EngineInfo
    topics: list[TopicResult]
    answers: list[Answer] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> StudyResult:
        """Validate ``data`` against the findings schema and build the result."""
        _validate(data)
        result = cls(
            series_instance_uid=data["series_instance_uid"],
            engine=EngineInfo(data["engine"]["name"], data["engine"]["version"]),
            topics=[_topic_from_dict(t, f"topics[{i}]") for i, t in enumerate(data["topics"])],
            answers=[_answer_from_dict(a, f"answers[{i}]") for i, a in enumerate(data.get("answers", []))],
            extra=_extra(data, {"series_instance_uid", "engine", "topics", "answers"}),
        )
        for i, topic in enumerate(result.topics):
            if topic.normal and topic.findings:
                raise FindingsError(f"findings JSON: topics[{i}] ({topic.topic}) is marked normal but has findings")
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "engine": {"name": self.engine.name, "version": self.engine.version},
            "topics": [_topic_to_dict(t) for t in self.topics],
            "answers": [_answer_to_dict(a) for a in self.answers],
            **self.extra,
        }

    @classmethod
    def load(cls, path: Path) -> StudyResult:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise FindingsError(f"cannot read findings file {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise FindingsError(f"findings file {path} is not JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        """Raise FindingsError naming the first box that does not fit a volume of ``shape``."""
        for where, box in self._boxes():
            problem = box.outside(shape)
            if problem:
                raise FindingsError(f"findings JSON: {where}.box {list(box.voxel)} is outside the volume: {problem}")

    def _boxes(self) -> list[tuple[str, Box]]:
        boxes = [
            (f"topics[{i}].findings[{j}]", f.box)
            for i, t in enumerate(self.topics)
            for j, f in enumerate(t.findings)
            if f.box is not None
        ]
        boxes += [(f"answers[{i}]", a.box) for i, a in enumerate(self.answers) if a.box is not None]
        return boxes

    def as_text(self) -> str:
        """The report as plain text, topic by topic, then the answers."""
        lines = [f"Readout report ({self.engine.name} {self.engine.version})"]
        for topic in self.topics:
            lines.append(f"\n{topic.topic.upper()}")
            if topic.text or not topic.findings:
                lines.append(f"  {topic.summary}")
            for finding in topic.findings:
                lines.append(f"  - {finding.text}{_details(finding.confidence, finding.box)}")
        if self.answers:
            lines.append("\nQUESTIONS")
            for answer in self.answers:
                lines.append(f"  {answer.question} {answer.answer}{_details(answer.confidence, answer.box)}")
        return "\n".join(lines)


def _details(confidence: float | None, box: Box | None) -> str:
    parts = []
    if confidence is not None:
        parts.append(f"confidence {confidence:.0%}")
    if box is not None:
        parts.append(f"slices {box.voxel[0]}-{box.voxel[3] - 1}")
    return f" ({', '.join(parts)})" if parts else ""


@cache
def findings_schema() -> dict[str, Any]:
    """The findings JSON Schema shipped with Readout."""
    return json.loads(resources.files("engines").joinpath("findings.schema.json").read_text(encoding="utf-8"))


def _validate(data: Any) -> None:
    validator = jsonschema.Draft202012Validator(findings_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise FindingsError(f"findings JSON: {where or 'top level'}: {error.message}")


def _extra(data: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _box_from_dict(data: dict[str, Any] | None, where: str) -> Box | None:
    if data is None:
        return None
    try:
        return Box(tuple(data["voxel"]))  # type: ignore[arg-type]
    except FindingsError as exc:
        raise FindingsError(f"findings JSON: {where}.box: {exc}") from None


_FINDING_FIELDS = {"type", "text", "size_mm", "location", "confidence", "box"}


def _finding_from_dict(data: dict[str, Any], where: str) -> Finding:
    return Finding(
        type=data["type"],
        text=data["text"],
        size_mm=data.get("size_mm"),
        location=data.get("location"),
        confidence=data.get("confidence"),
        box=_box_from_dict(data.get("box"), where),
        extra=_extra(data, _FINDING_FIELDS),
    )


def _topic_from_dict(data: dict[str, Any], where: str) -> TopicResult:
    return TopicResult(
        topic=data["topic"],
        normal=data["normal"],
        findings=[_finding_from_dict(f, f"{where}.findings[{j}]") for j, f in enumerate(data["findings"])],
        text=data.get("text"),
        extra=_extra(data, {"topic", "normal", "findings", "text"}),
    )


def _answer_from_dict(data: dict[str, Any], where: str) -> Answer:
    return Answer(
        question=data["question"],
        answer=data["answer"],
        confidence=data.get("confidence"),
        box=_box_from_dict(data.get("box"), where),
        extra=_extra(data, {"question", "answer", "confidence", "box"}),
    )


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def _box_to_dict(box: Box | None) -> dict[str, Any] | None:
    return None if box is None else {"voxel": list(box.voxel)}


def _finding_to_dict(f: Finding) -> dict[str, Any]:
    core = {"type": f.type, "text": f.text, "size_mm": f.size_mm, "location": f.location,
            "confidence": f.confidence, "box": _box_to_dict(f.box)}
    return {**_without_none(core), **f.extra}


def _topic_to_dict(t: TopicResult) -> dict[str, Any]:
    core = {"topic": t.topic, "normal": t.normal, "text": t.text,
            "findings": [_finding_to_dict(f) for f in t.findings]}
    return {**_without_none(core), **t.extra}


def _answer_to_dict(a: Answer) -> dict[str, Any]:
    core = {"question": a.question, "answer": a.answer, "confidence": a.confidence, "box": _box_to_dict(a.box)}
    return {**_without_none(core), **a.extra}
