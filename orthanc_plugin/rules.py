"""Routing rules: which studies Readout reads, with which engine, on which series.

Admins write the rules as JSON (``config/rules.json``, format ``config/rules.schema.json``).
`load_rules` checks a file in two passes: the JSON Schema checks shape and types, then this
module checks what a schema cannot (regexes compile, min <= max, DICOM keywords, topic, engine
and destination names, unique rule names). Every problem of a pass is reported at once, one per
line, each starting with its JSON path, so that one edit can fix them all.

Rules are tried in file order; the first whose ``when`` holds wins unless it says ``continue``.
Matching reads tags only (Orthanc "simplified" values in `StudyInfo` and `SeriesInfo`), so this
module needs neither Orthanc nor HTTP, and a dry run (`RuleSet.explain`) can say why each rule
and each series was taken or refused.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from pydicom.datadict import keyword_dict, tag_for_keyword

from engines.phantom import TOPICS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "rules.schema.json"

_OPS = ("equals", "matches", "in", "gt", "ge", "lt", "le", "between")
_COMPARE = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt), "le": ("<=", operator.le)}


class RulesError(ValueError):
    """A rules file Readout cannot use; one problem per line, each starting with its JSON path."""

    @property
    def problems(self) -> list[str]:
        return str(self).splitlines()


@dataclass(frozen=True)
class SeriesInfo:
    """One series: DICOM keyword -> Orthanc simplified value (series tags merged with its first
    instance's tags), and how many instances it holds."""

    orthanc_id: str
    tags: Mapping[str, Any] = field(hash=False)
    instances: int

    @property
    def label(self) -> str:
        """How an admin finds the series in a viewer, without patient data: number and description."""
        number = _text(self.tags.get("SeriesNumber")) or "?"
        description = _text(self.tags.get("SeriesDescription"))
        return f"series {number} ({description})" if description else f"series {number}"


@dataclass(frozen=True)
class StudyInfo:
    """One study: study and patient tags, its first instance's tags and ``ModalitiesInStudy``."""

    orthanc_id: str
    tags: Mapping[str, Any] = field(hash=False)
    series: tuple[SeriesInfo, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One validated rule, defaults filled in; ``priority`` is carried to the job, not used here."""

    name: str
    description: str
    when: Mapping[str, Any] | None = field(hash=False)
    series: Mapping[str, Any] = field(hash=False)
    engine: str
    topics: tuple[str, ...]
    questions: tuple[str, ...]
    destinations: tuple[str, ...]
    priority: int
    continue_: bool

    def to_json(self) -> dict[str, Any]:
        """The rule as written in the rules file, with defaults filled in."""
        data: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.when is not None:
            data["when"] = _copy(self.when)
        return data | {
            "series": _copy(self.series),
            "engine": self.engine,
            "topics": list(self.topics),
            "questions": list(self.questions),
            "destinations": list(self.destinations),
            "priority": self.priority,
            "continue": self.continue_,
        }

    def matches(self, study: StudyInfo) -> tuple[bool, list[str]]:
        """Whether ``when`` holds for ``study``, and the tag tests that decided it, in words."""
        if self.when is None:
            return True, ["no 'when': the rule takes every study"]
        return _holds(self.when, study.tags)


@dataclass(frozen=True)
class SeriesChoice:
    """The series a rule reads (``None``: no series fits) and why each series was taken or not."""

    series: SeriesInfo | None
    reasons: dict[str, str] = field(hash=False)
    rule: str = ""
    considered: tuple[SeriesInfo, ...] = ()

    def summary(self) -> str:
        """One line for an admin, naming series by number and description."""
        rule = f"rule {self.rule}" if self.rule else "the rule"
        if self.series is not None:
            why = self.reasons.get(self.series.orthanc_id, "").removeprefix("chosen: ")
            return f"{rule} reads {self.series.label}: {why}"
        if not self.reasons:
            return f"no series fits {rule}: the study has no series"
        labels = {s.orthanc_id: s.label for s in self.considered}
        refused = "; ".join(
            f"{labels.get(uid, f'series {uid}')}: {why.removeprefix('refused: ')}" for uid, why in self.reasons.items()
        )
        return f"no series fits {rule}: {refused}"


def select_series(rule: Rule, study: StudyInfo) -> SeriesChoice:
    """The series of ``study`` that ``rule`` reads: those passing its ``series`` tests, then ``pick``."""
    spec = rule.series
    reasons: dict[str, str] = {}
    candidates: list[SeriesInfo] = []
    for series in study.series:
        problems = _series_problems(spec, series)
        if problems:
            reasons[series.orthanc_id] = "refused: " + " and ".join(problems)
        else:
            candidates.append(series)
    pick = spec.get("pick", "thinnest")

    def rank(s: SeriesInfo) -> tuple:
        thickness = _or_inf(_slice_thickness(s.tags))
        first = (thickness, -s.instances) if pick == "thinnest" else (-s.instances, thickness)
        return (*first, _or_inf(_number(_text(s.tags.get("SeriesNumber")))), s.orthanc_id)

    ranked = sorted(candidates, key=rank)
    chosen = ranked[0] if ranked else None
    if chosen is not None:
        among = f"{pick} of {len(ranked)} candidates" if len(ranked) > 1 else "the only candidate"
        reasons[chosen.orthanc_id] = f"chosen: {among} ({_describe(chosen)})"
        for series in ranked[1:]:
            reasons[series.orthanc_id] = f"passed over: {_describe(series)} (chosen: {_describe(chosen)})"
    ordered = {s.orthanc_id: reasons[s.orthanc_id] for s in study.series}
    return SeriesChoice(chosen, ordered, rule.name, study.series)


@dataclass(frozen=True)
class RuleSet:
    """The rules in file order."""

    rules: tuple[Rule, ...]

    def match(self, study: StudyInfo) -> list[Rule]:
        """The rules that take ``study``: the first match, and further ones while matches say continue."""
        return [rule for rule, held, _ in self._tried(study) if held]

    def explain(self, study: StudyInfo) -> dict[str, Any]:
        """A dry run, JSON-serializable: every rule, whether it matched and why, and for matched
        rules which series it would read and why."""
        matched: list[str] = []
        entries: list[dict[str, Any]] = []
        for rule, held, reasons in self._tried(study):
            entry: dict[str, Any] = {"rule": rule.name, "matched": bool(held), "reasons": reasons}
            if held:
                matched.append(rule.name)
                choice = select_series(rule, study)
                chosen = choice.series.orthanc_id if choice.series is not None else None
                entry["series"] = {"chosen": chosen, "reasons": dict(choice.reasons)}
            entries.append(entry)
        return {"matched": matched, "rules": entries}

    def get(self, name: str) -> Rule:
        """The rule called ``name``; KeyError if there is none."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(f"no rule named {name!r}; rules are {[r.name for r in self.rules]}")

    def to_json(self) -> dict[str, Any]:
        """The rules as a rules file, defaults filled in."""
        return {"rules": [rule.to_json() for rule in self.rules]}

    def _tried(self, study: StudyInfo) -> Iterator[tuple[Rule, bool | None, list[str]]]:
        """Each rule with whether it matched; ``None`` once an earlier rule won without continue."""
        winner = None
        for rule in self.rules:
            if winner is not None:
                yield rule, None, [f"not tried: rule {winner} matched first and does not continue"]
                continue
            held, reasons = rule.matches(study)
            if held and not rule.continue_:
                winner = rule.name
            yield rule, held, reasons


def load_rules(
    source: Path | str | Mapping[str, Any],
    *,
    known_engines: Collection[str] | None = None,
    known_destinations: Collection[str] | None = None,
) -> RuleSet:
    """Read and validate routing rules.

    Parameters
    ----------
    source:
        A rules file (`Path`), JSON text (`str`) or the parsed JSON (`Mapping`).
    known_engines, known_destinations:
        When given, rules naming any other engine or destination are refused.

    Raises
    ------
    RulesError
        If the file cannot be read or parsed (naming file, line and column), or the rules are
        invalid (one line per problem, each starting with its JSON path).
    """
    data = _parse(source)
    # Semantic checks trust the shape, so they run only on data the schema accepted.
    problems = _schema_problems(data) or _semantic_problems(data, known_engines, known_destinations)
    if problems:
        raise RulesError("\n".join(problems))
    return RuleSet(tuple(_rule(rule) for rule in data["rules"]))


def rules_schema() -> dict[str, Any]:
    """The rules file's JSON Schema (read afresh, so an edit to it counts at the next load)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# --- Matching ---------------------------------------------------------------------------------


def _holds(cond: Mapping[str, Any], tags: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether ``cond`` holds; the reasons are the tests that decided it, so a failed ``all``
    names only its failing parts and a held ``any`` only its holding parts."""
    for key, combine in (("all", all), ("any", any)):
        if key in cond:
            results = [_holds(c, tags) for c in cond[key]]
            held = combine(h for h, _ in results)
            everything = held if key == "all" else not held
            return held, [r for h, reasons in results if everything or h == held for r in reasons]
    if "not" in cond:
        held, reasons = _holds(cond["not"], tags)
        return not held, reasons  # each reason is a fact, true whichever way the test goes
    return _test(cond, tags)


def _test(cond: Mapping[str, Any], tags: Mapping[str, Any]) -> tuple[bool, list[str]]:
    tag = cond["tag"]
    op = next(op for op in _OPS if op in cond)
    expected = cond[op]
    values = _values(tags.get(tag))
    if not values:
        return False, [f"{tag} is missing"]
    shown = "\\".join(map(str, values))
    if op == "equals":
        held = any(_equal(v, expected) for v in values)
        yes, no = f"equals {expected!r}", f"does not equal {expected!r}"
    elif op == "matches":
        held = any(re.search(expected, str(v)) is not None for v in values)
        yes, no = f"matches '{expected}'", f"does not match '{expected}'"
    elif op == "in":
        held = any(_equal(v, e) for v in values for e in expected)
        yes, no = f"in {expected!r}", f"not in {expected!r}"
    else:
        numbers = [n for n in map(_number, values) if n is not None]
        if not numbers:
            return False, [f"{tag} '{shown}' is not a number"]
        if op == "between":
            low, high = expected
            held = any(low <= n <= high for n in numbers)
            yes, no = f"is between {low:g} and {high:g}", f"is not between {low:g} and {high:g}"
        else:
            symbol, compare = _COMPARE[op]
            held = any(compare(n, expected) for n in numbers)
            yes, no = f"{symbol} {expected:g}", f"not {symbol} {expected:g}"
    return held, [f"{tag} '{shown}' {yes if held else no}"]


def _series_problems(spec: Mapping[str, Any], series: SeriesInfo) -> list[str]:
    """Why ``series`` fails the rule's series tests; empty if it passes."""
    tags = series.tags
    problems: list[str] = []
    if "modality" in spec:
        wanted = [spec["modality"]] if isinstance(spec["modality"], str) else list(spec["modality"])
        modality = _text(tags.get("Modality"))
        if modality.upper() not in {w.upper() for w in wanted}:
            problems.append(f"Modality {modality or 'missing'}, not {' or '.join(wanted)}")
    image_type = {str(v).upper() for v in _values(tags.get("ImageType"))}
    problems += [f"ImageType includes {v.upper()}" for v in spec.get("image_type_excludes", ()) if v.upper() in image_type]
    lacking = [v.upper() for v in spec.get("image_type_includes", ()) if v.upper() not in image_type]
    if lacking:
        problems.append(f"ImageType lacks {', '.join(lacking)}")
    if "orientation" in spec:
        orientation = _orientation(tags.get("ImageOrientationPatient"))
        if orientation != spec["orientation"]:
            problems.append(f"orientation {orientation or 'unknown'}, not {spec['orientation']}")
    for key, keyword in (("description", "SeriesDescription"), ("body_part", "BodyPartExamined")):
        value = _text(tags.get(keyword))
        if key in spec and not value:
            problems.append(f"{keyword} is missing")
        elif key in spec and re.search(spec[key], value) is None:
            problems.append(f"{keyword} '{value}' does not match '{spec[key]}'")
    if "slice_thickness_mm" in spec:
        low, high = spec["slice_thickness_mm"].get("min", 0), spec["slice_thickness_mm"].get("max", math.inf)
        thickness = _slice_thickness(tags)
        if thickness is None:
            problems.append("slice thickness unknown (no SliceThickness or SpacingBetweenSlices)")
        elif thickness < low:
            problems.append(f"slices {thickness:g} mm thick, thinner than {low:g} mm")
        elif thickness > high:
            problems.append(f"slices {thickness:g} mm thick, thicker than {high:g} mm")
    if series.instances < spec.get("min_slices", 0):
        problems.append(f"{_instances(series.instances)}, fewer than {spec['min_slices']}")
    return problems


def _orientation(raw: Any) -> str | None:
    """The plane of ImageOrientationPatient: the axis the slice normal (row x column) is closest to."""
    cosines = [_number(v) for v in _values(raw)]
    if len(cosines) != 6 or None in cosines:
        return None
    (rx, ry, rz), (cx, cy, cz) = cosines[:3], cosines[3:]
    normal = [abs(ry * cz - rz * cy), abs(rz * cx - rx * cz), abs(rx * cy - ry * cx)]
    if max(normal) < 1e-6:
        return None
    return ("sagittal", "coronal", "axial")[normal.index(max(normal))]


def _slice_thickness(tags: Mapping[str, Any]) -> float | None:
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        positive = [n for n in map(_number, _values(tags.get(keyword))) if n is not None and n > 0]
        if positive:
            return positive[0]
    return None


def _describe(series: SeriesInfo) -> str:
    thickness = _slice_thickness(series.tags)
    size = "thickness unknown" if thickness is None else f"{thickness:g} mm"
    return f"{size}, {_instances(series.instances)}"


def _instances(n: int) -> str:
    return f"{n} instance" if n == 1 else f"{n} instances"


def _values(raw: Any) -> list[Any]:
    """A tag's values: Orthanc gives several as a list or joined by backslashes; blanks dropped."""
    if raw is None:
        return []
    items = raw if isinstance(raw, (list, tuple)) else raw.split("\\") if isinstance(raw, str) else [raw]
    stripped = [v.strip() if isinstance(v, str) else v for v in items]
    return [v for v in stripped if v is not None and v != ""]


def _text(raw: Any) -> str:
    return "\\".join(map(str, _values(raw)))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _equal(value: Any, expected: str | float) -> bool:
    if isinstance(expected, str):
        return str(value).strip().casefold() == expected.strip().casefold()
    return _number(value) == expected


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


# --- Loading ----------------------------------------------------------------------------------


def _parse(source: Path | str | Mapping[str, Any]) -> Any:
    if isinstance(source, Path):
        try:
            text, where = source.read_text(encoding="utf-8"), str(source)
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesError(f"{source}: cannot read the rules file: {getattr(exc, 'strerror', None) or exc}") from None
    elif isinstance(source, str):
        text, where = source, "rules JSON"
    else:  # already parsed; the schema says if it is not a mapping
        try:  # a JSON round trip copies the caller's data and turns tuples into lists
            return _copy(source)
        except (TypeError, ValueError) as exc:
            raise RulesError(f"$: the rules are not JSON data: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        looks_like_path = isinstance(source, str) and not text.lstrip().startswith(("{", "["))
        hint = " (to read a file, pass a pathlib.Path, not a str)" if looks_like_path else ""
        raise RulesError(f"{where}: line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}{hint}") from None


def _schema_problems(data: Any) -> list[str]:
    errors = jsonschema.Draft202012Validator(rules_schema()).iter_errors(data)
    ordered = sorted(errors, key=lambda e: [(isinstance(p, str), p) for p in e.absolute_path])
    return list(dict.fromkeys(f"{_where(e.absolute_path)}: {_message(e)}" for e in ordered))


def _message(error: jsonschema.ValidationError) -> str:
    # The schema's own "errorMessage" says in words what a raw minProperties/propertyNames error cannot.
    if isinstance(error.schema, Mapping) and "errorMessage" in error.schema:
        return error.schema["errorMessage"]
    if error.validator == "type":  # the default message repeats the whole (maybe long) value
        expected = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"must be {' or '.join(expected)}, not {_json_type(error.instance)}"
    return error.message


def _json_type(value: Any) -> str:
    kinds = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def _where(path: Iterable[str | int]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _semantic_problems(
    data: Mapping[str, Any], known_engines: Collection[str] | None, known_destinations: Collection[str] | None
) -> list[str]:
    problems: list[str] = []
    first_of: dict[str, int] = {}
    for i, rule in enumerate(data["rules"]):
        at, series = f"$.rules[{i}]", rule.get("series", {})
        folded = rule["name"].casefold()  # names end up in URLs and job records, where case is easy to lose
        if folded in first_of:
            problems.append(f"{at}.name: {rule['name']!r} is already the name of $.rules[{first_of[folded]}]")
        first_of.setdefault(folded, i)
        if "when" in rule:
            problems += _condition_problems(rule["when"], f"{at}.when")
        problems += [p for key in ("description", "body_part") if key in series
                     for p in _regex_problems(series[key], f"{at}.series.{key}")]
        limits = series.get("slice_thickness_mm", {})
        if limits.get("min", 0) > limits.get("max", math.inf):
            problems.append(f"{at}.series.slice_thickness_mm: min {limits['min']:g} is above max {limits['max']:g}")
        problems += [f"{at}.topics[{j}]: unknown topic {topic!r}; topics are {', '.join(TOPICS)}"
                     for j, topic in enumerate(rule.get("topics", ())) if topic not in TOPICS]
        if known_engines is not None and rule["engine"] not in known_engines:
            engines = ", ".join(sorted(known_engines)) or "none configured"
            problems.append(f"{at}.engine: unknown engine {rule['engine']!r}; engines are {engines}")
        if known_destinations is not None:
            known = ", ".join(sorted(known_destinations)) or "none configured"
            problems += [f"{at}.destinations[{j}]: unknown destination {name!r}; destinations are {known}"
                         for j, name in enumerate(rule.get("destinations", ())) if name not in known_destinations]
    return problems


def _condition_problems(cond: Mapping[str, Any], at: str) -> list[str]:
    for key in ("all", "any"):
        if key in cond:
            return [p for j, c in enumerate(cond[key]) for p in _condition_problems(c, f"{at}.{key}[{j}]")]
    if "not" in cond:
        return _condition_problems(cond["not"], f"{at}.not")
    problems: list[str] = []
    if tag_for_keyword(cond["tag"]) is None:
        close = difflib.get_close_matches(cond["tag"], keyword_dict, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{at}.tag: {cond['tag']!r} is not a DICOM keyword{hint}")
    if "matches" in cond:
        problems += _regex_problems(cond["matches"], f"{at}.matches")
    if "between" in cond and cond["between"][0] > cond["between"][1]:
        low, high = cond["between"]
        problems.append(f"{at}.between: low {low:g} is above high {high:g}")
    return problems


def _regex_problems(pattern: str, at: str) -> list[str]:
    try:
        re.compile(pattern)
    except re.error as exc:
        return [f"{at}: {pattern!r} is not a valid regular expression: {exc}"]
    return []


def _rule(data: Mapping[str, Any]) -> Rule:
    return Rule(
        name=data["name"],
        description=data.get("description", ""),
        when=data.get("when"),
        series={**data.get("series", {}), "pick": data.get("series", {}).get("pick", "thinnest")},
        engine=data["engine"],
        topics=tuple(data.get("topics", TOPICS)),
        questions=tuple(data.get("questions", ())),
        destinations=tuple(data.get("destinations", ())),
        priority=data.get("priority", 0),
        continue_=data.get("continue", False),
    )


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))
