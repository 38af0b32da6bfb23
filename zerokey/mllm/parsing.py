"""Robust parsing of MLLM answers: Molmo point markup and JSON lists of keypoint names.

Models answer in free text and sometimes truncate, hallucinate markup or return prose. None of that
may crash a prediction run over thousands of shapes, and none of it may be silently ignored either:
every answer is classified and counted in a :class:`ParseStats`, which ends up in each shape's JSON.

Molmo's pointing format (coordinates are *percent* of image width / height, origin top-left)::

    <point x="61.5" y="40.6" alt="nose">nose</point>
    <points x1="12.3" y1="45.6" x2="80.1" y2="44.0" alt="wing tips">wing tips</points>
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

__all__ = [
    "parse_pointer_answer",
    "parse_xy_json",
    "ParseStats",
    "ParsedPoint",
    "parse_molmo_points",
    "parse_labelled_points",
    "match_label",
    "normalise_label",
    "is_echo",
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
        unmatched: points whose label is none of the requested names (multi-name answers), dropped.
        ambiguous: points whose label names more than one requested name (two requested names that
            normalise to the same string), dropped.
        echoed: answers that repeat the request's prompt (their markup is the prompt's example, not an
            answer), dropped whole.
        duplicate: tags in one multi-name answer whose label was already used by an earlier tag of that
            answer (kept: the label is exact; counted because Molmo puts all instances in one tag).
        xml_error: answers that are not one XML element (``parse="xml"``, the original's rule): the view is
            dropped for that name.
        too_many_points: answers with ``max_points`` points or more (the original drops those views: 8).
        failed_calls: requests that raised (network / HTTP errors after retries): no answer at all.
        unsent: requests not sent because the run's failure budget was already spent.
    """

    answers: int = 0
    empty: int = 0
    declined: int = 0
    garbage: int = 0
    points: int = 0
    out_of_range: int = 0
    malformed: int = 0
    unmatched: int = 0
    ambiguous: int = 0
    echoed: int = 0
    duplicate: int = 0
    xml_error: int = 0
    too_many_points: int = 0
    failed_calls: int = 0
    unsent: int = 0

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

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> ParseStats:
        """Inverse of :meth:`as_dict`; unknown keys (from newer writers) are an error, missing ones 0."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ParseStats fields {unknown}")
        return cls(**values)


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


def normalise_label(text: str) -> str:
    """Lower case, every run of non-alphanumerics -> one space, stripped: "Nose of the Airplane." ->
    "nose of the airplane". The only normalisation the multi-name matcher applies."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


_INDEX_LABEL = re.compile(r"^#?\s*(\d+)$")


def match_label(label: str | None, names: Sequence[str]) -> tuple[int | None, str]:
    """Which requested name a point's label is, exactly -- or why none.

    Returns ``(index, status)`` with status ``"ok"``, ``"unmatched"`` or ``"ambiguous"``. A label
    matches name ``i`` when (a) it equals that name after :func:`normalise_label`, or (b) it is an
    explicit 1-based index (``"3"``, ``"#3"``) into ``names``. Nothing else: no containment, no word
    overlap, no fuzzy ratio -- those assigned "airplane" to "nose of the airplane", "wingtip" to
    the left wingtip and a label listing every name to the last one. A label equal to two requested
    names (they normalise alike) is ambiguous.
    """
    if not label:
        return None, "unmatched"
    key = normalise_label(label)
    if not key:
        return None, "unmatched"
    hits = [i for i, n in enumerate(names) if normalise_label(n) == key]
    if len(hits) == 1:
        return hits[0], "ok"
    if len(hits) > 1:
        return None, "ambiguous"
    m = _INDEX_LABEL.match(label.strip())
    if m and 1 <= int(m.group(1)) <= len(names):
        return int(m.group(1)) - 1, "ok"
    return None, "unmatched"


def is_echo(answer: str, prompt: str, min_chars: int = 40) -> bool:
    """True when ``answer`` repeats (the start of) ``prompt``: the first ``min_chars`` normalised
    characters of the prompt occur in the normalised answer. Served models sometimes echo a request
    they do not understand; a multi-name prompt's example markup must not be read as points."""
    key = normalise_label(prompt)[:min_chars]
    return (
        bool(key)
        and len(key) >= min(min_chars, len(normalise_label(prompt)))
        and key in normalise_label(answer)
    )


def parse_labelled_points(
    text: str | None, names: Sequence[str], prompt: str | None = None
) -> tuple[dict[int, list[ParsedPoint]], ParseStats]:
    """Parse one answer that points at several names at once; assign each point by its exact label.

    A point's label comes from its ``alt`` / tag text; a tag without one may take a ``name:`` prefix on
    its line (``"nose: <point .../>"``), matched just as exactly. Every point whose label is not
    exactly one requested name is dropped and counted ``unmatched`` or ``ambiguous``; a label reused by
    a later tag of the same answer is counted ``duplicate`` (see :func:`match_label`). With ``prompt``
    given, an answer that echoes it is dropped whole and counted ``echoed``.
    """
    per_name: dict[int, list[ParsedPoint]] = {}
    stats = ParseStats(answers=1)
    if text is None or not str(text).strip():
        stats.empty = 1
        return per_name, stats
    if prompt and is_echo(str(text), prompt):
        stats.echoed = 1
        return per_name, stats
    any_tag = False
    seen: set[int] = set()
    for line in str(text).splitlines() or [str(text)]:
        first = _TAG.search(line)
        if not first:
            continue
        any_tag = True
        prefix = line[: first.start()].strip(" -*:.\t0123456789)")
        # One tag at a time, so each tag's points carry their own label status.
        for tag in _TAG.finditer(line):
            closing = re.match(r"[^<]*<\s*/\s*points?\s*>", line[tag.end() :], re.IGNORECASE)
            chunk = line[tag.start() : tag.end() + (closing.end() if closing else 0)]
            points, tag_stats = parse_molmo_points(chunk)
            stats.out_of_range += tag_stats.out_of_range
            stats.malformed += tag_stats.malformed
            if not points:
                continue
            own_prefix = prefix if tag.start() == first.start() else ""
            label = points[0].label if points[0].label else (own_prefix or None)
            index, status = match_label(label, names)
            if index is None:
                if status == "ambiguous":
                    stats.ambiguous += len(points)
                else:
                    stats.unmatched += len(points)
                continue
            if index in seen:
                stats.duplicate += 1
            seen.add(index)
            per_name.setdefault(index, []).extend(points)
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


def _list_item_name(item: str) -> str | None:
    """The name in one free-text list item: "**Nose**: the front tip" / "Nose - front tip" -> "Nose"
    (GPT-4o answers "in text" as a list of bold names with explanations)."""
    item = item.strip()
    bold = re.match(r"^\*\*(.+?)\*\*", item)
    if bold:
        item = bold.group(1)
    else:
        item = re.split(r"\s*(?::|\s[-\u2013\u2014]\s)\s*", item, maxsplit=1)[0]
    item = item.strip().strip("\"'`*").rstrip(".,;:").strip()
    return " ".join(item.split()) if item and len(item) <= 80 else None


def parse_name_list(text: str | None, max_names: int | None = None) -> tuple[list[str], ParseStats]:
    """Keypoint names from a namer's answer: a JSON list of strings (or of objects with a ``name``);
    failing JSON, a bulleted / numbered list, one name per line, each item cut at its explanation
    ("**Nose**: the front tip" -> "Nose"). Duplicates are kept (they mean several
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
                name = _list_item_name(m.group(1))
                if name:
                    names.append(name)
    if max_names is not None:
        names = names[:max_names]
    stats.points = len(names)
    if not names:
        stats.garbage = 1
    return names, stats


def parse_xy_json(text: str | None) -> tuple[list[tuple[float, float]], ParseStats]:
    """Pixel points from a JSON answer to "Output the point locations in the image (xy) coordinate system"
    (the authors' GPT-4o localisation ablation, ``gpt4o_localize.py`` @116cbed: JSON mode, lists walked,
    nested objects recursed). A pair is ``[x, y]`` of two numbers or an object with numeric ``x`` and ``y``;
    other values are walked into. No JSON at all: no point (``garbage``), the view gives nothing."""
    stats = ParseStats(answers=1)
    if text is None or not str(text).strip():
        stats.empty = 1
        return [], stats
    value = None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        decoder = json.JSONDecoder()
        for m in re.finditer(r"[\[{]", text):
            try:
                value, _ = decoder.raw_decode(text, m.start())
                break
            except json.JSONDecodeError:
                continue
    pairs: list[tuple[float, float]] = []

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def walk(v: object) -> None:
        if isinstance(v, dict):
            if number(v.get("x")) and number(v.get("y")):
                pairs.append((float(v["x"]), float(v["y"])))
                return
            for item in v.values():
                walk(item)
        elif isinstance(v, (list, tuple)):
            if len(v) == 2 and all(number(c) for c in v):
                pairs.append((float(v[0]), float(v[1])))
                return
            for item in v:
                walk(item)

    walk(value)
    stats.points = len(pairs)
    if not pairs:
        stats.garbage = 1
    return pairs, stats


def parse_pointer_answer(
    text: str | None, parse: str = "tags", max_points: int | None = None
) -> tuple[list[ParsedPoint], ParseStats]:
    """Points of one pointing answer under a pointer's parsing rule.

    ``parse="tags"`` (ours): :func:`parse_molmo_points`, every tag anywhere in the answer. ``"xml"``
    (the authors' code, :func:`zerokey.original.parse_original_answer`): the whole answer must be one XML
    element; otherwise the view is dropped (``xml_error``; a bad coordinate counts ``malformed``).
    With ``max_points`` an answer of that many points or more is dropped whole (``too_many_points``).
    """
    if parse == "xml":
        from zerokey.original import parse_original_answer

        stats = ParseStats(answers=1)
        pairs, reason = parse_original_answer(text, max_points)
        if pairs is None:
            setattr(stats, reason, 1)
            if reason == "xml_error" and (text is None or not str(text).strip()):
                stats.empty = 1
            return [], stats
        stats.points = len(pairs)
        return [ParsedPoint(x, y) for x, y in pairs], stats
    if parse != "tags":
        raise ValueError(f"parse must be 'tags' or 'xml', got {parse!r}")
    points, stats = parse_molmo_points(text)
    if max_points is not None and len(points) >= max_points:
        stats.too_many_points, stats.points = 1, 0
        return [], stats
    return points, stats
