"""Benchmark readers, one module per benchmark, each registered under its kind.

=================== ==================================== =======================================
kind                reader                               module
=================== ==================================== =======================================
``shapenetpart``    :class:`ShapeNetPartTxt`             :mod:`.shapenetpart`
``shapenetpart_h5`` :class:`ShapeNetPartH5`              :mod:`.shapenetpart`
``partnete``        :class:`PartNetE`                    :mod:`.partnete`
``faust``           :class:`FaustSATR`                   :mod:`.faust`
``scanobjectnn``    :class:`ScanObjectNNParts`           :mod:`.scanobjectnn`
``scanobjectnn_h5`` :class:`ScanObjectNNH5`              :mod:`.scanobjectnn`
``objaverse``       :class:`ObjaverseFind3D`             :mod:`.objaverse`
=================== ==================================== =======================================

:func:`build_dataset` constructs one by kind from the registry (:data:`READERS`); the interface and
sample conventions are in :mod:`.base`, the point-file formats in :mod:`patchalign.io`.
"""

from __future__ import annotations

from typing import Literal

from patchalign.eval.readers import faust, objaverse, partnete, scanobjectnn, shapenetpart  # noqa: F401 - register
from patchalign.eval.readers.base import (
    READERS,
    PartSegDataset,
    PartSegSample,
    build_dataset,
    register_reader,
    select_categories,
)
from patchalign.eval.readers.faust import FAUST_COARSE_PARTS, FAUST_FINE_PARTS, FaustSATR
from patchalign.eval.readers.objaverse import ObjaverseFind3D
from patchalign.eval.readers.partnete import PartNetE
from patchalign.eval.readers.scanobjectnn import (
    SCANOBJECTNN_CATEGORIES,
    SCANOBJECTNN_PART_REMAP,
    SCANOBJECTNN_PARTS,
    ScanObjectNNH5,
    ScanObjectNNParts,
)
from patchalign.eval.readers.shapenetpart import (
    FIND3D_SHAPENETPART_PARTS,
    PATCHALIGN3D_SHAPENETPART_PARTS,
    SHAPENETPART_CATEGORIES,
    SHAPENETPART_NUM_PARTS,
    SHAPENETPART_PART_NAME_SETS,
    SHAPENETPART_PART_START,
    SHAPENETPART_SYNSETS,
    ShapeNetPartH5,
    ShapeNetPartTxt,
)

# The registered kinds as a type, for jsonargparse / argparse choices (a test keeps it equal to READERS).
DatasetKind = Literal[
    "shapenetpart", "shapenetpart_h5", "partnete", "faust", "scanobjectnn", "scanobjectnn_h5", "objaverse"
]

__all__ = [
    "READERS", "DatasetKind", "PartSegDataset", "PartSegSample", "build_dataset", "register_reader",
    "select_categories",
    "ShapeNetPartTxt", "ShapeNetPartH5", "PartNetE", "FaustSATR", "ScanObjectNNParts", "ScanObjectNNH5",
    "ObjaverseFind3D", "FAUST_COARSE_PARTS", "FAUST_FINE_PARTS", "SCANOBJECTNN_CATEGORIES",
    "SCANOBJECTNN_PARTS", "SCANOBJECTNN_PART_REMAP", "SHAPENETPART_CATEGORIES", "SHAPENETPART_NUM_PARTS",
    "SHAPENETPART_PART_NAME_SETS", "SHAPENETPART_PART_START", "SHAPENETPART_SYNSETS",
    "PATCHALIGN3D_SHAPENETPART_PARTS", "FIND3D_SHAPENETPART_PARTS",
]  # fmt: skip
