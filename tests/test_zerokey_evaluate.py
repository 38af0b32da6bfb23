"""KeypointNet IoU protocol: hand-worked geodesic / IoU cases and agreement with a literal
re-implementation of the reference (full all-pairs matrices) on the real KeypointNet point clouds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from scipy.sparse.csgraph import shortest_path

from zerokey.data import load_keypointnet_annotations, read_pcd
from zerokey.evaluate import (
    DEFAULT_THRESHOLDS,
    ShapeEval,
    class_iou,
    evaluate_predictions,
    geodesic_distances,
    main,
    shape_counts,
)
from zerokey.geodesics import knn_graph

KPN = SHARED_DATA / "keypointnet"


def _horseshoe(step: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """A U-shaped polyline: down the left arm (x=0, y 1->0), along the bottom (y=0, x 0->0.2), up the
    right arm (x=0.2, y 0->1). Returns the points and their arc length from the top of the left arm."""
    n_arm, n_bottom = round(1 / step), round(0.2 / step)
    left = np.stack([np.zeros(n_arm + 1), np.linspace(1, 0, n_arm + 1)], 1)
    bottom = np.stack([np.linspace(0, 0.2, n_bottom + 1)[1:], np.zeros(n_bottom)], 1)
    right = np.stack([np.full(n_arm, 0.2), np.linspace(0, 1, n_arm + 1)[1:]], 1)
    xy = np.concatenate([left, bottom, right])
    points = np.concatenate([xy, np.zeros((len(xy), 1))], 1)
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    return points, arc


def test_chain_geodesic_is_arc_length_not_euclidean():
    points, arc = _horseshoe()
    top_left, top_right = 0, len(points) - 1
    d, unreachable = geodesic_distances(points, [top_left], [top_right, 50], k=2)
    assert unreachable == 0
    assert np.allclose(d, [[2.2, 0.5]], atol=1e-9)  # arc lengths; Euclidean top-left -> top-right is 0.2
    assert np.allclose(d[0], arc[[top_right, 50]])
    assert np.isclose(np.linalg.norm(points[top_left] - points[top_right]), 0.2)


def test_iou_hand_worked_on_the_chain():
    points, _ = _horseshoe()
    top_left, top_right, bottom_mid = 0, len(points) - 1, 110
    # Shape 1: GT at both arm tops; one prediction 3 steps from the left top, one at the bottom.
    pred1, gt1 = [3, bottom_mid], [top_left, top_right]
    d1, _ = geodesic_distances(points, pred1, gt1, k=2)
    # t = 0.05: left top found (0.03 away), right top missed (1.1 away); the bottom prediction is
    # 1.1 from both -> false. Euclidean would be fooled at t = 0.25 (right top is 0.2 from left).
    assert shape_counts(d1, 0.05) == (2, 1, 1)
    assert shape_counts(d1, 0.25) == (2, 1, 1)
    assert shape_counts(d1, 1.2) == (2, 0, 0)
    assert shape_counts(d1, 0.0) == (2, 2, 2)  # strict '>' : only exact hits count at 0
    # Shape 2: both GT hit exactly, nothing false.
    d2, _ = geodesic_distances(points, [top_left, top_right], [top_left, top_right], k=2)
    shapes = [
        ShapeEval("a", "c", np.array(pred1), np.array(gt1), d1),
        ShapeEval("b", "c", np.zeros(2), np.zeros(2), d2),
    ]
    # Micro over the class: (npos - missed) / (npos + false) = (4 - 1) / (4 + 1), not the mean of 1/3 and 1.
    assert class_iou(shapes, 0.05) == pytest.approx(3 / 5)
    # No predictions: every GT missed, nothing false.
    assert shape_counts(np.zeros((0, 2)), 0.1) == (2, 2, 0)


def test_disconnected_components_reference_vs_inf():
    points, _ = _horseshoe()
    far = points + np.array([10.0, 0, 0])
    both = np.concatenate([points, far])
    n = len(points)
    d_ref, unreachable = geodesic_distances(both, [0, n], [1], k=2, disconnected="reference")
    assert unreachable == 1
    assert d_ref[1, 0] == 0.0  # sklearn's graph_shortest_path returned 0 for unreachable pairs
    assert np.isclose(d_ref[0, 0], 0.01)
    d_inf, _ = geodesic_distances(both, [0, n], [1], k=2, disconnected="inf")
    assert np.isinf(d_inf[1, 0])
    with pytest.raises(ValueError):
        geodesic_distances(both, [0], [1], k=2, disconnected="zero")


def test_knn_graph_drops_self_and_zero_length_edges():
    points = np.array([[0.0, 0, 0], [0, 0, 0], [1, 0, 0], [3, 0, 0]])
    graph = knn_graph(points, k=2).toarray()
    assert np.all(np.diag(graph) == 0)
    assert graph[0, 1] == 0 and graph[1, 0] == 0  # duplicates: no zero-length edge
    assert graph[0, 2] == 1 and graph[3, 2] == 2


# ------------------------------------------------------------------------------- reference agreement
def _reference_iou(pred_idx, gt_idx, geo, thresh):
    """Literal transcription of KeypointNet's eval_det_cls_iou on full matrices (independent path)."""
    npos = fp_sum = fn_sum = 0
    for name in gt_idx:
        gt_kps = np.array(gt_idx[name]).astype(np.int32)
        npos += len(gt_kps)
        pred_kps = np.array(pred_idx[name]).astype(np.int32)
        fp_sum += np.count_nonzero(np.all(geo[name][pred_kps][:, gt_kps] > thresh, axis=-1))
        fn_sum += np.count_nonzero(np.all(geo[name][gt_kps][:, pred_kps] > thresh, axis=-1))
    return (npos - fn_sum) / np.maximum(npos + fp_sum, np.finfo(np.float64).eps)


@pytest.mark.skipif(not KPN.is_dir(), reason="shared KeypointNet data not available")
def test_matches_reference_on_real_keypointnet(tmp_path):
    from sklearn.neighbors import kneighbors_graph

    annotations = load_keypointnet_annotations([KPN / "annotations" / "airplane.json"])
    model_ids = sorted(p.stem for p in (KPN / "pcds" / "02691156").glob("*.pcd"))[:2]
    rng = np.random.default_rng(0)
    records, geo, pred_idx, gt_idx = [], {}, {}, {}
    for model_id in model_ids:
        pcd, _ = read_pcd(KPN / "pcds" / "02691156" / f"{model_id}.pcd")
        assert pcd.shape == (2048, 3)
        gt = [kp["pcd_info"]["point_index"] for kp in annotations[("02691156", model_id)]["keypoints"]]
        # Predictions: some GT points nudged off the cloud, plus random points of the cloud.
        chosen = list(rng.choice(gt, size=len(gt) // 2, replace=False)) + list(rng.integers(0, 2048, 4))
        xyz = pcd[chosen] + rng.normal(0, 1e-4, (len(chosen), 3))
        records.append(
            {
                "shape_id": f"02691156/{model_id}",
                "class_id": "02691156",
                "model_id": model_id,
                "keypoints": [{"xyz": p.tolist()} for p in xyz],
            }
        )
        graph = kneighbors_graph(pcd, 20, mode="distance", include_self=False)
        full = shortest_path(graph, directed=False)
        assert np.isfinite(full).all()  # these clouds are connected at k = 20
        geo[model_id], pred_idx[model_id], gt_idx[model_id] = full, chosen, gt
    result = evaluate_predictions(records, annotations, KPN / "pcds")
    expected = [_reference_iou(pred_idx, gt_idx, geo, t) for t in DEFAULT_THRESHOLDS]
    assert result.iou["airplane"] == pytest.approx(expected, abs=1e-12)
    assert result.shapes == {"airplane": 2} and result.unreachable_pairs == 0
    assert 0.3 < result.at(0.1) < 1.0

    # The CLI reads the same records from a folder (summaries ignored) and writes the result.
    for r in records:
        path = tmp_path / "pred" / f"{r['shape_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    (tmp_path / "pred" / "summary_rank0.json").write_text("{}")
    (tmp_path / "pred" / "02691156" / "junk.json").write_text("{not json")
    out = tmp_path / "iou.json"
    cli = main(
        [
            "--pred",
            str(tmp_path / "pred"),
            "--annotations",
            str(KPN / "annotations" / "airplane.json"),
            "--pcd-root",
            str(KPN / "pcds"),
            "--out",
            str(out),
        ]
    )
    assert cli.iou == result.iou
    assert json.loads(out.read_text())["mean_iou"] == pytest.approx(expected)


@pytest.mark.skipif(not KPN.is_dir(), reason="shared KeypointNet data not available")
def test_unknown_shapes_are_skipped_and_reported():
    annotations = load_keypointnet_annotations([KPN / "annotations" / "airplane.json"])
    records = [
        {"shape_id": "x", "keypoints": []},
        {"shape_id": "02691156/nope", "class_id": "02691156", "model_id": "nope", "keypoints": []},
        {
            "shape_id": "02691156/51ebcde47b4c29d81a62197a72f89474",
            "class_id": "02691156",
            "model_id": "51ebcde47b4c29d81a62197a72f89474",
            "keypoints": [],
        },  # annotated, but no pcd here
    ]
    result = evaluate_predictions(records, annotations, KPN / "pcds")
    assert {k: len(v) for k, v in result.skipped.items()} == {"no_ids": 1, "no_annotation": 1, "no_pcd": 1}
    assert result.iou == {}


def test_duplicated_gt_indices_count_once_as_in_the_reference(tmp_path):
    points, _ = _horseshoe()
    top_left, top_right = 0, len(points) - 1
    (tmp_path / "c").mkdir()
    header = (
        f"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nPOINTS {len(points)}\nDATA ascii\n"
    )
    body = "\n".join(" ".join(f"{v:.6f}" for v in p) for p in points)
    (tmp_path / "c" / "m.pcd").write_text(header + body + "\n")
    gt = [top_left, top_left, top_right]  # the left top annotated twice
    annotations = {("c", "m"): {"keypoints": [{"pcd_info": {"point_index": i}} for i in gt]}}
    record = {"shape_id": "c/m", "class_id": "c", "model_id": "m", "keypoints": [{"xyz": points[0].tolist()}]}
    result = evaluate_predictions([record], annotations, tmp_path, thresholds=[0.05], k=2)
    # GT set {left, right}: left found, right missed, nothing false -> (2 - 1) / 2. Counting the
    # duplicate would give (3 - 1) / 3.
    assert result.iou["c"] == [pytest.approx(0.5)]


@pytest.mark.skipif(not KPN.is_dir(), reason="shared KeypointNet data not available")
def test_chair_annotations_with_duplicated_indices():
    annotations = load_keypointnet_annotations([KPN / "annotations" / "chair.json"])
    dup = [
        key
        for key, a in annotations.items()
        if len({kp["pcd_info"]["point_index"] for kp in a["keypoints"]}) < len(a["keypoints"])
    ]
    assert len(annotations) == 999 and len(dup) == 6
