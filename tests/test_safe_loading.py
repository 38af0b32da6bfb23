"""No data file runs code: every reader of user ``.npy`` files refuses pickled payloads (issue 19 item 1).

Each payload below is live: a control load with ``np.load(..., allow_pickle=True)`` (what the PartNetE
reader used to do) writes the marker file, so the same file through the project's readers must raise
an error naming the file and leave no marker behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trimesh

from patchalign.eval.datamodule import EvalDataModule
from patchalign.eval.readers import ObjaverseFind3D, PartNetE, build_dataset
from patchalign.io import UnsafePickleError, read_npy, read_point_file
from zerokey.data import load_shape

N = 6
XYZ = np.arange(N * 3, dtype=np.float32).reshape(N, 3) / 10.0
SEM = np.array([0, -1, 0, 0, -1, 0], dtype=np.int64)
INST = np.array([0, -1, 1, 1, -1, 2], dtype=np.int64)


class _Payload:
    """Pickles as ``fn(*args)``: what a crafted file runs when unpickled freely."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, tuple[_Payload, str]]:
    """name -> (payload that creates ``marker``, the ``module.name`` global the file asks for)."""
    return {
        "os.system": (
            _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
            f"{os.system.__module__}.system",
        ),
        "exec": (_Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        "subprocess": (_Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "open": (_Payload(open, str(marker), "w"), "io.open"),
    }


def _placements(payload: _Payload) -> dict[str, Any]:
    """Where the payload sits in the saved object: top level, in the dict, nested, in an object array."""
    return {
        "top": payload,
        "dict_value": {"semantic_seg": payload, "instance_seg": INST},
        "nested": {"semantic_seg": SEM, "instance_seg": INST, "meta": {"deep": [(1, payload)]}},
        "object_array": {"semantic_seg": np.array([payload, 1], dtype=object), "instance_seg": INST},
    }


def _assert_live(path: Path, marker: Path) -> None:
    """Control: the file really runs its payload when loaded the old way (then clean up)."""
    assert not marker.exists()
    np.load(path, allow_pickle=True)
    assert marker.exists(), "the crafted file should run its payload under allow_pickle=True"
    marker.unlink()


def _partnete_root(tmp_path: Path, label: Any | None = None, raw_label: bytes | None = None) -> Path:
    """``<root>/test/Bottle/1/{pc.ply,label.npy}`` + ``PartNetE_meta.json`` (PartSLIP's layout)."""
    root = tmp_path / "PartNetE"
    shape = root / "test" / "Bottle" / "1"
    shape.mkdir(parents=True)
    (root / "PartNetE_meta.json").write_text(json.dumps({"Bottle": ["lid"]}))
    trimesh.PointCloud(XYZ).export(shape / "pc.ply")
    if raw_label is not None:
        (shape / "label.npy").write_bytes(raw_label)
    else:
        np.save(shape / "label.npy", label, allow_pickle=True)
    return root


def _first_batch(root: Path) -> dict[str, Any]:
    """Read the split as ``python -m patchalign test --config configs/eval/partnete.yaml`` does."""
    dm = EvalDataModule(dataset="partnete", root=str(root), num_points=None, batch_size=1, num_workers=0)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


# ------------------------------------------------------------------------------------------ PartNetE


@pytest.mark.parametrize("kind", ["os.system", "exec", "subprocess", "open"])
@pytest.mark.parametrize("where", ["top", "dict_value", "nested", "object_array"])
def test_partnete_refuses_code_in_label_npy(tmp_path: Path, kind: str, where: str) -> None:
    marker = tmp_path / "PWNED"
    payload, refused = _payloads(marker)[kind]
    root = _partnete_root(tmp_path, _placements(payload)[where])
    label = root / "test" / "Bottle" / "1" / "label.npy"
    _assert_live(label, marker)
    with pytest.raises(UnsafePickleError) as info:
        _first_batch(root)
    assert str(label) in str(info.value) and refused in str(info.value)
    assert info.value.refused == refused and info.value.path == label
    assert not marker.exists()


def test_partnete_refuses_a_bare_pickle_named_label_npy(tmp_path: Path) -> None:
    """No ``.npy`` header at all: ``np.load(allow_pickle=True)`` falls back to ``pickle.load``."""
    marker = tmp_path / "PWNED"
    payload, _ = _payloads(marker)["exec"]
    root = _partnete_root(tmp_path, raw_label=pickle.dumps({"semantic_seg": payload}))
    label = root / "test" / "Bottle" / "1" / "label.npy"
    _assert_live(label, marker)
    with pytest.raises(ValueError, match="not a .npy file") as info:
        PartNetE(root, "test")[0]
    assert str(label) in str(info.value) and not marker.exists()


def test_partnete_refuses_calling_ndarray_on_raw_bytes(tmp_path: Path) -> None:
    """``numpy.ndarray((n,), object, buffer)`` would turn file bytes into object pointers; the
    allow-listed ``numpy.ndarray`` is only an argument of ``_reconstruct``, never callable."""
    payload = _Payload(np.ndarray, (2,), np.dtype(object), b"\0" * 16)  # zeros: harmless if ever run
    root = _partnete_root(tmp_path, {"semantic_seg": payload})
    with pytest.raises(ValueError, match="corrupt pickled .npy payload") as info:
        PartNetE(root, "test")[0]
    assert "label.npy" in str(info.value)


def test_partnete_refuses_array_subclasses(tmp_path: Path) -> None:
    """The allow-list is plain ndarray: a masked array (another reconstructor) is refused by name."""
    root = _partnete_root(tmp_path, {"semantic_seg": np.ma.array(SEM, mask=SEM < 0)})
    with pytest.raises(UnsafePickleError, match="numpy.ma.core._mareconstruct"):
        build_dataset("partnete", root, "test", None, None)[0]


def test_partnete_genuine_partslip_label_loads_exactly(tmp_path: Path) -> None:
    """PartSLIP's ``label.npy``: ``np.save`` of ``{'semantic_seg': (n,), 'instance_seg': (n,)}``."""
    root = _partnete_root(tmp_path, {"semantic_seg": SEM, "instance_seg": INST})
    batch = _first_batch(root)
    assert batch["uid"] == ["Bottle/1"] and batch["part_names"] == [["lid"]]
    assert batch["labels"][0].tolist() == SEM.tolist()
    lab = read_npy(root / "test" / "Bottle" / "1" / "label.npy", allow_objects=True).item()
    assert set(lab) == {"semantic_seg", "instance_seg"}
    assert lab["instance_seg"].dtype == np.int64 and lab["instance_seg"].tolist() == INST.tolist()


def test_numpy1_written_label_loads(tmp_path: Path) -> None:
    """PartSLIP's files were written by numpy 1.x (pickle protocol 3, ``numpy.core.multiarray``)."""
    obj = np.empty((), dtype=object)
    obj[()] = {"semantic_seg": SEM, "instance_seg": INST, "score": np.float32(0.5), "ids": {1, 2}}
    body = pickle.dumps(obj, protocol=3)
    body = body.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in body and b"numpy._core" not in body
    header = tmp_path / "h.npy"
    with open(header, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
    root = _partnete_root(tmp_path, raw_label=header.read_bytes() + body)
    sample = PartNetE(root, "test")[0]
    assert sample["labels"].tolist() == SEM.tolist()
    lab = read_npy(root / "test" / "Bottle" / "1" / "label.npy", allow_objects=True).item()
    assert lab["instance_seg"].tolist() == INST.tolist() and lab["ids"] == {1, 2}
    assert lab["score"] == np.float32(0.5) and lab["score"].dtype == np.float32


def test_partnete_label_that_is_not_a_dict_names_the_file(tmp_path: Path) -> None:
    root = _partnete_root(tmp_path, np.array(["a", "b"], dtype=object))
    with pytest.raises(ValueError, match=r"label\.npy: expected a dict with 'semantic_seg'"):
        PartNetE(root, "test")[0]


# ------------------------------------------------------------------------------- point files (.npy)


@pytest.mark.parametrize("kind", ["os.system", "exec"])
def test_point_file_npy_with_a_pickle_is_refused(tmp_path: Path, kind: str) -> None:
    """``read_point_file`` (viz, ZeroKey, ``patchalign.io``) never unpickles: the whole file is refused."""
    marker = tmp_path / "PWNED"
    payload, _ = _payloads(marker)[kind]
    path = tmp_path / "cloud.npy"
    np.save(path, np.array([payload, payload], dtype=object), allow_pickle=True)
    _assert_live(path, marker)
    for read in (read_point_file, load_shape):  # patchalign.io and ZeroKey's shape loader
        with pytest.raises(UnsafePickleError, match="refusing to unpickle") as info:
            read(path)
        assert str(path) in str(info.value) and not marker.exists()


def test_point_file_npy_bad_inputs_name_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", XYZ)
    np.testing.assert_array_equal(read_point_file(tmp_path / "ok.npy"), XYZ)
    with open(tmp_path / "archive.npy", "wb") as f:  # an .npz under a .npy name
        np.savez(f, xyz=XYZ)
    cases = {
        "archive.npy": r"\.npz \(zip\) archive",
        "bare.npy": "not a .npy file",
        "flat.npy": r"expected an \(N, 3\+\) numeric array",
    }
    (tmp_path / "bare.npy").write_bytes(pickle.dumps(XYZ))
    np.save(tmp_path / "flat.npy", XYZ.reshape(-1))
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            read_point_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


# ---------------------------------------------------------------------------------- Objaverse labels


def test_objaverse_labels_npy_with_a_pickle_is_refused(tmp_path: Path) -> None:
    """Find3D's ``labels.npy`` is a plain int array; a pickled one must not run (reader: np.load)."""
    marker = tmp_path / "PWNED"
    payload, _ = _payloads(marker)["exec"]
    d = tmp_path / "unseen" / "mug_00"
    d.mkdir(parents=True)
    header = "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
    header += f"WIDTH {N}\nHEIGHT 1\nPOINTS {N}\nDATA binary\n"
    (d / "points5000.pcd").write_bytes(header.encode() + XYZ.astype("<f4").tobytes())
    (d / "label_map.json").write_text(json.dumps({"1": "handle"}))
    np.save(d / "labels.npy", np.array([payload] * N, dtype=object), allow_pickle=True)
    _assert_live(d / "labels.npy", marker)
    with pytest.raises(UnsafePickleError, match=str(d / "labels.npy")):
        ObjaverseFind3D(tmp_path, "unseen")[0]
    assert not marker.exists()
