"""Full-resolution segmentation at the trained scale (patchalign.segment) and its CLI (tools/segment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.pretrained import PretrainedPatchAlign
from patchalign.segment import nearest_sample_index, segment_shape


def _tiny_model(seed: int = 0) -> PretrainedPatchAlign:
    torch.manual_seed(seed)
    enc = PatchAlignEncoder(EncoderConfig.tiny(head_dim=16)).eval()
    return PretrainedPatchAlign(enc, {"logit": {"form": "scale", "scale": 10.0}})


class SignModel:
    """A stand-in with the model's interface whose answer is known: label 1 where x > 0, else 0.

    Probabilities are one-hot, so propagated and vote-averaged scores can be worked out by hand.
    """

    class _Cfg:
        up_axis = "y"

    class _Enc:
        pass

    def __init__(self) -> None:
        self.encoder = self._Enc()
        self.encoder.config = self._Cfg()
        self.device = torch.device("cpu")
        self.calls: list[tuple[int, ...]] = []

    def segment(self, points, parts, assign="nearest", **kwargs):
        self.calls.append(tuple(points.shape))
        labels = (points[..., 0] > 0).long()
        scores = torch.nn.functional.one_hot(labels, 2).float()
        return type("Seg", (), {"labels": labels, "scores": scores})()

    def text_embeddings(self, names, encoder=None):
        return torch.eye(len(names), 16)


def test_nearest_sample_index_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, samples = torch.rand(5000, 3, generator=g), torch.rand(300, 3, generator=g)
    expected = torch.cdist(queries.double(), samples.double()).argmin(-1)
    assert torch.equal(nearest_sample_index(queries, samples, chunk=777), expected)


def test_dense_cloud_labels_equal_the_models_own_sample_where_points_coincide():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    cloud = torch.randn(200_000, 3, generator=g)
    cloud = cloud / cloud.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(200_000, 1, generator=g))
    # "Part names" = four of the sample's own patch features, so a random network still splits it.
    first = segment_shape(model, cloud, torch.eye(4, 16), num_points=2048, seed=3)
    text = model.encode(first.samples[0]).patch_features[0, [0, 5, 10, 15]]
    seg = segment_shape(model, cloud, text, num_points=2048, seed=3)
    assert torch.equal(seg.samples, first.samples)  # seeded: the same 2048 points every time
    assert seg.point_labels.shape == (200_000,) and seg.point_scores.shape == (200_000, 4)
    assert seg.samples.shape == (1, 2048, 3)
    # The same 2048 points segmented directly: the labels of the sampled points must agree exactly.
    direct = model.segment(seg.samples[0], text)
    idx = nearest_sample_index(seg.samples[0], cloud)  # where each sample sits in the cloud
    assert torch.equal(cloud[idx], seg.samples[0])
    assert torch.equal(seg.point_labels[idx], direct.labels)
    assert torch.allclose(seg.point_scores[idx], direct.scores, atol=1e-6)
    assert len(torch.unique(seg.point_labels)) > 1  # not a degenerate all-one-label answer


def test_small_cloud_is_used_whole():
    model = _tiny_model()
    g = torch.Generator().manual_seed(2)
    cloud = torch.randn(100, 3, generator=g)
    text = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1)
    seg = segment_shape(model, cloud, text)
    assert seg.samples.shape == (1, 100, 3)
    assert torch.equal(seg.point_labels, model.segment(cloud, text).labels)


def test_mesh_vertices_and_faces_get_the_geometric_answer():
    """Two separated boxes, x < 0 and x > 0: every vertex and face takes its box's side."""
    import trimesh

    left = trimesh.creation.box(extents=(1, 1, 1))
    left.apply_translation((-1.5, 0, 0))
    right = trimesh.creation.box(extents=(1, 1, 1))
    right.apply_translation((1.5, 0, 0))
    mesh = trimesh.util.concatenate([left, right])
    mesh = mesh.subdivide().subdivide()
    verts, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    seg = segment_shape(SignModel(), verts, ["left", "right"], faces, num_points=512)
    assert torch.equal(seg.vertex_labels, torch.from_numpy(verts[:, 0] > 0).long())
    centroid_x = verts[faces].mean(1)[:, 0]
    assert torch.equal(seg.face_labels, torch.from_numpy(centroid_x > 0).long())
    assert seg.vertex_scores.shape == (len(verts), 2) and seg.face_scores.shape == (len(faces), 2)
    fractions = seg.part_fractions()
    assert fractions == pytest.approx({"left": 0.5, "right": 0.5})


def test_votes_run_as_one_batch_and_average_scores():
    """Two votes, the second rotated by pi about the up axis (y): x flips, so every score is 1/2."""
    model = SignModel()
    g = torch.Generator().manual_seed(4)
    cloud = torch.randn(5000, 3, generator=g)
    seg = segment_shape(model, cloud, ["a", "b"], num_points=256, votes=2, rotate=True)
    assert model.calls == [(2, 256, 3)]  # one forward for both votes
    # By hand: vote v's answer at point i is one-hot(sign of x of i's nearest sample, after rotation).
    expected = torch.zeros(5000, 2)
    for v, flip in ((0, 1.0), (1, -1.0)):
        nearest = torch.cdist(cloud.double(), seg.samples[v].double()).argmin(-1)
        expected += 0.5 * torch.nn.functional.one_hot((flip * seg.samples[v][nearest, 0] > 0).long(), 2)
    assert torch.allclose(seg.point_scores, expected, atol=1e-6)
    away = cloud[:, 0].abs() > 0.5  # both votes' samples near these points lie on the same side
    assert (seg.point_scores[away] == 0.5).float().mean() > 0.95
    plain = segment_shape(SignModel(), cloud, ["a", "b"], num_points=256, votes=3)
    assert (plain.point_labels[away] == (cloud[away, 0] > 0).long()).float().mean() > 0.95


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Lightning-format checkpoint whose recorded text encoder is the offline demo MiniLM."""
    from conftest import save_lightning_checkpoint

    pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    enc = PatchAlignEncoder(EncoderConfig.tiny(head_dim=384))
    hp = {"encoder_config": enc.config.to_dict(), "text_encoder": "demo"}
    return save_lightning_checkpoint(tmp_path_factory.mktemp("model") / "m.ckpt", enc, hparams=hp)


def _cli(*args: str) -> int:
    from patchalign.__main__ import main

    return main(["segment", *args, "--no_progress"])


def test_cli_segments_a_mesh_and_a_cloud_in_full(tmp_path: Path, model_ckpt: Path, shared_data: Path, capsys):
    """Per-vertex / per-face labels in file order, a coloured GLB with its legend, one GLB per part."""
    import trimesh

    mesh_path = shared_data / "meshes" / "teapot.obj"
    cloud_path = tmp_path / "cloud.txt"
    g = np.random.default_rng(0)
    np.savetxt(cloud_path, g.normal(size=(3000, 3)))
    out = tmp_path / "out"
    rc = _cli(
        str(mesh_path),
        str(cloud_path),
        "--parts",
        "spout, lid ,body",
        "--model",
        str(model_ckpt),
        "--out",
        str(out),
    )
    assert rc == 0
    assert "segmented 2, already done 0, skipped 0" in capsys.readouterr().out
    verts, faces = (
        trimesh.load(mesh_path, process=False).vertices,
        trimesh.load(mesh_path, process=False).faces,
    )
    z = np.load(out / "teapot" / "labels.npz")
    assert list(z["names"]) == ["spout", "lid", "body"]
    assert z["vertex_labels"].shape == (len(verts),) and z["face_labels"].shape == (len(faces),)
    assert z["face_scores"].shape == (len(faces), 3)
    assert np.allclose(z["face_scores"].sum(1), 1, atol=1e-5)
    assert (z["face_labels"] == z["face_scores"].argmax(1)).all()
    glb = trimesh.load(out / "teapot" / "segmented.glb")
    legend = glb.metadata["patchalign"]["legend"]
    assert list(legend) == ["spout", "lid", "body"] and all(c.startswith("#") for c in legend.values())
    parts = sorted(p.stem for p in (out / "teapot" / "parts").glob("*.glb"))
    used = sorted({["spout", "lid", "body"][i] for i in np.unique(z["face_labels"])})
    assert parts == used
    n_part_faces = sum(
        len(trimesh.load(p, force="mesh").faces) for p in (out / "teapot" / "parts").glob("*.glb")
    )
    assert n_part_faces == len(faces)
    c = np.load(out / "cloud" / "labels.npz")
    assert c["point_labels"].shape == (3000,) and c["point_scores"].shape == (3000, 3)
    ply = (out / "cloud" / "segmented.ply").read_bytes()
    assert b"comment patchalign part 0 spout #" in ply and b"element vertex 3000" in ply
    assert (out / "teapot" / "segmented.png").stat().st_size > 0


def test_cli_batch_resumes_skips_bad_files_and_never_replaces(tmp_path: Path, model_ckpt: Path, capsys):
    good = tmp_path / "in" / "good.npy"
    good.parent.mkdir()
    np.save(good, np.random.default_rng(1).normal(size=(500, 3)).astype(np.float32))
    (tmp_path / "in" / "empty.txt").write_text("")
    np.savetxt(tmp_path / "in" / "nan.xyz", np.full((100, 3), np.nan))
    np.savetxt(tmp_path / "in" / "few.txt", np.ones((10, 3)))
    (tmp_path / "in" / "notes.doc").write_text("x")
    out = tmp_path / "out"
    args = [
        str(tmp_path / "in"),
        str(tmp_path / "in" / "notes.doc"),
        "--parts",
        "a,b",
        "--model",
        str(model_ckpt),
    ]
    assert _cli(*args, "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "segmented 1, already done 0, skipped 4" in text
    for reason in ("empty file (0 bytes)", "non-finite", "too few points: 10", "unknown suffix '.doc'"):
        assert reason in text, reason
    stamp = (out / "good" / "labels.npz").stat().st_mtime_ns
    assert _cli(*args, "--out", str(out)) == 0
    assert "segmented 0, already done 1" in capsys.readouterr().out
    assert (out / "good" / "labels.npz").stat().st_mtime_ns == stamp
    assert _cli(*args, "--out", str(out), "--overwrite") == 0
    assert "segmented 1, already done 0" in capsys.readouterr().out


def test_cli_single_bad_input_or_no_names_is_one_line_and_non_zero(tmp_path: Path, model_ckpt: Path, capsys):
    bad = tmp_path / "few.txt"
    np.savetxt(bad, np.ones((5, 3)))
    assert _cli(str(bad), "--parts", "a", "--model", str(model_ckpt), "--out", str(tmp_path / "o")) == 1
    assert "too few points: 5" in capsys.readouterr().out
    good = tmp_path / "ok.txt"
    np.savetxt(good, np.random.default_rng(0).normal(size=(64, 3)))
    assert _cli(str(good), "--parts", " , ", "--model", str(model_ckpt), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("patchalign segment: error: --parts ' , ' names no part")


def test_model_segment_works_at_the_trained_scale_on_a_dense_cloud():
    """``model.segment`` on 200k points encodes a seeded 2048-point draw, not the whole cloud: the
    drawn points get exactly the labels of segmenting that draw directly, and every point one label."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(5)
    cloud = torch.randn(200_000, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5])
    drawn = torch.randperm(200_000, generator=torch.Generator().manual_seed(0))[:2048]
    text = model.encode(cloud[drawn]).patch_features[0, [0, 5, 10, 15]]
    seg = model.segment(cloud, text)
    assert seg.labels.shape == (200_000,) and seg.scores.shape == (200_000, 4)
    assert seg.encoding.patch_features.shape[1] == model.encoder.config.num_groups
    direct = model.segment(cloud[drawn], text)
    assert (seg.labels[drawn] == direct.labels).float().mean() > 0.999  # normalisation order: rounding only
    assert len(torch.unique(seg.labels)) > 1
    whole = model.segment(cloud[:4096], text, num_points=None)  # the old behaviour stays one flag away
    assert whole.encoding.point_to_patch.shape == (1, 4096)


def test_segment_mesh_takes_a_path_a_trimesh_or_arrays(shared_data: Path):
    import trimesh

    model = _tiny_model()
    path = shared_data / "meshes" / "teapot.obj"
    mesh = trimesh.load(path, process=False, force="mesh")
    text = torch.nn.functional.normalize(
        torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    by_path = model.segment_mesh(path, text, num_points=512)
    by_mesh = model.segment_mesh(mesh, text, num_points=512)
    by_arrays = model.segment_mesh((np.asarray(mesh.vertices), np.asarray(mesh.faces)), text, num_points=512)
    assert by_path.face_labels.shape == (len(mesh.faces),) and by_path.vertex_labels.shape == (
        len(mesh.vertices),
    )
    assert torch.equal(by_path.face_labels, by_mesh.face_labels)
    assert torch.equal(by_mesh.vertex_labels, by_arrays.vertex_labels)


def test_cli_bad_command_lines_are_one_line(tmp_path: Path, capsys):
    """A misspelled option (segment, app, bench segment) is one line and exit 2; a batch whose every
    input is missing is one skip line and exit 1, without loading the model."""
    from patchalign.__main__ import main

    for argv in (
        ["segment", "x.obj", "--prts", "a", "--model", "m"],
        ["app", "--model", "m", "--prot", "1"],
        ["bench", "segment", "--pionts", "5"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unrecognized arguments" in err[0], err
    assert (
        main(["segment", str(tmp_path / "nope.obj"), "--parts", "a", "--model", "/nope", "--no_progress"])
        == 1
    )
    assert "skipped 1" in capsys.readouterr().out  # the missing model is never opened
