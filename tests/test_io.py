"""The one reader per file format (patchalign.io), on hand-written files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from patchalign.io import GeometryLoadError, load_geometry, read_pcd_xyz, read_point_file

PTS = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], dtype=np.float32)


def test_point_files_by_suffix_agree(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.concatenate([PTS, np.ones((2, 2), np.float32)], axis=1))  # extra columns
    np.savetxt(tmp_path / "a.xyz", PTS)
    header = "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 2\nHEIGHT 1\nPOINTS 2\n"
    (tmp_path / "a.pcd").write_text(header + "DATA ascii\n0 1 2\n3 4 5\n")
    (tmp_path / "b.pcd").write_bytes((header + "DATA binary\n").encode() + PTS.astype("<f4").tobytes())
    for name in ("a.npy", "a.xyz", "a.pcd", "b.pcd"):
        np.testing.assert_array_equal(read_point_file(tmp_path / name), PTS)
    np.testing.assert_array_equal(read_pcd_xyz(tmp_path / "b.pcd"), PTS)
    (tmp_path / "n.xyz").write_text("0 0 nan\n")
    with pytest.raises(ValueError, match="non-finite"):
        read_point_file(tmp_path / "n.xyz")
    with pytest.raises(ValueError, match="not a point file"):
        read_point_file(tmp_path / "a.obj")


def test_load_geometry_keeps_file_order_and_merges_scenes_with_transforms(tmp_path: Path) -> None:
    (tmp_path / "tri.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 5 5 5\nf 3 1 2\n")
    v, f = load_geometry(tmp_path / "tri.obj")
    assert f is not None and f.tolist() == [[2, 0, 1]]  # face order and winding as in the file
    # trimesh's OBJ reader drops the unreferenced vertex; read_obj_vertices keeps every ``v`` line
    assert v.dtype == np.float64 and v.tolist() == [[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]
    tri = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)
    scene = trimesh.Scene()
    scene.add_geometry(tri, node_name="a")
    scene.add_geometry(tri, node_name="b", transform=trimesh.transformations.translation_matrix([0, 0, 2]))
    scene.export(tmp_path / "two.glb")
    v, f = load_geometry(tmp_path / "two.glb")
    assert f is not None and f.shape == (2, 3) and v.shape == (6, 3)
    assert sorted(set(np.round(v[:, 2], 6).tolist())) == [0.0, 2.0]  # the second node moved by +2 in z
    cloud = tmp_path / "cloud.ply"
    trimesh.PointCloud(PTS).export(cloud)
    v, f = load_geometry(cloud)
    assert f is None and np.allclose(v, PTS)
    (tmp_path / "bad.glb").write_bytes(b"not a glb")
    with pytest.raises(GeometryLoadError):
        load_geometry(tmp_path / "bad.glb")


def test_read_npy_matches_np_load_for_plain_arrays(tmp_path: Path) -> None:
    """:func:`read_npy` parses the header itself (to see the dtype before any payload byte); every
    ``.npy`` format version and layout must come back exactly as ``np.load`` gives it."""
    from patchalign.io import UnsafePickleError, read_npy

    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    structured = np.array([(1.5, 2), (3.0, 4)], dtype=[("x", "<f4"), ("n", ">i8")])
    unicode_field = np.zeros(2, dtype=[("größe", "<f8")])  # needs format 3.0 (utf8 header)
    cases = {"v1": (fortran, (1, 0)), "v2": (structured, (2, 0)), "v3": (unicode_field, (3, 0))}
    for name, (arr, version) in cases.items():
        with open(tmp_path / f"{name}.npy", "wb") as f:
            np.lib.format.write_array(f, arr, version=version)
        got = read_npy(tmp_path / f"{name}.npy")
        ref = np.load(tmp_path / f"{name}.npy", allow_pickle=False)
        assert got.dtype == ref.dtype == arr.dtype and got.flags.f_contiguous == ref.flags.f_contiguous
        np.testing.assert_array_equal(got, arr)
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="obj.npy: holds pickled Python objects"):
        read_npy(tmp_path / "obj.npy")  # objects only when the caller asks (allow_objects=True)
    assert read_npy(tmp_path / "obj.npy", allow_objects=True).tolist() == [1, "a"]
    (tmp_path / "short.npy").write_bytes((tmp_path / "v1.npy").read_bytes()[:-4])
    with pytest.raises(ValueError, match="short.npy: corrupt .npy payload"):
        read_npy(tmp_path / "short.npy")
