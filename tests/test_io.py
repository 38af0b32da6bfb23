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
