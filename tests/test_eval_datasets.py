"""Benchmark readers: real ShapeNetPart shapes, and fixtures written in each published layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from patchalign.eval.protocol import ResampledDataset, collate_part_samples
from patchalign.eval.readers import (
    FaustSATR,
    ObjaverseFind3D,
    PartNetE,
    PartSegDataset,
    PartSegSample,
    ScanObjectNNH5,
    ScanObjectNNParts,
    ShapeNetPartH5,
    ShapeNetPartTxt,
    build_dataset,
)
from patchalign.io import read_pcd_xyz

TABLE = "04379243/1a2abbc9712e2fffc3bd24f986301745"


# ------------------------------------------------------------------------------ ShapeNetPart (real)


def test_shapenetpart_real_split_reports_missing(snp_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = json.loads((snp_root / "train_test_split" / "shuffled_test_file_list.json").read_text())
    listed = len(entries)
    with caplog.at_level(logging.WARNING, logger="patchalign.eval.readers"):
        ds = ShapeNetPartTxt(snp_root, "test")
    on_disk = [e.split("/", 1)[1] for e in entries if (snp_root / (e.split("/", 1)[1] + ".txt")).is_file()]
    assert len(ds) + ds.num_missing == listed == 2874
    assert [ds.uid_of(i) for i in range(len(ds))] == on_disk
    assert set(ds.missing) == {e.split("/", 1)[1] for e in entries} - set(on_disk)
    assert len(ds) == 1 and ds.uid_of(0) == "04379243/1a00aa6b75362cc5b324368d54a7416f"
    assert f"{listed - 1} of {listed}" in caplog.text and "absent" in caplog.text
    assert len(ds.categories) == 16  # all categories keep a (possibly empty) row


def test_shapenetpart_real_shape_labels(snp_root: Path) -> None:
    ds = ShapeNetPartTxt(snp_root, "trainval")
    assert [ds.category_of(i) for i in range(len(ds))] == ["Skateboard", "Skateboard", "Table"]
    i = [ds.uid_of(j) for j in range(len(ds))].index(TABLE)
    s = ds[i]
    raw = np.loadtxt(snp_root / f"{TABLE}.txt")
    assert s["points"].dtype == np.float32 and s["labels"].dtype == np.int64
    np.testing.assert_allclose(s["points"], raw[:, :3], atol=1e-6)
    # Table parts are global ids 47, 48, 49 -> local 0, 1, 2 (counts checked with uniq on the file)
    assert np.bincount(s["labels"]).tolist() == [2629, 139, 26]
    assert s["part_names"] == ["desktop", "leg or support", "drawer"]
    assert s["category"] == "Table" and s["uid"] == TABLE
    assert ShapeNetPartTxt(snp_root, "trainval", part_names="find3d")[0]["part_names"] == [
        "wheel",
        "deck",
        "belt for foot",
    ]
    only = ShapeNetPartTxt(snp_root, "trainval", categories=["table"])
    assert len(only) == 1 and only.categories == ["Table"]
    with pytest.raises(ValueError, match="unknown category"):
        ShapeNetPartTxt(snp_root, "test", categories=["sofa"])


def test_find3d_part_names_follow_find3d_cat2part() -> None:
    """Find3D's names (its ``EvalShapeNetPart.cat2part``) per category, in the benchmark's order: the
    released PatchAlign3D names where Find3D uses the same words, its own where it does not."""
    from patchalign.eval.readers.shapenetpart import (
        FIND3D_SHAPENETPART_PARTS,
        PATCHALIGN3D_SHAPENETPART_PARTS,
        SHAPENETPART_CATEGORIES,
    )

    assert list(FIND3D_SHAPENETPART_PARTS) == SHAPENETPART_CATEGORIES
    assert FIND3D_SHAPENETPART_PARTS["Cap"] == ["panels or crown", "visor or peak"]
    assert FIND3D_SHAPENETPART_PARTS["Motorbike"][4] == "light"
    assert FIND3D_SHAPENETPART_PARTS["Pistol"] == ["barrel", "handle", "trigger and guard"]
    assert FIND3D_SHAPENETPART_PARTS["Earphone"] == ["earcup", "headband", "data wire"]
    assert FIND3D_SHAPENETPART_PARTS["Table"] == ["desktop", "leg or support", "drawer"]
    differ = [
        c
        for c in SHAPENETPART_CATEGORIES
        if FIND3D_SHAPENETPART_PARTS[c] != PATCHALIGN3D_SHAPENETPART_PARTS[c]
    ]
    assert differ == ["Cap", "Car", "Chair", "Guitar", "Lamp", "Laptop", "Motorbike", "Pistol", "Rocket"]


def _fake_snp(root: Path, rows: str, synset: str = "04379243") -> Path:
    (root / "train_test_split").mkdir(parents=True)
    (root / "train_test_split" / "shuffled_test_file_list.json").write_text(
        json.dumps([f"shape_data/{synset}/x1"])
    )
    (root / synset).mkdir()
    (root / synset / "x1.txt").write_text(rows)
    return root


def test_shapenetpart_malformed_files(tmp_path: Path) -> None:
    bad_cols = _fake_snp(tmp_path / "a", "0 0 0 0 0 1\n1 1 1 0 0 1\n")
    with pytest.raises(ValueError, match="rows of 7"):
        ShapeNetPartTxt(bad_cols, "test")[0]
    wrong_cat = _fake_snp(tmp_path / "b", "0 0 0 0 0 1 3\n")  # global 3 is an Airplane part, not Table
    with pytest.raises(ValueError, match="part labels span"):
        ShapeNetPartTxt(wrong_cat, "test")[0]
    unknown = _fake_snp(tmp_path / "c", "0 0 0 0 0 1 47\n", synset="99999999")
    with pytest.raises(ValueError, match="unknown synset"):
        ShapeNetPartTxt(unknown, "test")
    with pytest.raises(FileNotFoundError, match="train_test_split"):
        ShapeNetPartTxt(tmp_path, "test")


def test_shapenetpart_h5_matches_txt(snp_root: Path, tmp_path: Path) -> None:
    """The hdf5 layout (data/label/pid, id2file json) written from the real shapes reads back the same."""
    h5py = pytest.importorskip("h5py")
    txt = ResampledDataset(ShapeNetPartTxt(snp_root, "trainval"), 2048, seed=3)
    samples = [txt[i] for i in range(len(txt))]
    cat_ids = {"Skateboard": 14, "Table": 15}
    starts = {"Skateboard": 44, "Table": 47}
    d = tmp_path / "hdf5_data"
    d.mkdir()
    with h5py.File(d / "ply_data_test0.h5", "w") as f:
        f["data"] = np.stack([s["points"] for s in samples])
        f["label"] = np.array([[cat_ids[s["category"]]] for s in samples], dtype=np.uint8)
        f["pid"] = np.stack([s["labels"] + starts[s["category"]] for s in samples]).astype(np.uint8)
    (d / "ply_data_test_0_id2file.json").write_text(json.dumps([s["uid"] + ".txt" for s in samples]))
    h5 = ShapeNetPartH5(tmp_path, "test")
    assert len(h5) == len(samples)
    for i, s in enumerate(samples):
        g = h5[i]
        assert g["uid"] == s["uid"] and g["category"] == s["category"]
        np.testing.assert_array_equal(g["labels"], s["labels"])
        np.testing.assert_array_equal(g["points"], s["points"])
    assert len(ShapeNetPartH5(tmp_path, "test", categories=["Table"])) == 1
    with pytest.raises(FileNotFoundError, match="ply_data_val"):
        ShapeNetPartH5(tmp_path, "val")


# ------------------------------------------------------------------------------ protocol wrappers


class _Toy(PartSegDataset):
    name = "toy"

    def __init__(self, n: int = 3000) -> None:
        super().__init__()
        self.categories = ["thing"]
        self.part_names_by_category = {"thing": ["a", "b"]}
        self._items = ["u0", "u1", "u2"]
        self.n = n

    def uid_of(self, i: int) -> str:
        return self._items[i]

    def category_of(self, i: int) -> str:
        return "thing"

    def __getitem__(self, i: int) -> PartSegSample:
        pts = np.arange(self.n * 3, dtype=np.float32).reshape(-1, 3) * (i + 1)
        return PartSegSample(
            uid=self._items[i],
            category="thing",
            points=pts,
            labels=(np.arange(self.n) % 2).astype(np.int64),
            part_names=["a", "b"],
        )


def test_resampling_is_seeded_per_uid_and_normalised(snp_root: Path) -> None:
    reader = ShapeNetPartTxt(snp_root, "trainval")
    a = ResampledDataset(reader, 2048, seed=0)
    i = [reader.uid_of(j) for j in range(len(reader))].index(TABLE)
    s1, s2 = a[i], a[i]
    np.testing.assert_array_equal(s1["points"], s2["points"])
    # same shape through a differently filtered reader (other index): identical points
    alone = ResampledDataset(ShapeNetPartTxt(snp_root, "trainval", categories=["Table"]), 2048, seed=0)[0]
    np.testing.assert_array_equal(alone["points"], s1["points"])
    assert not np.array_equal(ResampledDataset(reader, 2048, seed=1)[i]["points"], s1["points"])
    # Every sampled point is a point of the unit-sphere-normalised full shape, with its label.
    full = reader[i]
    norm = full["points"] - full["points"].mean(0)
    norm /= np.linalg.norm(norm, axis=1).max()
    d = ((s1["points"][:, None, :] - norm[None, :, :]) ** 2).sum(-1)
    nn = d.argmin(1)
    assert d[np.arange(2048), nn].max() < 1e-10
    np.testing.assert_array_equal(full["labels"][nn], s1["labels"])
    assert np.linalg.norm(s1["points"], axis=1).max() <= 1 + 1e-6
    assert s1["index"] == i


def test_resampling_replacement_modes() -> None:
    toy = _Toy(3000)
    with_rep = ResampledDataset(toy, 2048, seed=0, normalize=False, replace=True)[0]
    without = ResampledDataset(toy, 2048, seed=0, normalize=False, replace=False)[0]
    assert len(np.unique(without["points"], axis=0)) == 2048
    assert len(np.unique(with_rep["points"], axis=0)) < 2048  # 2048 draws from 3000 with replacement repeat
    small = ResampledDataset(_Toy(100), 2048, seed=0, replace=False)[1]  # fewer points than asked: replace
    assert small["points"].shape == (2048, 3)
    batch = collate_part_samples([ResampledDataset(toy, 64)[i] for i in range(3)])
    assert tuple(batch["points"].shape) == (3, 64, 3) and batch["index"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="different point counts"):
        collate_part_samples([ResampledDataset(toy, 64)[0], ResampledDataset(toy, 32)[1]])
    with pytest.raises(ValueError, match="positive"):
        ResampledDataset(toy, 0)


# ------------------------------------------------------------------------------ PartNetE (fixture)


def _write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Binary little-endian PLY with x y z + uchar colours, as PartSLIP's pc.ply."""
    header = (
        f"ply\nformat binary_little_endian 1.0\nelement vertex {len(xyz)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    rec = np.zeros(
        len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")]
    )
    rec["x"], rec["y"], rec["z"] = xyz.T
    rec["r"], rec["g"], rec["b"] = rgb.T
    path.write_bytes(header.encode() + rec.tobytes())


def test_partnete_layout_from_real_bottle(shared_data: Path, tmp_path: Path) -> None:
    """PartNetE is built from PartNet-Mobility: convert the real bottle 3763 to its test layout."""
    src = shared_data / "partnet_mobility" / "3763" / "point_sample"
    meta = shared_data / "partnete" / "PartNetE_meta.json"
    if not src.is_dir() or not meta.is_file():
        pytest.skip("partnet_mobility / PartNetE meta not available")
    xyz = np.loadtxt(src / "pts-10000.txt", dtype=np.float32)
    raw = np.loadtxt(src / "label-10000.txt", dtype=np.int64)  # 5 body, 6 neck, 7 lid
    assert json.loads(meta.read_text())["Bottle"] == ["lid"]
    sem = np.where(raw == 7, 0, -1)  # PartNetE Bottle evaluates only "lid"; the rest is "not a part"
    shape = tmp_path / "test" / "Bottle" / "3763"
    shape.mkdir(parents=True)
    _write_ply(shape / "pc.ply", xyz, np.full((len(xyz), 3), 127, np.uint8))
    np.save(shape / "label.npy", {"semantic_seg": sem, "instance_seg": sem})
    (tmp_path / "test" / "Bottle" / "4000").mkdir()  # listed but incomplete -> missing
    ds = PartNetE(tmp_path, "test", categories=["Bottle"], meta_path=meta)
    assert len(ds) == 1 and ds.missing == ["Bottle/4000"]
    s = ds[0]
    np.testing.assert_allclose(s["points"], xyz, atol=1e-6)
    assert (s["labels"] == 0).sum() == 1045 and (s["labels"] == -1).sum() == 8955
    assert s["part_names"] == ["lid"] and s["uid"] == "Bottle/3763"
    assert len(build_dataset("partnete", tmp_path, "test", ["Bottle"], meta_path=meta)) == 1
    np.save(shape / "label.npy", {"semantic_seg": sem[:10]})
    with pytest.raises(ValueError, match="10 labels"):
        ds[0]


# ------------------------------------------------------------------------------ FAUST (fixture)


def test_faust_satr_layout(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    verts = np.array([[0, 1.7, 0], [0.3, 1.3, 0], [-0.3, 1.3, 0], [0, 1.2, 0], [0.1, 0.5, 0], [-0.1, 0.5, 0]])
    obj = "".join(f"v {x} {y} {z}\n" for x, y, z in verts) + "f 1 2 3\nf 4 5 6\n"
    (tmp_path / "scans" / "tr_scan_000.obj").write_text(obj)
    names = ["head", "arm", "arm", "torso", "leg", "leg"]
    (tmp_path / "coarse_gt.json").write_text(json.dumps({"tr_scan_000": names, "tr_scan_001": names}))
    (tmp_path / "meshes.txt").write_text("tr_scan_000.obj\ntr_scan_001.obj\n")
    ds = FaustSATR(tmp_path)
    assert len(ds) == 1 and ds.missing == ["tr_scan_001"]
    s = ds[0]
    assert s["part_names"] == ["arm", "head", "leg", "torso"]
    assert s["labels"].tolist() == [1, 0, 0, 3, 2, 2]
    np.testing.assert_allclose(s["points"], verts)
    (tmp_path / "coarse_gt.json").write_text(json.dumps({"tr_scan_000": names[:5]}))
    with pytest.raises(ValueError, match="6 vertices but 5 labels"):
        FaustSATR(tmp_path)[0]
    (tmp_path / "coarse_gt.json").write_text(json.dumps({"tr_scan_000": ["tail"] * 6}))
    with pytest.raises(ValueError, match="tail"):
        FaustSATR(tmp_path)


# ------------------------------------------------------------------------------ ScanObjectNN (fixtures)


def test_scanobjectnn_parts_layout(tmp_path: Path) -> None:
    base = tmp_path / "object_dataset_complete_with_parts_"
    (base / "chair").mkdir(parents=True)
    n = 6
    pc = np.zeros((n, 11), np.float32)
    pc[:, :3] = np.arange(n * 3).reshape(n, 3)
    raw_parts = np.array([0, 1, 2, 3, 4, 5], np.float32)  # chair remap [0, -1, 1, 2, 3, 4]
    part = np.stack([np.zeros(n, np.float32), raw_parts], 1)
    np.concatenate([[n], pc.ravel()]).astype(np.float32).tofile(base / "chair" / "scan_a.bin")
    np.concatenate([[n], part.ravel()]).astype(np.float32).tofile(base / "chair" / "scan_a_part.bin")
    (base / "split_new.txt").write_text("scan_a.bin\t4\tt\nscan_b.bin\t4\tt\nscan_c.bin\t4\n")
    ds = ScanObjectNNParts(tmp_path, "test")
    assert len(ds) == 1 and ds.missing == ["chair/scan_b"]
    s = ds[0]
    assert s["labels"].tolist() == [0, -1, 1, 2, 3, 4]
    assert [s["part_names"][i] for i in (0, 1, 4)] == ["background", "back", "seat"]
    np.testing.assert_array_equal(s["points"], pc[:, :3])
    assert len(ScanObjectNNParts(tmp_path, "train")) == 0 and ScanObjectNNParts(
        tmp_path, "train"
    ).missing == ["chair/scan_c"]
    np.array([5, 1, 2], np.float32).tofile(base / "chair" / "scan_a_part.bin")  # count says 5 rows, holds 1
    with pytest.raises(ValueError, match="expected"):
        ds[0]


def test_scanobjectnn_h5_layout(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    d = tmp_path / "main_split"
    d.mkdir()
    data = np.random.default_rng(0).normal(size=(3, 8, 3)).astype(np.float32)
    mask = np.array([[-1, -1, 3, 3, 3, 3, 3, 3], [5] * 8, [-1] * 4 + [2] * 4])
    with h5py.File(d / "test_objectdataset.h5", "w") as f:
        f["data"], f["label"], f["mask"] = data, np.array([4, 9, 4]), mask
    ds = ScanObjectNNH5(tmp_path, "test")
    assert len(ds) == 3 and ds[1]["category"] == "table" and ds[1]["part_names"] == ["background", "table"]
    assert ds[0]["labels"].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(ds[2]["points"], data[2])
    assert [ds.uid_of(i) for i in range(len(ScanObjectNNH5(tmp_path, categories=["chair"])))] == [
        "test_objectdataset/0",
        "test_objectdataset/1",
    ]
    with pytest.raises(FileNotFoundError):
        ScanObjectNNH5(tmp_path, "train")


# ------------------------------------------------------------------------------ Objaverse / Find3D (fixture)


def _write_pcd(path: Path, xyz: np.ndarray, binary: bool) -> None:
    """PCD as Open3D writes it (x y z, normals, packed rgb float)."""
    n = len(xyz)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        "FIELDS x y z normal_x normal_y normal_z rgb\nSIZE 4 4 4 4 4 4 4\nTYPE F F F F F F F\n"
        f"COUNT 1 1 1 1 1 1 1\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
    )
    table = np.concatenate([xyz, np.tile([0, 0, 1, 0.5], (n, 1))], axis=1).astype(np.float32)
    if binary:
        path.write_bytes((header + "DATA binary\n").encode() + table.tobytes())
    else:
        path.write_text(
            header + "DATA ascii\n" + "\n".join(" ".join(f"{v:.6f}" for v in r) for r in table) + "\n"
        )


def test_objaverse_find3d_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, binary in (("coffee_mug_0a1b2c", True), ("chair_ff00", False)):
        d = tmp_path / "unseen" / name
        d.mkdir(parents=True)
        _write_pcd(d / "points5000.pcd", rng.normal(size=(50, 3)).astype(np.float32), binary)
        (d / "label_map.json").write_text(json.dumps({"1": "handle", "2": "body"}))
        np.save(d / "labels.npy", np.arange(50) % 3)  # 0 unlabeled, 1 handle, 2 body
    (tmp_path / "unseen" / "lamp_00aa").mkdir()  # no files -> missing
    ds = ObjaverseFind3D(tmp_path, "unseen")
    assert ds.categories == ["chair", "coffee mug", "lamp"] and ds.missing == ["lamp_00aa"]
    mug = ds[[ds.uid_of(i) for i in range(len(ds))].index("coffee_mug_0a1b2c")]
    assert mug["category"] == "coffee mug" and mug["part_names"] == ["handle", "body"]
    assert mug["labels"][:4].tolist() == [-1, 0, 1, -1]
    for i in range(len(ds)):
        d = tmp_path / "unseen" / ds.uid_of(i)
        ascii_or_bin = read_pcd_xyz(d / "points5000.pcd")
        np.testing.assert_allclose(ds[i]["points"], ascii_or_bin)
    assert ds[0]["points"].shape == (50, 3)
    p = tmp_path / "unseen" / "chair_ff00" / "points5000.pcd"
    p.write_text(p.read_text().replace("DATA ascii", "DATA binary_compressed"))
    with pytest.raises(ValueError, match="binary_compressed"):
        read_pcd_xyz(p)


# ------------------------------------------------------------------------------ registry


def test_registry_builds_every_kind_and_matches_the_type(tmp_path: Path) -> None:
    from typing import get_args

    from patchalign.eval.readers import READERS, DatasetKind, register_reader

    assert set(get_args(DatasetKind)) == set(READERS)
    with pytest.raises(ValueError, match="unknown dataset kind 'modelnet'; registered: faust"):
        build_dataset("modelnet", tmp_path)
    with pytest.raises(ValueError, match="registered twice"):
        register_reader("faust")(lambda *a, **k: None)
    # a kind goes to its reader with the reader's own arguments
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.obj").write_text("v 0 0 0\nv 0 1 0\n")
    (tmp_path / "fine_grained_gt.json").write_text(json.dumps({"a": ["nose", "ear"]}))
    ds = build_dataset("faust", tmp_path, "test", granularity="fine")
    assert isinstance(ds, FaustSATR) and ds[0]["labels"].tolist() == [5, 9]


def test_samples_carry_their_own_part_name_list(snp_root: Path) -> None:
    """A caller editing one sample's ``part_names`` changes neither the reader's vocabulary nor the
    next sample's list (every reader builds samples through ``PartSegDataset._sample``)."""
    ds = ShapeNetPartTxt(snp_root, "trainval")
    first = ds[0]
    vocabulary = list(ds.part_names_by_category[first["category"]])
    first["part_names"].append("edited")
    assert ds[0]["part_names"] == vocabulary == ds.part_names_by_category[first["category"]]


def test_shapenetpart_root_is_checked_before_the_categories(snp_root: Path, tmp_path: Path) -> None:
    """Both layouts share the argument handling: a wrong root is said first (even with a wrong
    category too), a wrong category on a right root names the category."""
    with pytest.raises(FileNotFoundError, match="is not a ShapeNetPart root: no train_test_split/"):
        ShapeNetPartTxt(tmp_path, "test", categories=["spaceship"])
    with pytest.raises(ValueError, match="spaceship"):
        ShapeNetPartTxt(snp_root, "test", categories=["spaceship"])
    with pytest.raises(ValueError, match="unknown part-name set 'nope'"):
        ShapeNetPartTxt(snp_root, "test", part_names="nope")
