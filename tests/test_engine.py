"""The shard data engine: sampling, back-projection, Find3D labels, end-to-end runs, resume, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
from conftest import read_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from patchalign.engine import stages as engine  # noqa: E402
from patchalign.engine.backproject import (  # noqa: E402
    NoVisiblePointsError,
    backproject_features,
    face_feature_sums,
    fill_unseen,
)
from patchalign.engine.build import run_build  # noqa: E402
from patchalign.engine.config import EngineConfig, config_from_dict  # noqa: E402
from patchalign.engine.records import ObjectRecord, chunk_records, discover_meshes  # noqa: E402
from patchalign.engine.sources.find3d import find3d_records, membership_from_masks  # noqa: E402
from patchalign.engine.workdir import WorkDir  # noqa: E402
from patchalign.geometry import sample_surface  # noqa: E402

# Tiny settings: 2048 points is the shard schema's minimum; 3 views of 64 px; random DINOv2 at 56 px;
# one torch thread (tiny per-object tensors: intra-op threads only add overhead, worse on a shared box).
TINY = dict(
    threads=1,
    n_points=2048,
    n_views=3,
    image_size=64,
    teacher="dinov2-random",
    teacher_input_size=56,
    text_encoder="demo",
    progress=False,
)


# ----------------------------------------------------------------------------------------- sampling
def test_sample_surface_area_weighted_on_faces_and_seeded():
    # Triangle 0 has area 0.5, triangle 1 (scaled x3 in both axes) area 4.5: expect 10% / 90%.
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 1], [5, 0, 1], [2, 3, 1]], dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [3, 4, 5]])
    s = sample_surface(v, f, 20000, seed=7)
    frac0 = (s.face_ids == 0).float().mean().item()
    assert abs(frac0 - 0.1) < 0.01
    # Every point lies inside its own triangle: z matches the face's plane, barycentrics in [0, 1].
    tri = v[f[s.face_ids]]
    assert torch.allclose(s.points[:, 2], tri[:, 0, 2])
    e1, e2, d = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], s.points - tri[:, 0]
    a = torch.linalg.solve(torch.stack([e1[:, :2], e2[:, :2]], dim=2), d[:, :2])
    assert (a >= -1e-5).all() and (a.sum(1) <= 1 + 1e-5).all()
    assert torch.allclose(s.normals.abs(), torch.tensor([0.0, 0.0, 1.0]).expand_as(s.normals))
    again = sample_surface(v, f, 20000, seed=7)
    assert torch.equal(again.points, s.points) and torch.equal(again.face_ids, s.face_ids)
    assert not torch.equal(sample_surface(v, f, 20000, seed=8).points, s.points)


def test_sample_surface_rejects_empty_and_degenerate():
    with pytest.raises(ValueError, match="empty"):
        sample_surface(torch.zeros(3, 3), torch.zeros(0, 3, dtype=torch.long), 10, 0)
    with pytest.raises(ValueError, match="zero"):
        sample_surface(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), 10, 0)


# ----------------------------------------------------------------------------------------- back-projection
def test_backprojection_hand_worked():
    """Two views of 2x3 pixels with per-pixel features (grid == image, so no interpolation).

    face 0: pixels with features (1,0,0,0), (3,0,0,0) in view 0 and (0,2,0,0) in view 1
            -> mean (4/3, 2/3, 0, 0) -> unit (2, 1, 0, 0)/sqrt(5)
    face 1: one pixel (0,0,5,0) -> unit (0, 0, 1, 0)
    face 2: never seen; its point at x=0.9 has nearest seen points x=1.0 (face 1), x=0.5 (face 1)
            then x=0.0 (face 0); with k=2 it takes the mean of two face-1 units -> (0,0,1,0),
            with k=3 mean of (0,0,1,0),(0,0,1,0),(2,1,0,0)/sqrt5 -> normalised.
    """
    c = 4
    feat = torch.zeros(2, c, 2, 3)
    p2f = torch.full((2, 2, 3), -1)
    p2f[0, 0, 0], feat[0, :, 0, 0] = 0, torch.tensor([1.0, 0, 0, 0])
    p2f[0, 1, 2], feat[0, :, 1, 2] = 0, torch.tensor([3.0, 0, 0, 0])
    p2f[1, 0, 1], feat[1, :, 0, 1] = 0, torch.tensor([0.0, 2, 0, 0])
    p2f[1, 1, 1], feat[1, :, 1, 1] = 1, torch.tensor([0.0, 0, 5, 0])
    feat[0, :, 0, 1] = 100.0  # background pixel: must be ignored
    face_ids = torch.tensor([0, 0, 1, 1, 2])
    points = torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [0.5, 0, 0], [1.0, 0, 0], [0.9, 0, 0]])
    u0 = torch.tensor([2.0, 1, 0, 0]) / 5**0.5
    u1 = torch.tensor([0.0, 0, 1, 0])

    res = backproject_features(feat, p2f, face_ids, points, k_unseen=2, view_batch=1)
    assert res.seen.tolist() == [True, True, True, True, False]
    expected = torch.stack([u0, u0, u1, u1, u1])
    torch.testing.assert_close(res.features, expected)

    res3 = backproject_features(feat, p2f, face_ids, points, k_unseen=3)
    torch.testing.assert_close(res3.features[4], F.normalize(2 * u1 + u0, dim=0))

    sums, counts = face_feature_sums(feat, p2f, torch.tensor([1, 0]))
    assert counts.tolist() == [1, 3]
    torch.testing.assert_close(sums, torch.tensor([[0.0, 0, 5, 0], [4.0, 2, 0, 0]]))


def test_backprojection_coarse_grid_matches_upsample_then_average():
    torch.manual_seed(1)
    grid = torch.randn(3, 6, 4, 5)
    p2f = torch.randint(-1, 9, (3, 19, 23))
    face_ids = torch.randint(0, 12, (300,))  # faces 9..11 are never rendered
    points = torch.randn(300, 3)
    res = backproject_features(grid, p2f, face_ids, points, k_unseen=4, view_batch=2)
    dense = F.interpolate(grid, size=(19, 23), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    means = torch.stack([dense[p2f == f].mean(0) if (p2f == f).any() else torch.zeros(6) for f in range(12)])
    seen = torch.tensor([(p2f == f).any().item() for f in range(12)])[face_ids]
    assert torch.equal(res.seen, seen)
    torch.testing.assert_close(
        res.features[seen], F.normalize(means[face_ids][seen], dim=1), atol=1e-5, rtol=1e-4
    )
    # Unseen: brute-force k nearest seen points.
    unit = F.normalize(means[face_ids], dim=1)
    d = torch.cdist(points[~seen], points[seen])
    nn = d.topk(4, largest=False).indices
    torch.testing.assert_close(
        res.features[~seen], F.normalize(unit[seen][nn].mean(1), dim=1), atol=1e-5, rtol=1e-4
    )


def test_released_view_average_hand_worked():
    """view_average="view": per-view pixel mean first, then every seeing view counts once.

    Same fixture as above: face 0 has (1,0,0,0), (3,0,0,0) in view 0 and (0,2,0,0) in view 1.
    pixel (ours):    mean of 3 pixels          = (4/3, 2/3, 0, 0)
    view (released): mean of (2,0,0,0) and (0,2,0,0) = (1, 1, 0, 0), counted by 2 views
    """
    feat = torch.zeros(2, 4, 2, 3)
    p2f = torch.full((2, 2, 3), -1)
    p2f[0, 0, 0], feat[0, :, 0, 0] = 0, torch.tensor([1.0, 0, 0, 0])
    p2f[0, 1, 2], feat[0, :, 1, 2] = 0, torch.tensor([3.0, 0, 0, 0])
    p2f[1, 0, 1], feat[1, :, 0, 1] = 0, torch.tensor([0.0, 2, 0, 0])
    p2f[1, 1, 1], feat[1, :, 1, 1] = 1, torch.tensor([0.0, 0, 5, 0])
    for view_batch in (1, 2):
        sums, counts = face_feature_sums(feat, p2f, torch.tensor([0, 1]), view_batch, view_average="view")
        assert counts.tolist() == [2, 1]
        torch.testing.assert_close(sums, torch.tensor([[2.0, 2, 0, 0], [0.0, 0, 5, 0]]))
    res = backproject_features(feat, p2f, torch.tensor([0, 1]), torch.zeros(2, 3), view_average="view")
    torch.testing.assert_close(res.features[0], torch.tensor([1.0, 1, 0, 0]) / 2**0.5)
    with pytest.raises(ValueError, match="view_average"):
        face_feature_sums(feat, p2f, torch.tensor([0]), view_average="median")


def test_released_bicubic_upsampling_matches_interpolate_then_view_mean():
    """upsample="bicubic" + view_average="view" equals materialising F.interpolate(bicubic) and
    averaging each face's pixels per view, then over the views that see it."""
    torch.manual_seed(2)
    grid = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    p2f = torch.randint(-1, 9, (3, 19, 23))
    faces = torch.arange(9)
    sums, counts = face_feature_sums(grid, p2f, faces, view_batch=2, upsample="bicubic", view_average="view")
    dense = F.interpolate(grid, size=(19, 23), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    for f in range(9):
        per_view = [dense[v][p2f[v] == f].mean(0) for v in range(3) if (p2f[v] == f).any()]
        assert counts[f].item() == len(per_view)
        torch.testing.assert_close(sums[f].double(), torch.stack(per_view).sum(0), atol=1e-5, rtol=1e-5)


def test_released_settings_are_engine_options(tmp_path):
    from patchalign.engine.config import RELEASED_TEACHER_SETTINGS

    cfg = EngineConfig(**{**TINY, **RELEASED_TEACHER_SETTINGS})
    sig = cfg.cache_signature()
    assert {k: sig[k] for k in RELEASED_TEACHER_SETTINGS} == RELEASED_TEACHER_SETTINGS
    with pytest.raises(ValueError, match="upsample"):
        EngineConfig(upsample="lanczos")
    with pytest.raises(ValueError, match="find3d_frame"):
        EngineConfig(find3d_frame="shapenet")


def test_no_visible_point_raises():
    with pytest.raises(NoVisiblePointsError):
        fill_unseen(torch.randn(5, 3), torch.randn(5, 4), torch.zeros(5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- Find3D labels
def test_find3d_membership_merges_names_and_drops_unknown():
    # 5 masks over 6 points, two views; "Leg" appears in both views, "unknown" must vanish.
    labels = ["Leg", "seat", "unknown", "leg", "arm_rest"]
    m2p = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],  # Leg (view 0)
            [0, 0, 1, 0, 0, 0],  # seat
            [0, 0, 0, 1, 1, 0],  # unknown
            [0, 1, 0, 0, 0, 1],  # leg (view 1)
            [0, 0, 0, 0, 1, 0],  # arm_rest
        ]
    )
    membership, names = membership_from_masks(m2p, labels)
    assert names == ["leg", "seat", "arm rest"]
    expected = np.array(
        [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]],
        dtype=bool,
    )
    np.testing.assert_array_equal(membership, expected)
    membership, names = membership_from_masks(torch.ones(1, 4), ["unknown part"])
    assert names == [] and membership.shape == (4, 0)
    with pytest.raises(ValueError, match="does not match"):
        membership_from_masks(torch.ones(2, 4), ["a"])


def _write_find3d_fixture(root: Path, n_points: int = 2048) -> dict:
    """A Find3D-format object (layout as in ziqi-ma/Find3D dataengine), made from a labelled box.

    The box's faces are rendered and sampled with our own tools, then saved exactly as Find3D's
    scripts save them: points.pt / point2face.pt, pix2face.pt as float with -1, imgs/NN.jpeg,
    masks/merged/mask2points.pt (int64 0/1) + mask_labels.txt (one name per view, "unknown" dropped
    by them but we put one in to check the reader drops it too).
    """
    from PIL import Image

    from patchalign.render import find3d_view_layout, look_at_cameras, render_mesh

    box = trimesh.creation.box(extents=(1.0, 0.6, 0.8))
    v = torch.tensor(box.vertices, dtype=torch.float32)
    f = torch.tensor(box.faces, dtype=torch.long)
    s = sample_surface(v, f, n_points, seed=0)
    cams = look_at_cameras(find3d_view_layout(2, 3.0), fov_deg=45, image_size=48)
    r = render_mesh(v, f, cams)
    uid, cls = "0a1b2c", "storage_box"
    obj = root / "labeled" / "rendered" / f"{cls}_{uid}" / "oriented"
    pts_dir = root / "labeled" / "points" / uid
    (obj / "imgs").mkdir(parents=True)
    (obj / "masks" / "merged").mkdir(parents=True)
    pts_dir.mkdir(parents=True)
    torch.save(s.points, pts_dir / "points.pt")
    torch.save(s.face_ids, pts_dir / "point2face.pt")
    torch.save(r.pix_to_face * (r.pix_to_face >= 0) + -1.0 * (r.pix_to_face < 0), obj / "pix2face.pt")
    for i in range(2):
        Image.fromarray((r.image[i].numpy() * 255).astype(np.uint8)).save(obj / "imgs" / f"{i:02d}.jpeg")
    top = s.points[:, 1] > 0.29  # top face points
    bottom = s.points[:, 1] < -0.29
    m2p = torch.stack([top, bottom, top, ~top & ~bottom]).long()
    (obj / "masks" / "merged" / "mask_labels.txt").write_text("lid\nbase\nLid\nunknown\n")
    torch.save(m2p, obj / "masks" / "merged" / "mask2points.pt")
    (root / "labeled" / "split").mkdir()
    (root / "labeled" / "split" / "val.txt").write_text(f"{cls}_{uid}\n")
    return {"uid": uid, "top": top.numpy(), "bottom": bottom.numpy(), "pix_to_face": r.pix_to_face}


def test_find3d_source_end_to_end(tmp_path):
    fx = _write_find3d_fixture(tmp_path)
    records = find3d_records(tmp_path / "labeled")
    assert [(r.uid, r.category, r.split) for r in records] == [(fx["uid"], "storage box", "val")]
    work = WorkDir(tmp_path / "work")
    cfg = EngineConfig(**TINY)
    stats = run_build(records, work, cfg, tmp_path / "out", stages=("sample", "views", "labels", "write"))
    assert stats["views"].processed == 1 and stats["write:val"].processed == 1
    (sample,) = read_shards(tmp_path / "out" / "val")
    assert sample.part_names == ["lid", "base"]
    np.testing.assert_array_equal(sample.membership[:, 0], fx["top"])
    np.testing.assert_array_equal(sample.membership[:, 1], fx["bottom"])
    assert sample.meta["n_views"] == 2 and sample.meta["image_size"] == 48  # Find3D's renders were used
    assert (
        np.abs(np.linalg.norm(sample.points, axis=1).max() - 1.0) < 1e-5
    )  # re-normalised to the unit sphere
    assert sample.meta["seen_fraction"] > 0.3
    # Released: Find3D's raw frame kept, no re-normalisation (the fixture's points are the box's own).
    raw = run_build(
        records,
        WorkDir(tmp_path / "work_raw"),
        EngineConfig(**TINY, find3d_frame="raw"),
        tmp_path / "out_raw",
        stages=("sample", "views", "labels", "write"),
    )
    assert raw["write:val"].processed == 1
    (raw_sample,) = read_shards(tmp_path / "out_raw" / "val")
    stored = torch.load(tmp_path / "labeled" / "points" / fx["uid"] / "points.pt", weights_only=True).numpy()
    np.testing.assert_array_equal(raw_sample.points, stored.astype(np.float32))
    assert raw_sample.meta["normalization"]["frame"] == "find3d-raw"


# ----------------------------------------------------------------------------------------- end to end
def test_engine_on_real_meshes_end_to_end(tmp_path, shared_data):
    records = discover_meshes(shared_data / "meshes") + discover_meshes(
        shared_data / "keypointnet" / "meshes"
    )
    assert len(records) == 8
    kp = [r for r in records if r.category == "03001627"]
    assert len(kp) == 1  # category = parent directory
    work = WorkDir(tmp_path / "work")
    cfg = EngineConfig(**TINY)
    stats = run_build(records, work, cfg, tmp_path / "out")
    assert (
        stats["sample"].processed == 8
        and stats["views"].processed == 8
        and stats["write:train"].processed == 8
    )
    assert not (tmp_path / "out" / "text_bank.safetensors").exists()  # unlabelled meshes: no names to encode
    samples = {s.uid: s for s in read_shards(tmp_path / "out" / "train")}
    assert set(samples) == {r.uid for r in records}
    for s in samples.values():
        assert s.points.shape == (2048, 3) and s.features.shape == (2048, 192)
        assert np.linalg.norm(s.points, axis=1).max() <= 1.0 + 1e-5
        np.testing.assert_allclose(np.linalg.norm(s.features.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert s.membership.shape == (2048, 0)
        assert s.meta["teacher"].startswith("dinov2-random") and s.meta["n_views"] == 3
        # Dense meshes (bunny: 16k faces) at 64 px leave most faces between pixel centres (kNN-filled).
        assert s.meta["seen_fraction"] > 0.1, (s.uid, s.meta["seen_fraction"])
    # Points are where the mesh is: each stored point lies inside its face of the normalised mesh.
    from patchalign.render import load_mesh_normalized

    cow = next(r for r in records if r.uid == "cow")
    v, f = load_mesh_normalized(cow.path)
    cache = work.load("points", cow)
    np.testing.assert_array_equal(cache["points"], samples["cow"].points)
    tri = v[f[torch.from_numpy(cache["face_ids"])]].double()  # (N, 3, 3)
    p = torch.from_numpy(cache["points"]).double()
    e = torch.stack([tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]], dim=2)  # (N, 3, 2)
    bary = torch.linalg.lstsq(e, (p - tri[:, 0])[..., None]).solution[..., 0]
    residual = (e @ bary[..., None])[..., 0] - (p - tri[:, 0])
    assert residual.norm(dim=1).max() < 1e-5
    assert (bary >= -1e-4).all() and (bary.sum(1) <= 1 + 1e-4).all()


def test_resume_after_kill_redoes_only_unfinished(tmp_path, monkeypatch):
    from patchalign.engine.sources.demo import demo_records

    records = demo_records(6)
    work = WorkDir(tmp_path / "work")
    cfg = EngineConfig(**TINY)
    run_build(records, work, cfg, None, stages=("sample",))
    calls: list[str] = []
    real_render = engine.render_object

    def flaky_render(rec, *a, **k):
        calls.append(rec.uid)
        if len(calls) == 4:
            raise KeyboardInterrupt  # "killed" while processing the 4th object
        return real_render(rec, *a, **k)

    monkeypatch.setattr(engine, "render_object", flaky_render)
    with pytest.raises(KeyboardInterrupt):
        run_build(records, work, cfg, None, stages=("views",))
    done = sorted(p.name for p in (work.root / "pointfeat").iterdir())
    assert len(done) == 3 and not any(n.endswith(".tmp") for n in done)
    mtimes = {p: p.stat().st_mtime_ns for p in (work.root / "pointfeat").iterdir()}
    calls.clear()
    stats = run_build(records, work, cfg, None, stages=("sample", "views"))
    assert calls == [r.uid for r in records[3:]]  # finished objects are not rendered again
    assert stats["sample"].cached == 6 and stats["views"].cached == 3 and stats["views"].processed == 3
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_bad_inputs_are_counted_logged_and_skipped(tmp_path):
    mesh_dir = tmp_path / "meshes"
    mesh_dir.mkdir()
    (mesh_dir / "empty.obj").write_text("# no geometry\n")
    (mesh_dir / "garbage.glb").write_bytes(b"not a glb at all" * 10)
    (mesh_dir / "flat.ply").write_text(  # faces of zero area: cannot be sampled
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n"
    )
    trimesh.creation.icosphere(subdivisions=2).export(mesh_dir / "ball.obj")
    records = discover_meshes(mesh_dir)
    work = WorkDir(tmp_path / "work")
    stats = run_build(records, work, EngineConfig(**TINY), tmp_path / "out")
    assert (stats["sample"].processed, stats["sample"].failed) == (1, 3)
    assert stats["views"].missing_input == 3 and stats["write:train"].missing_input == 3
    failures = [json.loads(line) for line in work.failures_path.read_text().splitlines()]
    assert sorted(f["uid"] for f in failures) == ["empty", "flat", "garbage"]
    assert all(f["stage"] == "sample" and f["error"] for f in failures)
    assert [s.uid for s in read_shards(tmp_path / "out" / "train")] == ["ball"]


def test_all_failing_stage_raises_and_config_is_bound(tmp_path):
    work = WorkDir(tmp_path / "work")
    bad = [ObjectRecord(uid="missing", source="mesh", path=str(tmp_path / "nope.obj"))]
    with pytest.raises(RuntimeError, match="all 1 attempted objects failed"):
        run_build(bad, work, EngineConfig(**TINY), None, stages=("sample",))
    with pytest.raises(ValueError, match="other settings"):
        run_build(bad, work, EngineConfig(**{**TINY, "n_points": 4096}), None, stages=("sample",))
    # Same spec, different resolved teacher (real weights appeared / vanished): refused too.
    work.bind_teacher("dinov2:facebook/dinov2-base")
    work.bind_teacher("dinov2:facebook/dinov2-base")
    with pytest.raises(ValueError, match="holds features from teacher"):
        work.bind_teacher("dinov2-random(seed=0,hidden=192,layers=4,patch=14)")


def test_chunks_partition_the_objects():
    records = [ObjectRecord(uid=f"o{i}", source="mesh") for i in range(23)]
    chunks = [chunk_records(records, 5, i) for i in range(5)]
    assert [r.uid for c in chunks for r in c] == [r.uid for r in records]
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    with pytest.raises(ValueError):
        chunk_records(records, 5, 5)


def test_cli_stage_by_stage_matches_build(tmp_path, shared_data):
    """The subcommands (as a Slurm array would call them) produce the same shards as one build."""
    from patchalign.engine.__main__ import main

    meshes = tmp_path / "m"
    meshes.mkdir()
    for name in ("Duck.glb", "bunny.ply"):
        (meshes / name).symlink_to(shared_data / "meshes" / name)
    common = ["--n-points", "2048", "--n-views", "2", "--image-size", "48", "--teacher", "dinov2-random"]
    common += ["--teacher-input-size", "28", "--no-progress"]
    w1, w2 = str(tmp_path / "w1"), str(tmp_path / "w2")
    for chunk in ("0", "1"):
        main(
            [
                "sample",
                "--meshes",
                str(meshes),
                "--work",
                w1,
                "--num-chunks",
                "2",
                "--chunk-id",
                chunk,
                *common,
            ]
        )
    for stage in ("render", "features", "backproject", "labels"):
        main([stage, "--work", w1, *common])
    main(["write", "--work", w1, "--out", str(tmp_path / "o1"), *common])
    main(["build", "--meshes", str(meshes), "--work", w2, "--out", str(tmp_path / "o2"), *common])
    a = {s.uid: s for s in read_shards(tmp_path / "o1" / "train")}
    b = {s.uid: s for s in read_shards(tmp_path / "o2" / "train")}
    assert set(a) == set(b) == {"Duck", "bunny"}
    for uid in a:
        np.testing.assert_array_equal(a[uid].points, b[uid].points)
        # fp16 grid cache (stage by stage) vs fp32 in memory (fused): equal to fp16 precision.
        cos = (a[uid].features.astype(np.float32) * b[uid].features.astype(np.float32)).sum(1)
        assert cos.min() > 0.995


def test_cli_flags_are_derived_from_engine_config():
    """Every EngineConfig setting (but ``progress``) is an option of the stage verbs with the field's
    type, choices (Literal) and docstring help, in the former argparse spellings too, and the parsed
    options rebuild the config the engine receives."""
    import dataclasses

    from patchalign.engine.__main__ import _engine_config, build_parser
    from patchalign.engine.cli import normalize_argv

    parser = build_parser()
    argv = normalize_argv(
        ["build", "--work", "w", "--out", "o", "--n-points", "1024", "--camera_distance", "3.5"]
        + ["--templates", "{part}", "the {part}", "--teacher-resize", "bilinear-antialias", "--keep-renders"]
    )
    ns = parser.parse_args(argv)
    cfg = _engine_config(ns.build, {"n_points"})
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(EngineConfig)
        if getattr(cfg, f.name) != getattr(EngineConfig(), f.name)
    }
    assert changed == {
        "n_points": 1024,
        "camera_distance": 3.5,
        "templates": ("{part}", "the {part}"),
        "teacher_resize": "bilinear-antialias",
        "keep_renders": True,
    }
    with pytest.raises(Exception, match="upsample"):  # choices come from the field's Literal type
        parser.parse_args(["build", "--work", "w", "--out", "o", "--upsample", "nearest"])
    build_help = parser._subcommands_action._name_parser_map["build"].format_help()
    for f in dataclasses.fields(EngineConfig):
        if f.name != "progress":
            assert f"--{f.name}" in build_help, f.name
    assert "seen neighbours averaged for points no view sees" in build_help  # the field's docstring
    assert "teacher" in EngineConfig.cache_fields() and "device" not in EngineConfig.cache_fields()
    assert config_from_dict({"templates": ["a"]}).templates == ("a",)


def test_cli_released_teacher_fills_only_what_the_command_line_left(tmp_path):
    from patchalign.engine.__main__ import _engine_config, build_parser
    from patchalign.engine.cli import normalize_argv
    from patchalign.engine.config import RELEASED_TEACHER_SETTINGS

    argv = normalize_argv(["sample", "--work", "w", "--released-teacher", "--k-unseen", "7"])
    ns = build_parser().parse_args(argv)
    cfg = _engine_config(ns.sample, {"k_unseen", "released_teacher"})
    assert cfg.k_unseen == 7
    assert cfg.find3d_frame == RELEASED_TEACHER_SETTINGS["find3d_frame"] == "raw"
    assert cfg.teacher_input_size == RELEASED_TEACHER_SETTINGS["teacher_input_size"]


def test_a_registered_source_plugs_into_the_stages(tmp_path, monkeypatch):
    """A user source (here: a two-part box whose top faces are "lid") runs through sample + labels
    with no engine change; each sampled point's label is its face's, checked against the geometry."""
    import torch

    from patchalign.engine import sources
    from patchalign.engine.sources import ObjectSource, register_source, source_of

    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))  # the registration ends with the test

    class LidBox(ObjectSource):
        kind = "lidbox"

        def mesh(self, record):
            import trimesh

            box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
            verts = torch.as_tensor(box.vertices, dtype=torch.float32)
            return verts, torch.as_tensor(box.faces), {"centre": [0.0, 0.0, 0.0], "scale": 1.0}

        def labels(self, record, face_ids):
            verts, faces, _ = self.mesh(record)
            top_face = (verts[faces][:, :, 2] > 0.49).all(1).numpy()  # the two triangles of +z
            top = top_face[face_ids]
            return np.stack([~top, top], 1), ["box", "lid"]

    register_source("lidbox", LidBox())
    rec = ObjectRecord(uid="box-0", source="lidbox", path="", category="box", split="train")
    work = WorkDir(tmp_path / "w")
    cfg = EngineConfig(n_points=512, progress=False)
    run_build([rec], work, cfg, None, stages=("sample", "labels"))
    pts = work.load("points", rec)["points"]
    lab = work.load("labels", rec)
    assert [str(n) for n in lab["part_names"]] == ["box", "lid"]
    on_top = np.isclose(pts[:, 2], 0.5, atol=1e-5)
    np.testing.assert_array_equal(lab["membership"][:, 1], on_top)  # lid = exactly the top face's points
    assert 0.05 < on_top.mean() < 0.35  # area-weighted: about 1/6 of the surface
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        source_of(ObjectRecord(uid="x", source="nope", path="", category="", split="train"))


def test_feature_splits_skip_the_teacher_for_evaluation_only_splits(tmp_path, monkeypatch):
    """Objects outside ``feature_splits`` are never rendered; they are written with their points and
    labels and ``(N, 0)`` features, while the featured split is unchanged."""
    import dataclasses

    from patchalign.engine.sources.demo import demo_records

    records = [
        dataclasses.replace(r, split="heldout" if i % 2 else "train") for i, r in enumerate(demo_records(4))
    ]
    rendered: list[str] = []
    real_render = engine.render_object
    monkeypatch.setattr(
        engine, "render_object", lambda rec, *a, **k: rendered.append(rec.uid) or real_render(rec, *a, **k)
    )
    cfg = EngineConfig(**TINY, feature_splits=("train",))
    stats = run_build(records, WorkDir(tmp_path / "w"), cfg, tmp_path / "out")
    assert sorted(rendered) == sorted(r.uid for r in records if r.split == "train")
    assert stats["views"].processed == 2 and stats["write:heldout"].processed == 2
    train = {s.uid: s for s in read_shards(tmp_path / "out" / "train")}
    heldout = {s.uid: s for s in read_shards(tmp_path / "out" / "heldout")}
    assert len(train) == 2 and all(
        s.features.shape[0] == 2048 and s.features.shape[1] > 0 for s in train.values()
    )
    for s in heldout.values():
        assert s.features.shape == (2048, 0) and s.meta["teacher"] == "none"
        assert s.membership.shape[0] == 2048 and s.membership.any(1).all()  # labels still there
    assert config_from_dict({"feature_splits": ["train", "val"]}).feature_splits == ("train", "val")
    typo = EngineConfig(**TINY, feature_splits=("trian",))
    with pytest.raises(ValueError, match=r"feature_splits names \['trian'\], which no object has"):
        run_build(records, WorkDir(tmp_path / "w2"), typo, tmp_path / "out2")
