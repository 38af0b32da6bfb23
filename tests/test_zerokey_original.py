"""The authors' settings (Wenri/Zero-Shot-3DKP @116cbed), each pinned against a worked expectation:
view directions, cameras, shading, disc weights, the XML answer rule, the retry ladder, the > 2x keep
rule, the ground-truth namer, the original evaluation protocol and the preset configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT as REPO

from zerokey.cluster import ClusterConfig, fast_hdbscan_ladder, original_clusters
from zerokey.data import KeypointNetDataset, ShapeSample
from zerokey.evaluate import ORIGINAL_THRESHOLDS, evaluate_predictions, original_geodesics
from zerokey.lift import Candidates3D
from zerokey.mllm.namers import OriginalLabelNamer
from zerokey.mllm.parsing import parse_pointer_answer
from zerokey.mllm.pointers import OpenAIPointer, OraclePointer
from zerokey.mllm.testing import FakeChatServer
from zerokey.original import (
    disc_weights,
    downsample_for_pointer,
    lift_disc_maps,
    min_cluster_size_ladder,
    original_cameras,
    original_label_table,
    original_shading,
    original_view_directions,
    parse_original_answer,
)
from zerokey.views import RenderedViews

SHARED = REPO.parent / "shared" / "data" / "keypointnet"


# ------------------------------------------------------------------------------------------- views
def test_view_directions_match_the_recomputed_table():
    d = original_view_directions().numpy()
    assert d.shape == (26, 3)
    # rows of docs/research/zerokey_original_code.md section 1.1 (recomputed there with numpy)
    expected = {
        0: (0.707107, 0.707106, 0.000707),
        4: (0.707107, -0.000707, 0.707106),
        7: (0.0, -0.001, 1.0),
        15: (-0.5, 0.707606, -0.499293),
        24: (0.0, 1.0, 0.001),
        25: (0.0, -1.0, -0.001),
    }
    for i, row in expected.items():
        assert d[i] == pytest.approx(row, abs=2e-6), i
    assert np.linalg.norm(d, axis=1) == pytest.approx(np.ones(26))


def test_cameras_sit_at_distance_one_from_the_vertex_mean_in_the_input_frame():
    # a shape normalised with scale 0.5: one input unit is 2 normalised units
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    cams = original_cameras(vertices, scale=0.5, distance=1.0, fov_deg=60.0, image_size=64)
    mean = vertices.mean(0)
    dist = (cams.centers - mean).norm(dim=-1)
    assert dist == pytest.approx(torch.full((26,), 2.0), abs=1e-5)
    # the vertex mean projects to the image centre in every view
    uv, z = cams.project(mean[None])
    assert uv[:, 0] == pytest.approx(torch.full((26, 2), 32.0), abs=1e-3)
    assert cams.focal[0].item() == pytest.approx(32.0 / math.tan(math.radians(30.0)))


def test_original_shading_of_a_face_seen_head_on():
    # one triangle in z = 0 facing +z, camera on +z: cos = 1, reflection = view -> specular 0.2
    vertices = torch.tensor([[-1.0, -1, 0], [1, -1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2]])
    from patchalign.render import look_at_cameras

    cams = look_at_cameras(torch.tensor([[0.0, 0.0, 5.0]]), fov_deg=30.0, image_size=8)
    pix = torch.full((1, 8, 8), -1, dtype=torch.long)
    pix[0, 4, 4] = 0
    image = original_shading(pix, vertices, faces, cams)
    # the centroid (0, -1/3, 0) sees the camera slightly off the normal: cos = 5 / sqrt(25 + 1/9)
    cos = 5.0 / math.sqrt(25.0 + 1.0 / 9.0)
    spec = (2 * cos * cos - 1) ** 64
    assert image[0, 4, 4, 0].item() == pytest.approx(0.7 * (0.5 + 0.3 * cos) + 0.2 * spec, abs=1e-6)
    assert image[0, 0, 0].tolist() == [1.0, 1.0, 1.0]  # white background
    flipped = original_shading(pix, vertices, faces.flip(-1), cams)  # the reversed copy of the face
    assert flipped[0, 4, 4, 0].item() == pytest.approx(image[0, 4, 4, 0].item())


def test_downsample_truncates_to_uint8_levels():
    image = torch.full((4, 4, 3), 0.7)  # 0.7 * 255 = 178.5 -> 178 (truncated, not rounded)
    out = downsample_for_pointer(image, 2)
    assert out.shape == (2, 2, 3)
    assert (out * 255).round().unique().tolist() == [178.0]


# ------------------------------------------------------------------------------------------- answers
def _points_answer(n: int) -> str:
    coords = " ".join(f'x{i + 1}="{10 + i}.0" y{i + 1}="20.0"' for i in range(n))
    return f'<points {coords} alt="leg">leg</points>'


def test_answer_with_eight_or_more_points_drops_the_view():
    assert parse_original_answer(_points_answer(10)) == (None, "too_many_points")
    assert parse_original_answer(_points_answer(8)) == (None, "too_many_points")
    points, reason = parse_original_answer(_points_answer(7))
    assert reason is None and points == [(10.0 + i, 20.0) for i in range(7)]
    points, stats = parse_pointer_answer(_points_answer(10), "xml", 8)
    assert points == [] and stats.too_many_points == 1 and stats.points == 0


def test_whole_answer_must_be_one_xml_element():
    assert parse_original_answer('<point x="12.5" y="40" alt="nose">nose</point>') == ([(12.5, 40.0)], None)
    assert parse_original_answer("There are none.") == (None, "xml_error")
    # a Molmo "Counting the <points ...>" sentence is not XML as a whole: dropped, as in the original
    counting = f"Counting the {_points_answer(2)} shows a total of 2."
    assert parse_original_answer(counting) == (None, "xml_error")
    assert parse_original_answer('<point x="left" y="4" alt="a">a</point>') == (None, "malformed")
    assert parse_original_answer('<point x="1" alt="a">a</point>') == (None, "malformed")
    # coordinates are not range-checked (the canvas clips the disc)
    assert parse_original_answer('<point x="104" y="4">a</point>') == ([(104.0, 4.0)], None)


def test_openai_pointer_original_rules_over_http():
    answers = {
        "nose of the airplane": '<point x="25.0" y="50.0" alt="nose">nose</point>',
        "tail of the airplane": _points_answer(9),
        "cockpit of the airplane": f"Counting the {_points_answer(2)} shows a total of 2.",
    }
    sizes = []

    def answer(request):
        if not request.images:
            return "OK"
        sizes.append(request.images[0].shape[:2])
        assert request.text.startswith("point to the ") and request.text.endswith(" on this image")
        return answers[request.text[len("point to the ") : -len(" on this image")]]

    views = RenderedViews(
        images=torch.full((2, 16, 16, 3), 0.5),
        cameras=None,  # type: ignore[arg-type] - the pointer reads images only
        depth=torch.ones(2, 16, 16),
        mask=torch.ones(2, 16, 16, dtype=torch.bool),
    )
    shape = ShapeSample("s", "s", torch.zeros(1, 3), None, torch.zeros(3), 1.0)
    with FakeChatServer(answer) as server:
        pointer = OpenAIPointer(
            server.base_url,
            "m",
            api_key_env=None,
            prompt="point to the {name} on this image",
            parse="xml",
            max_points=8,
            send_size=8,
            max_workers=1,
        )
        points = pointer(shape, list(answers), views)
    assert sizes and all(s == (8, 8) for s in sizes)  # sent at send_size
    assert points.uv.tolist() == [[4.0, 8.0], [4.0, 8.0]]  # 25 % / 50 % of the 16 px render, per view
    assert points.stats.too_many_points == 2 and points.stats.xml_error == 2 and points.stats.points == 2


# ------------------------------------------------------------------------------------------- discs
def test_disc_weights_worked_by_hand():
    w = disc_weights((10.0, 10.0), radius=15.0)
    assert w[(10, 10)] == 1.0
    assert w[(15, 10)] == pytest.approx(math.exp(-0.5))  # d = sigma = 5
    assert w[(25, 10)] == pytest.approx(math.exp(-4.5))  # the rim, d = r
    assert (26, 10) not in w and (21, 21) not in w  # outside the disc
    # off-centre: peak at the nearest pixel (d = 0.5) is normalised to 1
    w = disc_weights((10.5, 10.0), radius=15.0)
    assert w[(10, 10)] == pytest.approx(1.0) and w[(11, 10)] == pytest.approx(1.0)
    assert w[(13, 10)] == pytest.approx(math.exp(-0.5 * (2.5**2 - 0.5**2) / 25.0))


def test_disc_maps_sum_quantise_and_give_each_pixel_its_last_detection():
    uv = torch.tensor([[10.0, 10.0], [14.0, 10.0]])
    view = torch.tensor([0, 0])
    name = torch.tensor([0, 0])
    v, k, col, row, weight, det = lift_disc_maps(uv, view, name, image_size=64, radius=15.0)
    got = {(int(c), int(r)): (float(x), int(d)) for c, r, x, d in zip(col, row, weight, det, strict=True)}
    a, b = disc_weights((10.0, 10.0)), disc_weights((14.0, 10.0))
    for pixel in [(10, 10), (12, 10), (14, 10), (0, 0), (27, 10), (20, 18)]:
        total = a.get(pixel, 0.0) + b.get(pixel, 0.0)
        assert got[pixel][0] == math.floor(min(255.0, 255.0 * total)), pixel
        assert got[pixel][1] == (1 if pixel in b else 0), pixel
    assert got[(10, 10)][0] == 255.0  # 1 + exp(-0.5 * 16/25) = 1.53 -> clipped
    assert got[(25, 10)][0] == math.floor(255 * (math.exp(-4.5) + math.exp(-0.5 * 121 / 25)))
    # col 0: d = 10 from a, d = 14 from b (both within r): 255 * (e^-2 + e^-3.92) = 39.5 -> 39
    assert got[(0, 10)][0] == math.floor(255 * (math.exp(-2.0) + math.exp(-0.5 * 196 / 25))) == 39
    assert (-5, 10) not in got  # off the image: clipped by the canvas
    # the rim of one disc alone: 255 * e^-4.5 = 2.83 -> alpha 2, never 0
    _, _, col, row, weight, _ = lift_disc_maps(torch.tensor([[30.0, 30.0]]), view[:1], name[:1], 64)
    assert float(weight[(col == 45) & (row == 30)]) == 2.0


# ------------------------------------------------------------------------------------------- clusters
def _blob(center, n, weight, source, view, rng):
    xyz = torch.as_tensor(center, dtype=torch.float64) + 0.005 * torch.as_tensor(rng.normal(size=(n, 3)))
    return xyz, torch.full((n,), float(weight)), torch.full((n,), source), torch.full((n,), view)


def _candidates(blobs) -> Candidates3D:
    xyz, w, src, view = (torch.cat(parts) for parts in zip(*blobs, strict=True))
    mean = torch.full_like(w, float(w.mean()))
    return Candidates3D(xyz.float(), w, torch.zeros(len(w), dtype=torch.long), view.long(), src.long(), mean)


def test_retry_ladder_on_a_set_too_small_for_ten():
    assert min_cluster_size_ladder(10) == [10, 5, 3, 2]
    assert min_cluster_size_ladder(2) == [2]
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (6, 3)), rng.normal(1, 0.01, (6, 3))])
    w = np.ones(12)
    from fast_hdbscan import HDBSCAN

    at10 = HDBSCAN(min_cluster_size=10, allow_single_cluster=True).fit_predict(
        x.astype(np.float32), sample_weight=w
    )
    assert (at10 == -1).all()  # 6 + 6 points of weight 1: nothing at 10
    labels = fast_hdbscan_ladder(x, w, 10)
    assert sorted(np.unique(labels).tolist()) == [0, 1]  # found at 5: the two blobs
    assert len(set(labels[:6].tolist())) == 1 and labels[0] != labels[6]


def test_keep_rule_more_than_twice_the_heaviest_detection():
    rng = np.random.default_rng(1)
    config = ClusterConfig(method="original")
    # blob A: 3 detections x 20 candidates x weight 10 = 600 > 2 x 200; blob B: 1 detection (200): dropped
    a = [_blob((0, 0, 0), 20, 10, s, s, rng) for s in range(3)]
    b = [_blob((1, 0, 0), 20, 10, 3, 3, rng)]
    kept = original_clusters(_candidates(a + b), config)
    assert len(kept) == 1 and kept[0].weight == pytest.approx(600.0)
    assert kept[0].centroid.norm().item() < 0.01
    # strict: B from 2 detections weighs 400 = 2 x 200, not more -> still dropped
    b2 = [_blob((1, 0, 0), 20, 10, s, s, rng) for s in (3, 4)]
    assert len(original_clusters(_candidates(a + b2), config)) == 1
    # B from 3 detections (600) passes too: several keypoints for one name, heaviest first
    b3 = [_blob((1, 0, 0), 20, 10, s, s, rng) for s in (3, 4, 5)]
    both = original_clusters(_candidates(a + b3), config)
    assert len(both) == 2 and {round(c.centroid[0].item()) for c in both} == {0, 1}
    # none passes (each blob one detection): every cluster is kept
    single = [_blob((0, 0, 0), 20, 10, 0, 0, rng), _blob((1, 0, 0), 20, 10, 1, 1, rng)]
    assert len(original_clusters(_candidates(single), config)) == 2


def test_weighted_centroid_not_snapped_and_single_candidate_kept():
    rng = np.random.default_rng(2)
    blobs = [_blob((0, 0, 0), 20, 10, s, s, rng) for s in range(3)] + [
        _blob((1, 0, 0), 20, 10, s, s, rng) for s in range(3, 6)
    ]
    c = _candidates(blobs)
    c.weight[:] = torch.as_tensor(rng.integers(1, 256, len(c)), dtype=torch.float32)  # uint8 alphas
    kept = original_clusters(c, ClusterConfig(method="original"))
    assert len(kept) == 2
    for k in kept:
        w, p = c.weight[k.members].double(), c.xyz[k.members].double()
        expected = (w[:, None] * p).sum(0) / w.sum()  # raw-weight average of the members, not snapped
        assert k.centroid.double() == pytest.approx(expected.float().double(), abs=1e-6)
        assert not torch.allclose(expected, p.mean(0), atol=1e-6)
        assert k.weight == pytest.approx(float(w.sum()))
    one = original_clusters(c.select(torch.arange(len(c)) == 0), ClusterConfig(method="original"))
    assert len(one) == 1 and one[0].centroid.tolist() == pytest.approx(c.xyz[0].tolist())


def test_subsample_caps_the_candidates():
    rng = np.random.default_rng(3)
    c = _candidates([_blob((0, 0, 0), 40, 10, s, s, rng) for s in range(3)])
    kept = original_clusters(c, ClusterConfig(method="original", max_candidates=30, seed=0))
    assert sum(k.size for k in kept) <= 30


# ------------------------------------------------------------------------------------------- names
def test_original_label_table_differs_from_bt3d_only_at_airplane_3_and_5():
    if not (SHARED / "semantic_names.json").is_file():
        pytest.skip("shared KeypointNet data not found")
    from zerokey.data import load_semantic_names

    ours, orig = (
        load_semantic_names(SHARED / "semantic_names.json"),
        original_label_table(SHARED / "semantic_names.json"),
    )
    diff = {(c, i) for c in ours for i in ours[c] if ours[c][i] != orig[c][i]}
    assert diff == {("airplane", 3), ("airplane", 5)}
    assert orig["airplane"][3] == "the end of the left wing of the airplane"
    assert orig["chair"][10] == orig["chair"][12] == "lower end of the front leg of the chair"


def test_original_namer_groups_the_annotated_ids_of_the_shape(tmp_path):
    table = {"categories": {"chair": {str(i): {"name": n} for i, n in enumerate(["a", "a", "b", "c"])}}}
    path = tmp_path / "names.json"
    path.write_text(json.dumps(table))
    namer = OriginalLabelNamer(str(path))
    shape = ShapeSample("s", "s", torch.zeros(1, 3), None, torch.zeros(3), 1.0, category="chair")
    shape.extra = {"semantic_ids": [1, 0, 3, 0]}  # "b" (id 2) is not annotated: not asked
    result = namer(shape, torch.zeros(1, 2, 2, 3))
    assert result.names == ["a", "c"] and result.instances == [2, 1]
    shape.extra = {}
    with pytest.raises(ValueError, match="semantic ids annotated"):
        namer(shape, torch.zeros(1, 2, 2, 3))


def test_oracle_matches_original_labels():
    oracle = OraclePointer(labels="original")
    shape = ShapeSample("s", "s", torch.zeros(1, 3), None, torch.zeros(3), 1.0, category="airplane")
    shape.keypoint_names = ["wingtip of the left wing of the airplane", "nose of the airplane"]
    shape.extra = {"semantic_ids": [3, 0]}
    assert oracle._keypoint_names(shape) == [
        "the end of the left wing of the airplane",
        "nose of the airplane",
    ]


# ------------------------------------------------------------------------------------------- evaluation
def test_original_geodesics_replace_unreachable_by_the_largest_finite():
    # two far-apart groups of 3 points with k = 2: two components
    pcd = np.array([[0, 0, 0], [0.1, 0, 0], [0.2, 0, 0], [5, 0, 0], [5.1, 0, 0], [5.3, 0, 0]], dtype=float)
    d, unreachable = original_geodesics(pcd, k=2)
    assert unreachable == 18  # 2 x 3 x 3 pairs
    assert d[0, 3] == pytest.approx(0.3) and d[0, 2] == pytest.approx(0.2)  # largest finite = 0.3


def test_original_protocol_counts_duplicates_and_skips_failed_shapes(tmp_path):
    pcd = np.array([[0.01 * i, 0, 0] for i in range(30)], dtype=np.float32)
    (tmp_path / "c").mkdir()
    header = "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
    header += f"WIDTH {len(pcd)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(pcd)}\nDATA ascii\n"
    (tmp_path / "c" / "m.pcd").write_text(header + "\n".join(" ".join(map(str, p)) for p in pcd) + "\n")
    (tmp_path / "c" / "n.pcd").write_text((tmp_path / "c" / "m.pcd").read_text())
    kps = [{"pcd_info": {"point_index": i}, "semantic_id": 0} for i in (0, 0, 20)]  # index 0 twice
    annotations = {("c", "m"): {"keypoints": kps}, ("c", "n"): {"keypoints": kps}}
    records = [
        {
            "shape_id": "c/m",
            "class_id": "c",
            "model_id": "m",
            "status": "complete",
            "keypoints": [{"xyz": [0, 0, 0]}],
        },
        {
            "shape_id": "c/n",
            "class_id": "c",
            "model_id": "n",
            "status": "failed",
            "error": "x",
            "keypoints": [],
        },
    ]
    orig = evaluate_predictions(records, annotations, tmp_path, ORIGINAL_THRESHOLDS, protocol="original")
    # 3 GT (0 counted twice), the prediction hits both copies of 0: IoU = 2 / 3; the failed shape is left out
    assert orig.iou["c"][0] == pytest.approx(2 / 3)
    assert orig.shapes["c"] == 1 and orig.skipped["not_complete"] == ["c/n"]
    assert len(orig.thresholds) == 21 and orig.thresholds[-1] == pytest.approx(0.2)
    ours = evaluate_predictions(records, annotations, tmp_path, (0.0,))
    # ours: GT is a set {0, 20} per shape, the failed shape counts as misses: (4 - 3) / 4
    assert ours.iou["c"][0] == pytest.approx(1 / 4)


# ------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["original.yaml", "original_oracle.yaml"])
def test_presets_state_every_original_setting(name):
    cfg = yaml.safe_load((REPO / "configs" / "zerokey" / name).read_text())["model"]
    assert cfg["namer"]["class_path"] == "zerokey.mllm.namers.OriginalLabelNamer"
    assert cfg["views"] == {
        "layout": "original",
        "distance": 1.0,
        "fov_deg": 60.0,
        "image_size": 1024,
        "shading": "original",
    }
    assert cfg["voting"] == "disc" and cfg["disc_radius"] == 15.0 and cfg["snap"] == "none"
    assert cfg["cluster"]["method"] == "original" and cfg["cluster"]["ladder_start"] == 10
    assert cfg["cluster"]["max_candidates"] == 10000 and cfg["cluster"]["keep_factor"] == 2.0
    if name == "original.yaml":
        args = cfg["pointer"]["init_args"]
        assert args["prompt"] == "point to the {name} on this image"
        assert (args["parse"], args["max_points"], args["send_size"], args["max_tokens"]) == (
            "xml",
            8,
            512,
            2000,
        )


def test_oracle_preset_runs_end_to_end_on_a_small_mesh(tmp_path):
    """The offline preset on a synthetic KeypointNet root (one box chair), at a small image size."""
    import trimesh

    root = tmp_path / "kpn"
    box = trimesh.creation.box(extents=(0.4, 0.6, 0.3))
    (root / "meshes" / "03001627").mkdir(parents=True)
    box.export(root / "meshes" / "03001627" / "m1.ply")
    pts = np.asarray(
        box.sample(2048, seed=0) if "seed" in box.sample.__code__.co_varnames else box.sample(2048)
    )
    (root / "pcds" / "03001627").mkdir(parents=True)
    header = "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
    header += f"WIDTH {len(pts)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(pts)}\nDATA ascii\n"
    (root / "pcds" / "03001627" / "m1.pcd").write_text(header + "\n".join(" ".join(map(str, p)) for p in pts))
    corners = box.vertices[:2]
    kps = [
        {
            "xyz": c.tolist(),
            "semantic_id": i,
            "pcd_info": {"point_index": int(np.argmin(((pts - c) ** 2).sum(1)))},
        }
        for i, c in enumerate(corners)
    ]
    (root / "annotations").mkdir()
    (root / "annotations" / "chair.json").write_text(
        json.dumps([{"class_id": "03001627", "model_id": "m1", "keypoints": kps}])
    )
    names = {"categories": {"chair": {"0": {"name": "upper corner"}, "1": {"name": "upper corner"}}}}
    (root / "semantic_names.json").write_text(json.dumps(names))
    from zerokey.cluster import ClusterConfig as CC
    from zerokey.pipeline import ZeroKeyPipeline
    from zerokey.views import ViewConfig

    pipe = ZeroKeyPipeline(
        OriginalLabelNamer(str(root / "semantic_names.json")),
        OraclePointer(labels="original"),
        ViewConfig(layout="original", distance=1.0, fov_deg=60.0, image_size=96, shading="original"),
        voting="disc",
        disc_radius=3.0,
        cluster=CC(method="original"),
        snap="none",
        keep_all_clusters=False,
    )
    shape = KeypointNetDataset(root)[0]
    record = pipe.predict(shape).record
    assert record["status"] == "complete" and record["names"] == ["upper corner"]
    assert record["counts"]["views"] == 26 and record["counts"]["candidates"] > 0
    found = np.array([k["xyz"] for k in record["keypoints"]])
    assert len(found) >= 1
    # every kept cluster lies near one of the two annotated corners (input frame)
    d = np.linalg.norm(found[:, None] - corners[None], axis=-1).min(1)
    assert (d < 0.05).all(), d


def test_six_view_ablation_layout_is_four_equatorial_views_and_the_poles():
    d = original_view_directions(partition=1).numpy()
    assert d.shape == (6, 3)
    assert d[:4, 1] == pytest.approx([0.0, -0.001, 0.0, 0.001], abs=1e-6)  # the equator (tilted)
    assert d[0] == pytest.approx([1, 0, 0]) and d[2] == pytest.approx([-1, 0, 0])
    assert d[4] == pytest.approx([0, 1, 0.001], abs=1e-6)


def test_authors_ablation_clusterings_raw_mean_and_binary():
    rng = np.random.default_rng(4)
    c = _candidates([_blob((0, 0, 0), 10, 5, 0, 0, rng), _blob((1, 0, 0), 30, 1, 1, 1, rng)])
    from zerokey.cluster import cluster_candidates

    (raw,) = cluster_candidates(c, 1, ClusterConfig(method="raw_mean"))
    assert len(raw) == 1  # one unweighted mean: 10 at x=0 and 30 at x=1 -> x = 0.75 (weights ignored)
    assert raw[0].centroid[0].item() == pytest.approx(0.75, abs=0.01)
    (binary,) = cluster_candidates(c, 1, ClusterConfig(method="binary"))
    assert sorted(round(k.centroid[0].item()) for k in binary) == [0, 1]  # both blobs kept, unweighted


def test_original_oracle_preset_cli_predict_then_evaluate_protocol_original(tmp_path, capsys):
    """The shipped offline preset through ``python -m zerokey predict`` (one shared airplane, small
    renders), then ``evaluate --protocol original --out``."""
    if not (SHARED / "annotations").is_dir():
        pytest.skip("shared KeypointNet data not found")
    from zerokey.__main__ import main

    run = tmp_path / "run"
    args = ["predict", "--config", str(REPO / "configs" / "zerokey" / "original_oracle.yaml")]
    args += ["--trainer.default_root_dir", str(run), "--data.keypointnet_root", str(SHARED)]
    args += ["--data.categories", "[airplane]", "--data.limit", "1", "--trainer.enable_progress_bar", "false"]
    args += ["--model.views.image_size", "128", "--model.disc_radius", "2.0"]
    main(args)
    out = capsys.readouterr().out
    assert "original protocol (ground-truth names)" in out and "OraclePointer" in out
    manifest = json.loads((run / "run.json").read_text())
    assert any("original protocol (ground-truth names)" in n for n in manifest["notes"])
    assert manifest["dropped_views"] == {
        "views": 0,
        "xml_error": 0,
        "too_many_points": 0,
        "scope": "all shapes",
    }
    (record_path,) = (run / "02691156").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete" and record["counts"]["views"] == 26
    eval_json = tmp_path / "eval.json"
    main(
        ["evaluate", "--protocol", "original", "--pred", str(run), "--pcd-root", str(SHARED / "pcds")]
        + ["--annotations", str(SHARED / "annotations" / "airplane.json"), "--out", str(eval_json)]
    )
    result = json.loads(eval_json.read_text())
    assert result["protocol"] == "original" and len(result["thresholds"]) == 21
    assert len(result["mean_iou"]) == 21 and 0.0 <= result["mean_iou"][-1] <= 1.0
    assert result["shapes"] == {"airplane": 1}


# ------------------------------------------------------------------------------------------- analyses
def test_xy_json_answers_walked_as_the_localisation_ablation():
    from zerokey.mllm.parsing import parse_xy_json

    pairs, stats = parse_xy_json('{"points": [[100, 200], {"x": 5, "y": 6.5}], "nose": {"tip": [1, 2]}}')
    assert pairs == [(100.0, 200.0), (5.0, 6.5), (1.0, 2.0)] and stats.points == 3
    pairs, stats = parse_xy_json('Sure! ```json\n{"nose": [10, 20]}\n```')
    assert pairs == [(10.0, 20.0)]
    pairs, stats = parse_xy_json("I cannot see it.")
    assert pairs == [] and stats.garbage == 1
    assert parse_xy_json('{"a": [1, 2, 3], "b": [true, 2]}')[0] == []  # neither is an (x, y) pair


def test_json_xy_pointer_maps_sent_pixels_to_render_pixels_and_sends_sampling():
    bodies = []

    def answer(request):
        if not request.images:
            return "OK"
        bodies.append(request.body)
        return '{"points": [[4, 2]]}'  # pixels of the 8 px image sent

    views = RenderedViews(
        images=torch.full((1, 16, 16, 3), 0.5),
        cameras=None,  # type: ignore[arg-type]
        depth=torch.ones(1, 16, 16),
        mask=torch.ones(1, 16, 16, dtype=torch.bool),
    )
    shape = ShapeSample("s", "s", torch.zeros(1, 3), None, torch.zeros(3), 1.0)
    with FakeChatServer(answer) as server:
        pointer = OpenAIPointer(
            server.base_url,
            "gpt",
            api_key_env=None,
            prompt="Point to the {name} in this image. Output the point locations (xy)",
            parse="json_xy",
            send_size=8,
            temperature=1.0,
            extra_body={"response_format": {"type": "json_object"}},
            max_workers=1,
        )
        points = pointer(shape, ["nose"], views)
    assert points.uv.tolist() == [[8.0, 4.0]]  # (4, 2) of 8 px -> (8, 4) of the 16 px render
    assert bodies[0]["temperature"] == 1.0 and bodies[0]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("name", ["original_gpt4o_localize.yaml", "original_global_prompt.yaml"])
def test_analysis_presets_differ_from_the_original_only_in_naming_or_pointing(name):
    base = yaml.safe_load((REPO / "configs" / "zerokey" / "original.yaml").read_text())["model"]
    cfg = yaml.safe_load((REPO / "configs" / "zerokey" / name).read_text())["model"]
    for key in ("views", "voting", "disc_radius", "cluster", "snap"):
        assert cfg[key] == base[key], key
    if name == "original_global_prompt.yaml":
        assert cfg["namer"]["init_args"]["names"] == ["salient keypoints"]
        prompt = cfg["pointer"]["init_args"]["prompt"].format(name="salient keypoints")
        assert prompt == "point to the salient keypoints in this image"
    else:
        args = cfg["pointer"]["init_args"]
        assert (args["model"], args["parse"], args["temperature"], args["send_size"]) == (
            "gpt-4o",
            "json_xy",
            1.0,
            512,
        )


def test_textured_and_position_map_colours():
    from patchalign.render import look_at_cameras
    from zerokey.original import position_colors

    vertices = torch.tensor([[-1.0, -1, 0], [1, -1, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2]])
    colours = position_colors(vertices)
    assert colours.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 1.0, 0.0]]  # z is flat: 0
    cams = look_at_cameras(torch.tensor([[0.0, 0.0, 5.0]]), fov_deg=30.0, image_size=4)
    pix = torch.zeros((1, 4, 4), dtype=torch.long)
    bary = torch.zeros(1, 4, 4, 3)
    bary[..., 1] = 1.0  # every pixel at vertex 1: colour (1, 0, 0)
    image = original_shading(pix, vertices, faces, cams, vertex_colors=colours, bary=bary)
    grey = original_shading(pix, vertices, faces, cams)
    cos = 5.0 / math.sqrt(25.0 + 1.0 / 9.0)
    spec = grey[0, 0, 0, 0].item() - 0.7 * (0.5 + 0.3 * cos)
    assert image[0, 0, 0].tolist() == pytest.approx([0.5 + 0.3 * cos + spec, spec, spec], abs=1e-6)


def test_vertex_colours_read_from_the_mesh_file(tmp_path):
    import trimesh

    from zerokey.data import load_shape
    from zerokey.views import vertex_texture

    mesh = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)
    mesh.visual.vertex_colors = [[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255]]
    mesh.export(tmp_path / "c.ply")
    shape = load_shape(tmp_path / "c.ply")
    assert vertex_texture(shape, "vertex_colors").tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False).export(tmp_path / "g.obj")
    with pytest.raises(ValueError, match="no colour per vertex"):
        vertex_texture(load_shape(tmp_path / "g.obj"), "vertex_colors")
    from zerokey.views import ViewConfig

    with pytest.raises(ValueError, match="needs views.shading 'original'"):
        ViewConfig(texture="position")


def test_stub_server_can_count_without_keeping_requests():
    """A bench sends thousands of images: keep_requests=False keeps none (before: ~1 MB each kept)."""
    from zerokey.mllm.client import ChatClient

    with FakeChatServer(lambda request: "ok", keep_requests=False, max_requests=2) as server:
        client = ChatClient(server.base_url, "m", None, max_retries=0)
        image = torch.zeros(8, 8, 3)
        assert client.complete("hi", [image]) == "ok" and client.complete("hi", [image]) == "ok"
        assert server.served == 2 and server.requests == []
        from zerokey.mllm.client import ChatError

        with pytest.raises(ChatError):
            client.complete("hi", [image])  # the third is over max_requests: 503


def test_dropped_views_are_summed_for_run_json():
    from zerokey.writer import dropped_views

    summary = {
        "parse_stats": {"pointer": {"xml_error": 3, "too_many_points": 2, "points": 9}},
        "world_size": 1,
    }
    assert dropped_views(summary) == {"views": 5, "xml_error": 3, "too_many_points": 2, "scope": "all shapes"}
    assert dropped_views({"parse_stats": {}, "world_size": 2})["scope"] == "rank 0 of 2"


def test_describe_then_retrieve_with_a_stub_mllm(tmp_path):
    """The describability study end to end on a box: the marked corner is named through a stub server,
    retrieved with the oracle pointer (which knows where that name is), and scored."""
    import trimesh

    from zerokey.describe import DescribeNamer, clean_name, describability, mark_point
    from zerokey.pipeline import ZeroKeyPipeline
    from zerokey.views import ViewConfig

    assert clean_name('  "Left wing tip."\nbecause ...') == "Left wing tip"
    marked = mark_point(torch.zeros(5, 5, 3), (2.5, 2.5), 1.0)
    assert marked[2, 2].tolist() == [1.0, 0.0, 0.0] and marked[0, 0].tolist() == [0.0, 0.0, 0.0]

    box = trimesh.creation.box(extents=(0.4, 0.6, 0.3))
    box.export(tmp_path / "box.ply")
    from zerokey.data import load_shape

    shape = load_shape(tmp_path / "box.ply", category="chair")
    corner = torch.as_tensor(box.vertices[:1], dtype=torch.float32)
    shape.keypoints = shape.to_normalised(corner)
    shape.keypoint_names = ["red corner"]
    prompts = []

    def answer(request):
        if not request.images:
            return "OK"
        prompts.append(request.text)
        reds = (request.images[0][..., 0] > 200) & (request.images[0][..., 1] < 50)
        return "red corner." if reds.any() else "nothing"

    with FakeChatServer(answer) as server:
        namer = DescribeNamer(server.base_url, "m", api_key_env=None, marked="keypoint", radius_px=3)
        pipe = ZeroKeyPipeline(namer, OraclePointer(), ViewConfig(image_size=96))
        record = pipe.predict(shape).record
    assert prompts == ["Precisely name the part of the chair marked by the red dot. Answer with just a name."]
    assert record["names"] == ["red corner"] and record["naming_details"]["marked"] == "keypoint"
    assert record["naming_details"]["marked_xyz"] == pytest.approx(box.vertices[0].tolist(), abs=1e-5)
    scores = describability([record])
    assert scores["keypoint"]["shapes"] == 1 and scores["keypoint"]["retrieved"]["0.10"] == 1.0


def test_describe_cli_scores_a_run_folder(tmp_path, capsys):
    from zerokey.__main__ import main

    record = {
        "shape_id": "c/m",
        "status": "complete",
        "keypoints": [{"xyz": [0.0, 0.0, 0.03]}],
        "naming_details": {"marked": "random", "marked_xyz": [0.0, 0.0, 0.0]},
    }
    (tmp_path / "run" / "c").mkdir(parents=True)
    (tmp_path / "run" / "c" / "m.json").write_text(json.dumps(record))
    main(["describe", "--pred", str(tmp_path / "run"), "--out", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert "non-salient (random): 1 shapes, within 0.05: 1.000, within 0.10: 1.000, median 0.0300" in out
    assert json.loads((tmp_path / "d.json").read_text())["random"]["median_distance"] == pytest.approx(0.03)
    with pytest.raises(SystemExit, match="exists"):
        main(["describe", "--pred", str(tmp_path / "run"), "--out", str(tmp_path / "d.json")])
