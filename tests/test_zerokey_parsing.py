"""Molmo point parsing, multi-name answers and namer JSON extraction: every kind of answer is parsed
or counted, none raises."""

from __future__ import annotations

import pytest

from zerokey.mllm.parsing import (
    ParsedPoint,
    ParseStats,
    extract_json_list,
    match_label,
    parse_labelled_points,
    parse_molmo_points,
    parse_name_list,
)
from zerokey.mllm.pointers import build_multi_point_prompt
from zerokey.mllm.testing import MOLMO_FAILURE_ANSWERS, molmo_style_answer


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
        ("nose of the airplane", (0, "ok")),
        ("Nose of the Airplane.", (0, "ok")),  # case / punctuation only
        ("  tail   of the airplane ", (3, "ok")),
        ("2", (1, "ok")),  # explicit 1-based index
        ("#4", (3, "ok")),
        ("5", (None, "unmatched")),  # index out of range
        ("nose", (None, "unmatched")),  # a shortened name is not guessed
        ("tail of the airplan", (None, "unmatched")),  # nor a typo
        ("banana", (None, "unmatched")),
        ("", (None, "unmatched")),
        (None, (None, "unmatched")),
    ],
)
def test_match_label_is_exact(label, expected):
    assert match_label(label, NAMES) == expected


def test_match_label_ambiguous_when_two_names_normalise_alike():
    assert match_label("leg", ["leg", "Leg.", "seat"]) == (None, "ambiguous")
    per_name, stats = parse_labelled_points(
        '<point x="1" y="2" alt="leg">leg</point>', ["leg", "LEG", "seat"]
    )
    assert per_name == {} and stats.ambiguous == 1 and stats.garbage == 1


# The four mis-assignments of issue #10, each now counted instead of assigned.
def test_misassignment_category_word_alt_is_unmatched_not_the_nose():
    per_name, stats = parse_labelled_points('<point x="10" y="20" alt="airplane">airplane</point>', NAMES)
    assert per_name == {} and stats.unmatched == 1 and stats.points == 0


def test_misassignment_partial_name_is_unmatched_not_the_left_wingtip():
    per_name, stats = parse_labelled_points(
        '<points x1="10" y1="20" x2="80" y2="20" alt="wingtip">wingtip</points>', NAMES
    )
    assert per_name == {} and stats.unmatched == 2


def test_misassignment_echoed_prompt_is_counted_not_read_as_points():
    prompt = build_multi_point_prompt(NAMES)
    per_name, stats = parse_labelled_points(prompt, NAMES, prompt=prompt)
    assert per_name == {} and stats.echoed == 1 and stats.points == 0
    # Even without the echo check, the prompt's example label names nothing requested.
    per_name, stats = parse_labelled_points(prompt, NAMES)
    assert per_name == {} and stats.unmatched == 1


def test_misassignment_one_tag_labelled_with_every_name_is_unmatched_not_the_last_name():
    label = ", ".join(NAMES)
    text = f'<points x1="10" y1="20" x2="30" y2="40" x3="50" y3="60" alt="{label}">{label}</points>'
    per_name, stats = parse_labelled_points(text, NAMES)
    assert per_name == {} and stats.unmatched == 3


def test_labelled_points_split_by_exact_name_and_count_duplicates():
    text = (
        '1. nose: <point x="10" y="20" alt="nose of the airplane">nose of the airplane</point>\n'
        '<points x1="30" y1="40" x2="50" y2="60" alt="2">2</points> '
        '<point x="70" y="80" alt="banana">banana</point>\n'
        'tail of the airplane: <point x="90" y="95"></point>\n'
        '<point x="11" y="21" alt="Nose of the airplane">Nose of the airplane</point>\n'
        "the right wingtip is not visible"
    )
    per_name, stats = parse_labelled_points(text, NAMES)
    assert {k: [(p.x, p.y) for p in v] for k, v in per_name.items()} == {
        0: [(10.0, 20.0), (11.0, 21.0)],
        1: [(30.0, 40.0), (50.0, 60.0)],  # by explicit index
        3: [(90.0, 95.0)],  # unlabelled point: exact name from the line prefix
    }
    assert (stats.unmatched, stats.duplicate, stats.points, stats.garbage) == (1, 1, 5, 0)


# Answers as served Molmo gives them (zerokey.mllm.testing), with the parse each must get.
def test_molmo_style_answers_parse_to_their_points():
    one = molmo_style_answer("nose", [(61.5, 40.6)])
    assert one == '<point x="61.5" y="40.6" alt="nose">nose</point>'
    assert parse_molmo_points(one)[0] == [ParsedPoint(61.5, 40.6, "nose")]
    several = molmo_style_answer("leg", [(10, 80), (30, 80.25), (70, 80), (90, 80)], counting=True)
    assert several.startswith("Counting the <points x1=") and several.endswith("shows a total of 4.")
    points, stats = parse_molmo_points(several)
    assert [(p.x, p.y) for p in points] == [(10.0, 80.0), (30.0, 80.2), (70.0, 80.0), (90.0, 80.0)]
    assert (stats.points, stats.garbage, stats.malformed) == (4, 0, 0)
    assert molmo_style_answer("leg", []) == "There are none."


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # (points, empty, declined, garbage, malformed)
        ("refusal_none", (0, 0, 1, 0, 0)),
        ("refusal_sorry", (0, 0, 1, 0, 0)),
        ("echo", (0, 0, 0, 1, 0)),  # the prompt repeated: no point, not a refusal
        ("malformed_coordinate", (0, 0, 0, 1, 1)),
        ("truncated", (1, 0, 0, 0, 1)),  # the complete first pair survives
        ("empty", (0, 1, 0, 0, 0)),
    ],
)
def test_molmo_failure_answers_are_classified(key, expected):
    text = MOLMO_FAILURE_ANSWERS[key].format(name="propeller")
    points, stats = parse_molmo_points(text)
    assert (stats.points, stats.empty, stats.declined, stats.garbage, stats.malformed) == expected
    assert len(points) == expected[0]
    if key == "truncated":
        assert (points[0].x, points[0].y) == (12.5, 40.0)


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


def test_parse_name_list_free_text_answer_to_the_paper_prompt():
    # GPT-4o's answer to "List possible salient key points (in text).": names with explanations.
    text = (
        "Here are possible salient key points:\n\n"
        "1. **Nose tip**: the front point of the fuselage.\n"
        "2. **Left wingtip** - end of the left wing\n"
        "3. Tail fin top: highest point of the tail\n"
        "- Right wingtip \u2013 end of the right wing\n"
        "These points capture the overall shape."
    )
    names, stats = parse_name_list(text, max_names=10)
    assert names == ["Nose tip", "Left wingtip", "Tail fin top", "Right wingtip"]
    assert stats.points == 4 and stats.garbage == 0
