"""``python -m zerokey bench``: the ablation table, and the HTTP path reproducing the oracle's answers."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from zerokey.bench import ABLATIONS, format_table, run_bench

KPN = SHARED_DATA / "keypointnet"
needs_data = pytest.mark.skipif(not KPN.is_dir(), reason="shared KeypointNet data not available")


def test_ablation_list_covers_the_paper_switches():
    by_name = {a.name: a for a in ABLATIONS}
    paper = ABLATIONS[0]
    assert paper.n_views == 26 and paper.voting == "gaussian"
    assert (paper.cluster.method, paper.cluster.selection, paper.cluster.weighting) == (
        "hdbscan",
        "density",
        "points",
    )
    assert (paper.cluster.min_samples, paper.cluster.cluster_selection_epsilon, paper.cluster.min_views) == (
        10,
        0.0,
        1,
    )
    assert {a.n_views for a in ABLATIONS} == {6, 26, 46}
    assert by_name["binary voting"].voting == "binary"
    assert by_name["plain average (no HDBSCAN)"].cluster.method == "mean"


@needs_data
def test_bench_rows_and_server_path_match_the_oracle():
    chosen = [ABLATIONS[0], ABLATIONS[4]]  # paper, plain average
    kwargs = dict(image_size=96, ablations=chosen, limit=1, thresholds=(0.05, 0.1))
    oracle = run_bench(KPN, **kwargs)
    served = run_bench(KPN, pointer="server", **kwargs)
    assert [r["ablation"] for r in oracle["rows"]] == [a.name for a in chosen]
    o, s = oracle["rows"][0], served["rows"][0]
    n_names = o["pointer_calls_per_shape_per_name_protocol"] / 26
    # One request per (view, name), every answer parsed, the oracle's points all recovered.
    assert (
        s["measured_pointer_calls_per_shape"] == 26 * n_names and o["measured_pointer_calls_per_shape"] == 0
    )
    ps = s["pointer_parse_stats"]
    assert ps["answers"] == 26 * n_names and ps["failed_calls"] == 0 and ps["garbage"] == 0
    assert ps["points"] == o["pointer_parse_stats"]["points"] > 0
    # Percent with one decimal moves a point by < 0.05 % of 96 px: the scores barely move.
    for t in ("0.05", "0.10"):
        assert abs(o["iou"][t] - s["iou"][t]) <= 0.1
    table = format_table(oracle)
    assert "oracle noise model" in table and "N(0, 2.0 px)" in table and "3D half only" in table
    assert sum(line.startswith(("paper:", "plain average")) for line in table.splitlines()) == 2
