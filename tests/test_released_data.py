"""Released PatchAlign3D training-data layout -> compact shards (patch targets reused, no DINOv2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchalign.data.schema import decode_sample
from patchalign.data.writer import read_manifest
from patchalign.engine.released import ReleasedFormatError, convert_released, main
from patchalign.patch_targets import match_patch_targets

N, G, M, D = 2100, 128, 32, 24


def _fps(xyz: np.ndarray, k: int) -> np.ndarray:
    """Plain farthest point sampling from index 0 (stands in for the released fps_np)."""
    idx = [0]
    d = np.full(len(xyz), np.inf)
    for _ in range(k - 1):
        d = np.minimum(d, ((xyz - xyz[idx[-1]]) ** 2).sum(1))
        idx.append(int(d.argmax()))
    return np.array(idx)


def _write_object(root: Path, item_id: str, seed: int, with_patch_file: bool = True) -> dict:
    """One object exactly in the released layout (points.pt, merged masks, patch_dino/patch_features.pt)."""
    rng = np.random.default_rng(seed)
    uid = item_id.rsplit("_", 1)[-1]
    pts = (rng.uniform(-0.75, 0.75, (N, 3))).astype(np.float32)  # Find3D's 0.75 half-size box, y up
    (root / "labeled" / "points" / uid).mkdir(parents=True)
    torch.save(torch.from_numpy(pts), root / "labeled" / "points" / uid / "points.pt")
    base = root / "labeled" / "rendered" / item_id / "oriented"
    (base / "masks" / "merged").mkdir(parents=True)
    m2p = np.stack([pts[:, 1] > 0, pts[:, 0] > 0.2, pts[:, 1] < -0.5]).astype(np.int64)  # y>0: "back"
    torch.save(torch.from_numpy(m2p), base / "masks" / "merged" / "mask2points.pt")
    (base / "masks" / "merged" / "mask_labels.txt").write_text("back\nArm\nleg\n")
    swapped = pts[:, [0, 2, 1]].copy()  # the released prepare_points swap
    cidx = _fps(swapped, G)
    dist = ((swapped[cidx][:, None] - swapped[None]) ** 2).sum(-1)
    feats = rng.standard_normal((G, D)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    rec = {
        "item_id": item_id,
        "feature_dim": D,
        "img_size": 518,
        "centers_idx": torch.from_numpy(cidx).long(),
        "centers_xyz": torch.from_numpy(swapped[cidx]).float(),
        "patch_idx": torch.from_numpy(np.argpartition(dist, M, axis=1)[:, :M]).long(),
        "point2center": torch.from_numpy(dist.argmin(0)).long(),
        "patch_feats": torch.from_numpy(feats).half(),
    }
    if with_patch_file:
        (base / "patch_dino").mkdir()
        torch.save(rec, base / "patch_dino" / "patch_features.pt")
    return {"points": pts, "rec": rec, "uid": uid}


@pytest.fixture()
def released_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data_root"
    objs = {
        "chair_aaa111": _write_object(root, "chair_aaa111", 0),
        "office_chair_bbb222": _write_object(root, "office_chair_bbb222", 1),
        "lamp_ccc333": _write_object(root, "lamp_ccc333", 2, with_patch_file=False),
    }
    (root / "labeled" / "split").mkdir()
    (root / "labeled" / "split" / "train.txt").write_text("chair_aaa111\noffice_chair_bbb222\nlamp_ccc333\n")
    return root, objs


def _decoded(out: Path) -> dict:
    m = read_manifest(out)
    import webdataset as wds

    raw = list(wds.WebDataset(m.shard_urls(), shardshuffle=False, empty_check=False))
    return {s.uid: s for s in (decode_sample(r) for r in raw)}


def test_released_layout_to_compact_shards(released_root, tmp_path: Path, capsys) -> None:
    root, objs = released_root
    summary = convert_released(root, tmp_path / "out", split="train")
    assert summary["written"] == 2 and summary["skipped"] == {"missing_file": 1}
    assert "skipped 1" in capsys.readouterr().out
    m = read_manifest(tmp_path / "out")
    assert m.targets == ["patches"] and m.feature_dim == D
    got = _decoded(tmp_path / "out")
    for item_id in ("chair_aaa111", "office_chair_bbb222"):
        o = objs[item_id]
        s = got[o["uid"]]
        # released frame: y and z swapped, no re-normalisation; centres exactly as stored
        np.testing.assert_array_equal(s.points, o["points"][:, [0, 2, 1]])
        np.testing.assert_array_equal(s.patch_centers, o["rec"]["centers_xyz"].numpy())
        np.testing.assert_allclose(
            s.patch_features.astype(np.float32), o["rec"]["patch_feats"].float().numpy(), atol=1e-3
        )
        assert s.features.shape == (N, 0) and s.meta["up_axis"] == "z" and s.meta["item_id"] == item_id
        assert s.part_names == ["back", "arm", "leg"]  # one cleaner: "Arm" -> "arm"
        np.testing.assert_array_equal(s.membership[:, 0], o["points"][:, 1] > 0)
    assert got["bbb222"].meta["category"] == "office chair"
    # resumable: a second run writes nothing new and still counts the skip
    again = convert_released(root, tmp_path / "out", split="train")
    assert again["written"] == 0 and again["already_done"] == 2


def test_find3d_frame_keeps_points_and_swaps_centres_back(released_root, tmp_path: Path) -> None:
    root, objs = released_root
    convert_released(root, tmp_path / "out", frame="find3d")
    s = _decoded(tmp_path / "out")["aaa111"]
    o = objs["chair_aaa111"]
    np.testing.assert_array_equal(s.points, o["points"])
    np.testing.assert_array_equal(s.patch_centers, o["points"][o["rec"]["centers_idx"].numpy()])
    assert s.meta["up_axis"] == "y"


def test_matching_on_converted_targets_reproduces_released_lookup(released_root, tmp_path: Path) -> None:
    """The released loop: cdist(pred centres, stored centres).argmin -> normalised stored feature."""
    root, objs = released_root
    convert_released(root, tmp_path / "out")
    s = _decoded(tmp_path / "out")["aaa111"]
    rec = objs["chair_aaa111"]["rec"]
    pred = torch.from_numpy(s.points[np.random.default_rng(5).choice(N, 64, replace=False)])[None]
    tgt, mask = match_patch_targets(
        pred, torch.tensor(s.patch_centers)[None], torch.tensor(s.patch_features)[None]
    )
    ref_idx = torch.cdist(pred[0], rec["centers_xyz"]).argmin(-1)
    ref = torch.nn.functional.normalize(rec["patch_feats"].float()[ref_idx], dim=-1)
    torch.testing.assert_close(tgt[0], ref, atol=2e-3, rtol=0)
    assert mask.all()


def test_wrong_frame_or_broken_file_is_refused(released_root, tmp_path: Path) -> None:
    root, objs = released_root
    p = root / "labeled" / "rendered" / "chair_aaa111" / "oriented" / "patch_dino" / "patch_features.pt"
    rec = dict(objs["chair_aaa111"]["rec"])
    rec["centers_xyz"] = torch.from_numpy(
        objs["chair_aaa111"]["points"][rec["centers_idx"].numpy()]
    )  # unswapped
    torch.save(rec, p)
    summary = convert_released(root, tmp_path / "out")
    assert summary["written"] == 1 and summary["skipped"] == {"missing_file": 1, "bad_format": 1}
    from patchalign.engine.released import read_released_object
    from patchalign.engine.sources.find3d import discover_find3d_objects

    obj = next(o for o in discover_find3d_objects(root) if o.uid == "aaa111")
    with pytest.raises(ReleasedFormatError, match="another point sampling or frame"):
        read_released_object(obj)
    rec["patch_feats"] = rec["patch_feats"][:, :5]
    rec["centers_xyz"] = objs["chair_aaa111"]["rec"]["centers_xyz"]
    torch.save(rec, p)
    with pytest.raises(ReleasedFormatError, match="feature_dim 24 but patch_feats has width 5"):
        read_released_object(obj)


def test_cli_exit_code_when_nothing_converts(tmp_path: Path) -> None:
    root = tmp_path / "r"
    _write_object(root, "cup_zzz999", 3, with_patch_file=False)
    assert main([str(root), str(tmp_path / "out")]) == 1
