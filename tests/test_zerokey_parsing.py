"""Molmo point parsing, multi-name answers and namer JSON extraction: every kind of answer is parsed
or counted, none raises."""

from __future__ import annotations

import pytest

from zerokey.parsing import (
    ParsedPoint,
    ParseStats,
    extract_json_list,
    match_label,
    parse_labelled_points,
    parse_molmo_points,
    parse_name_list,
)


def test_single_point_with_alt_and_text():
    points, stats = parse_molmo_points(
        '<point x="61.5" y="40.6" alt="nose of the plane">nose of the plane</point>'
    )
    assert points == [ParsedPoint(61.5, 40.6, "nose of the plane")]
    assert (stats.points, stats.garbage, stats.malformed) == (1, 0, 0)


def test_multi_points_pair_by_index_and_label_from_text():
    text = 'Here: <points x1="12.3" y1="45.6" x3="5" y3="6" x2="80.1" y2="44.0">wing tips</points>.'
    points, stats = parse_molmo_points(text)
    # Ordered by index, not by attribute order; label falls back to the tag text.
    assert [(p.x, p.y) for p in points] == [(12.3, 45.6), (80.1, 44.0), (5.0, 6.0)]
    assert {p.label for p in points} == {"wing tips"}
    assert stats.points == 3


def test_several_tags_single_quotes_and_self_closing():
    text = '<point x=\'10\' y=\'20\'/> and <point x="30.5" y="0" alt="b">b</point>'
    points, _ = parse_molmo_points(text)
    assert [(p.x, p.y, p.label) for p in points] == [(10.0, 20.0, None), (30.5, 0.0, "b")]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        (None, "empty"),
        ("There are none.", "declined"),
        ("I cannot see a handle in this image", "declined"),
        ("lorem ipsum dolor", "garbage"),
        ('{"x": 3, "y": 4}', "garbage"),
        ("<point>", "garbage"),
    ],
)
def test_answers_without_points_are_classified(text, field):
    points, stats = parse_molmo_points(text)
    assert points == []
    assert stats.answers == 1
    assert getattr(stats, field) == 1
    assert stats.empty + stats.declined + stats.garbage == 1


def test_out_of_range_dropped_and_counted():
    text = '<points x1="101" y1="50" x2="50" y2="100.0" x3="-3" y3="4" x4="20" y4="30"></points>'
    points, stats = parse_molmo_points(text)
    assert [(p.x, p.y) for p in points] == [(50.0, 100.0), (20.0, 30.0)]  # 100 itself is in range
    assert stats.out_of_range == 2
    assert stats.points == 2


def test_partial_answers_keep_complete_pairs():
    # Cut by the token limit inside the tag: the last (possibly truncated) pair is dropped.
    points, stats = parse_molmo_points('<points x1="12.3" y1="45.6" x2="80.1" y2="44')
    assert [(p.x, p.y) for p in points] == [(12.3, 45.6)]
    assert stats.malformed == 1
    points, stats = parse_molmo_points('<point x="12.3" y="4')
    assert points == [] and stats.malformed == 1 and stats.garbage == 1
    # An x without its y, a non-numeric value, NaN.
    points, stats = parse_molmo_points(
        '<points x1="1" y1="2" x2="3">a</points><point x="abc" y="1"></point><point x="nan" y="1"></point>'
    )
    assert [(p.x, p.y) for p in points] == [(1.0, 2.0)]
    assert stats.malformed == 3


def test_parse_stats_add():
    total = ParseStats(answers=1, points=2) + ParseStats(answers=2, garbage=1)
    total += ParseStats(failed_calls=1)
    assert (
        total.as_dict()["answers"] == 3
        and total.points == 2
        and total.garbage == 1
        and total.failed_calls == 1
    )


NAMES = [
    "nose of the airplane",
    "wingtip of the left wing of the airplane",
    "wingtip of the right wing of the airplane",
    "tail of the airplane",
]


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("nose of the airplane", 0),
        ("Nose of the airplane.", 0),
        ("nose", 0),
        ("left wingtip", 1),
        ("wingtip of the right wing", 2),
        ("tail of the airplan", 3),
        ("banana", None),
        ("", None),
        (None, None),
    ],
)
def test_match_label(label, expected):
    assert match_label(label, NAMES) == expected


def test_labelled_points_split_by_name():
    text = (
        '1. nose: <point x="10" y="20" alt="nose of the airplane">nose of the airplane</point>\n'
        '<points x1="30" y1="40" x2="50" y2="60" alt="left wingtip">left wingtip</points> '
        '<point x="70" y="80" alt="banana">banana</point>\n'
        'tail of the airplane: <point x="90" y="95"></point>\n'
        "the right wingtip is not visible"
    )
    per_name, stats = parse_labelled_points(text, NAMES)
    assert {k: [(p.x, p.y) for p in v] for k, v in per_name.items()} == {
        0: [(10.0, 20.0)],
        1: [(30.0, 40.0), (50.0, 60.0)],
        3: [(90.0, 95.0)],  # unlabelled point: name from the line prefix
    }
    assert stats.unmatched == 1 and stats.points == 4 and stats.garbage == 0


@pytest.mark.parametrize(
    ("text", "field"), [("", "empty"), ("nothing there, there are none", "declined"), ("???", "garbage")]
)
def test_labelled_points_without_points(text, field):
    per_name, stats = parse_labelled_points(text, NAMES)
    assert per_name == {} and getattr(stats, field) == 1


def test_extract_json_list_variants():
    assert extract_json_list('```json\n["a", "b"]\n```') == ["a", "b"]
    assert extract_json_list('Sure! {"keypoints": ["x"]} hope it helps [1') == ["x"]
    assert extract_json_list('[broken, ] then ["ok"]') == ["ok"]
    assert extract_json_list("no json here") is None
    assert extract_json_list(None) is None


def test_parse_name_list_json_bullets_and_garbage():
    names, stats = parse_name_list('```json\n["nose", " tail  fin ", {"name": "leg"}, 3, "", "leg"]\n```')
    assert names == ["nose", "tail fin", "leg", "leg"]  # duplicates kept: instances
    assert stats.malformed == 2 and stats.points == 4
    names, _ = parse_name_list("Sure:\n1. nose\n2) tail\n- left wing tip.\nThanks")
    assert names == ["nose", "tail", "left wing tip"]
    names, stats = parse_name_list("I don't know")
    assert names == [] and stats.garbage == 1
    names, stats = parse_name_list("")
    assert names == [] and stats.empty == 1
    assert parse_name_list('["a","b","c"]', max_names=2)[0] == ["a", "b"]
