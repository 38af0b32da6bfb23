"""Robust parsing of MLLM answers: Molmo point markup and JSON lists of keypoint names.

Models answer in free text and sometimes truncate, hallucinate markup or return prose. None of that
may crash a prediction run over thousands of shapes, and none of it may be silently ignored either:
every answer is classified and counted in a :class:`ParseStats`, which ends up in each shape's JSON.

Molmo's pointing format (coordinates are *percent* of image width / height, origin top-left)::

    <point x="61.5" y="40.6" alt="nose">nose</point>
    <points x1="12.3" y1="45.6" x2="80.1" y2="44.0" alt="wing tips">wing tips</points>
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

__all__ = [
    "ParseStats",
    "ParsedPoint",
    "parse_molmo_points",
    "parse_labelled_points",
    "match_label",
    "extract_json_list",
    "parse_name_list",
]


@dataclass
class ParseStats:
    """Counts of what came back from a model, summed over answers (and over views for a shape).

    Attributes:
        answers: answers parsed.
        empty: blank answers.
        declined: answers without any point markup that say the thing is not there ("There are none.").
        garbage: non-blank answers that yielded no usable point and are not a recognisable refusal
            (prose, broken markup, JSON where points were expected, ...).
        points: valid points extracted.
        out_of_range: coordinates outside [0, 100] percent (dropped).
        malformed: point tags / coordinates that could not be read (non-numeric, an x without its y,
            a tag cut off by the token limit, ...), dropped.
        unmatched: points whose label matched none of the requested names (multi-name answers), dropped.
        failed_calls: requests that raised (network / HTTP errors after retries): no answer at all.
    """

    answers: int = 0
    empty: int = 0
    declined: int = 0
    garbage: int = 0
    points: int = 0
    out_of_range: int = 0
    malformed: int = 0
    unmatched: int = 0
    failed_calls: int = 0

    def __iadd__(self, other: ParseStats) -> ParseStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __add__(self, other: ParseStats) -> ParseStats:
        out = ParseStats(**asdict(self))
        out += other
        return out

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ParsedPoint:
    """One point in percent of width (``x``) and height (``y``); ``label`` from ``alt`` or the tag text."""

    x: float
    y: float
    label: str | None = None


# An opening <point ...> / <points ...> tag. The closing '>' may be missing when generation stopped
# at the token limit; then the attributes run to the end of the text.
_TAG = re.compile(r"<\s*(points?)\b([^<>]*)(>|$)", re.IGNORECASE)
_ATTR = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*(?:\"([^\"]*)\"?|'([^']*)'?|([^\s\"'>]+))")
_COORD = re.compile(r"^([xy])(\d*)$", re.IGNORECASE)
_DECLINE = re.compile(
    r"\b(none|nothing|no\s+such|not\s+(visible|present|shown|found|see|able)|cannot|can't|can\s+not|"
    r"there\s+(is|are)\s+no|unable|doesn't\s+(have|show|appear)|does\s+not\s+(have|show|appear))\b",
    re.IGNORECASE,
)


def _to_float(text: str) -> float | None:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None  # reject NaN / inf


def parse_molmo_points(text: str | None) -> tuple[list[ParsedPoint], ParseStats]:
    """Extract every ``<point>`` / ``<points>`` from one Molmo answer.

    Coordinates outside [0, 100] are dropped (counted ``out_of_range``); unreadable or unpaired
    coordinates and tags cut off mid-attribute are dropped (counted ``malformed``). An answer that gives
    no valid point is classified ``empty``, ``declined`` or ``garbage``. Never raises.
    """
    stats = ParseStats(answers=1)
    if text is None or not str(text).strip():
        stats.empty = 1
        return [], stats
    text = str(text)
    points: list[ParsedPoint] = []
    tags = list(_TAG.finditer(text))
    for tag in tags:
        closed = tag.group(3) == ">"
        attrs: dict[str, str] = {}
        for m in _ATTR.finditer(tag.group(2)):
            attrs[m.group(1).lower()] = next(g for g in m.groups()[1:] if g is not None)
        label = attrs.get("alt")
        if closed:
            tail = text[tag.end() :]
            inner = re.match(r"([^<]*)<\s*/\s*points?\s*>", tail, re.IGNORECASE)
            if inner and inner.group(1).strip():
                label = label or inner.group(1).strip()
        label = label.strip() if label else None
        xs: dict[str, str] = {}
        ys: dict[str, str] = {}
        last_coord: str | None = None
        for key, value in attrs.items():
            m = _COORD.match(key)
            if m:
                (xs if m.group(1).lower() == "x" else ys)[m.group(2)] = value
                last_coord = m.group(2)
        if not closed and last_coord is not None:
            # Generation stopped inside this tag: its last coordinate may be cut short ("44" of
            # "44.7"), so that pair is dropped; complete pairs before it are kept.
            xs.pop(last_coord, None)
            ys.pop(last_coord, None)
            stats.malformed += 1
        for index in sorted(set(xs) | set(ys), key=lambda s: int(s) if s else 0):
            if index not in xs or index not in ys:
                stats.malformed += 1
                continue
            x, y = _to_float(xs[index]), _to_float(ys[index])
            if x is None or y is None:
                stats.malformed += 1
                continue
            if not (0.0 <= x <= 100.0 and 0.0 <= y <= 100.0):
                stats.out_of_range += 1
                continue
            points.append(ParsedPoint(x, y, label))
        if last_coord is None:
            stats.malformed += 1  # a point tag without any coordinate (or cut before the first)
    stats.points = len(points)
    if not points:
        if not tags and _DECLINE.search(text):
            stats.declined = 1
        else:
            stats.garbage = 1
    return points, stats


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


_STOPWORDS = {"the", "of", "a", "an", "on", "in", "at", "to"}


def _tokens(text: str) -> set[str]:
    return {t for t in text.split() if t not in _STOPWORDS}


def match_label(label: str | None, names: Sequence[str], cutoff: float = 0.75) -> int | None:
    """Index of the requested name a model's point label refers to, or None.

    In order: exact match after normalising case/punctuation; containment either way (the model
    shortens or extends a name); every word of the label appearing in a name ("left wingtip" ->
    "wingtip of the left wing of the airplane"); finally the closest name by ``difflib`` ratio if it
    reaches ``cutoff``. Several candidates at one step are split by the ``difflib`` ratio.
    """
    if not label:
        return None
    key = _normalise(label)
    if not key:
        return None
    norm = [_normalise(n) for n in names]

    def closest(candidates: list[int]) -> int:
        return max(candidates, key=lambda i: difflib.SequenceMatcher(None, key, norm[i]).ratio())

    exact = [i for i, n in enumerate(norm) if n == key]
    if exact:
        return exact[0]
    contained = [i for i, n in enumerate(norm) if n and (n in key or key in n)]
    if contained:
        return closest(contained)
    words = _tokens(key)
    subset = [i for i, n in enumerate(norm) if words and words <= _tokens(n)]
    if subset:
        return closest(subset)
    best = closest(list(range(len(names)))) if names else None
    if best is not None and difflib.SequenceMatcher(None, key, norm[best]).ratio() >= cutoff:
        return best
    return None


def parse_labelled_points(
    text: str | None, names: Sequence[str]
) -> tuple[dict[int, list[ParsedPoint]], ParseStats]:
    """Parse one answer that points at several names at once and assign each point to a name.

    A point's name comes from its ``alt`` / tag text; failing that, from a ``name:`` prefix on the line
    it sits on (``"nose: <point .../>"``). Points matching no requested name are counted ``unmatched``.
    """
    per_name: dict[int, list[ParsedPoint]] = {}
    stats = ParseStats(answers=1)
    if text is None or not str(text).strip():
        stats.empty = 1
        return per_name, stats
    total = ParseStats()
    any_tag = False
    for line in str(text).splitlines() or [str(text)]:
        if not _TAG.search(line):
            continue
        any_tag = True
        points, line_stats = parse_molmo_points(line)
        total.points += line_stats.points
        total.out_of_range += line_stats.out_of_range
        total.malformed += line_stats.malformed
        prefix = line[: _TAG.search(line).start()].strip(" -*:.\t0123456789)")
        for p in points:
            index = match_label(p.label, names)
            if index is None and prefix:
                index = match_label(prefix, names)
            if index is None:
                total.unmatched += 1
                continue
            per_name.setdefault(index, []).append(p)
    stats.out_of_range, stats.malformed, stats.unmatched = (
        total.out_of_range,
        total.malformed,
        total.unmatched,
    )
    stats.points = sum(len(v) for v in per_name.values())
    if stats.points == 0:
        if not any_tag and _DECLINE.search(str(text)):
            stats.declined = 1
        else:
            stats.garbage = 1
    return per_name, stats


def extract_json_list(text: str | None) -> list | None:
    """The first JSON array in ``text`` (also inside ```json fences or an object like
    ``{"keypoints": [...]}``), or None. Tries every '[' / '{' as a start, so surrounding prose and
    trailing garbage do not matter."""
    if not text:
        return None
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            for key in ("keypoints", "names", "keypoint_names", "parts", "points"):
                if isinstance(value.get(key), list):
                    return value[key]
    return None


def parse_name_list(text: str | None, max_names: int | None = None) -> tuple[list[str], ParseStats]:
    """Keypoint names from a namer's answer: a JSON list of strings (or of objects with a ``name``);
    failing JSON, a bulleted / numbered list, one name per line. Duplicates are kept (they mean several
    instances, e.g. four chair legs); blank entries are dropped. Counts go to ``points`` (names found),
    ``malformed`` (entries that are not names) and ``empty`` / ``garbage`` for the answer."""
    stats = ParseStats(answers=1)
    if text is None or not str(text).strip():
        stats.empty = 1
        return [], stats
    names: list[str] = []
    items = extract_json_list(str(text))
    if items is not None:
        for item in items:
            if isinstance(item, dict):
                item = item.get("name") or item.get("keypoint") or item.get("label")
            if isinstance(item, str) and item.strip():
                names.append(" ".join(item.split()))
            else:
                stats.malformed += 1
    else:
        for line in str(text).splitlines():
            m = re.match(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.+?)\s*$", line)
            if m:
                name = m.group(1).strip().strip("\"'`*").rstrip(".,;")
                if name and len(name) <= 80:
                    names.append(" ".join(name.split()))
    if max_names is not None:
        names = names[:max_names]
    stats.points = len(names)
    if not names:
        stats.garbage = 1
    return names, stats
