"""Compatibility facade: every name that used to live here, re-exported from where it lives now.

The readers are split per benchmark with a registry in :mod:`patchalign.eval.readers`
(``shapenetpart``, ``partnete``, ``faust``, ``scanobjectnn``, ``objaverse``; the interface in
``readers.base``, point-file formats in ``readers.formats``), and the protocol's normalisation,
seeded sampling and batching in :mod:`patchalign.eval.protocol`. Import from there in new code.
"""

from __future__ import annotations

from patchalign.eval.protocol import (
    ResampledDataset,
    collate_part_samples,
    normalize_unit_sphere,
    shape_rng,
)
from patchalign.eval.readers import (
    FAUST_COARSE_PARTS,
    FAUST_FINE_PARTS,
    FIND3D_SHAPENETPART_PARTS,
    PATCHALIGN3D_SHAPENETPART_PARTS,
    READERS,
    SCANOBJECTNN_CATEGORIES,
    SCANOBJECTNN_PART_REMAP,
    SCANOBJECTNN_PARTS,
    SHAPENETPART_CATEGORIES,
    SHAPENETPART_NUM_PARTS,
    SHAPENETPART_PART_NAME_SETS,
    SHAPENETPART_PART_START,
    SHAPENETPART_SYNSETS,
    DatasetKind,
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
    read_obj_vertices,
    read_pcd_xyz,
    read_ply_xyz,
)
from patchalign.eval.readers.base import PathLike

__all__ = [
    "READERS", "DatasetKind", "PathLike", "PartSegDataset", "PartSegSample", "ResampledDataset",
    "build_dataset", "collate_part_samples", "normalize_unit_sphere", "shape_rng",
    "read_obj_vertices", "read_pcd_xyz", "read_ply_xyz",
    "ShapeNetPartTxt", "ShapeNetPartH5", "PartNetE", "FaustSATR", "ScanObjectNNParts", "ScanObjectNNH5",
    "ObjaverseFind3D", "FAUST_COARSE_PARTS", "FAUST_FINE_PARTS", "SCANOBJECTNN_CATEGORIES",
    "SCANOBJECTNN_PARTS", "SCANOBJECTNN_PART_REMAP", "SHAPENETPART_CATEGORIES", "SHAPENETPART_NUM_PARTS",
    "SHAPENETPART_PART_NAME_SETS", "SHAPENETPART_PART_START", "SHAPENETPART_SYNSETS",
    "PATCHALIGN3D_SHAPENETPART_PARTS", "FIND3D_SHAPENETPART_PARTS",
]  # fmt: skip
