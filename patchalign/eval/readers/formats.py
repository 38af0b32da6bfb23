"""Left only for ``partnete.py``'s import of ``read_ply_xyz``; the readers import the point-file
readers from :mod:`patchalign.io` and ``require_h5py`` from :mod:`.base`. Delete this file once
``partnete.py`` imports ``from patchalign.io import read_ply_xyz``."""

from __future__ import annotations

from patchalign.io import read_ply_xyz

__all__ = ["read_ply_xyz"]
