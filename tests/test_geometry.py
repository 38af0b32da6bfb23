"""The two unit-sphere conventions (patchalign.geometry), against hand-worked shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from patchalign.geometry import (
    DegenerateShapeError,
    normalize_unit_sphere_bbox,
    normalize_unit_sphere_centroid,
    unit_sphere_bbox,
)

# Three points on the x axis at 0, 1 and 4: centroid 5/3, bounding-box centre 2.
LINE = [[0.0, 0, 0], [1, 0, 0], [4, 0, 0]]


def test_the_two_centres_differ_on_an_uneven_shape() -> None:
    pts = torch.tensor(LINE)
    bbox, t = normalize_unit_sphere_bbox(pts)
    assert torch.allclose(t.centre, torch.tensor([2.0, 0, 0], dtype=torch.float64)) and t.scale == 2.0
    assert torch.allclose(bbox[:, 0], torch.tensor([-1.0, -0.5, 1.0]))
    cen = normalize_unit_sphere_centroid(pts)  # centre 5/3, farthest 7/3 away
    assert torch.allclose(cen[:, 0], torch.tensor([-5 / 7, -2 / 7, 1.0]), atol=1e-6)
    assert torch.allclose(t.to_original(bbox), pts)


def test_bbox_counts_only_vertices_faces_use() -> None:
    verts = torch.tensor([[-1.0, 0, 0], [1, 0, 0], [0, 1, 0], [100, 100, 100]])  # last one unused
    t = unit_sphere_bbox(verts, torch.tensor([[0, 1, 2]]))
    assert torch.allclose(t.centre, torch.tensor([0.0, 0.5, 0], dtype=torch.float64))
    assert t.scale == pytest.approx(math.sqrt(1 + 0.25))


def test_centroid_numpy_equals_torch_and_is_batched() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 50, 3)).astype(np.float32)
    out_np = normalize_unit_sphere_centroid(a)
    out_t = normalize_unit_sphere_centroid(torch.from_numpy(a))
    assert out_np.dtype == np.float32 and out_np.shape == (2, 50, 3)
    np.testing.assert_allclose(out_np, out_t.numpy(), atol=1e-6)
    for b in range(2):  # each shape on its own: mean 0, farthest point at 1
        np.testing.assert_allclose(out_np[b].mean(0), 0, atol=1e-6)
        assert np.linalg.norm(out_np[b], axis=1).max() == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(normalize_unit_sphere_centroid(a[b]), out_np[b], atol=1e-7)


def test_degenerate_shapes() -> None:
    same = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(DegenerateShapeError, match="one location"):
        normalize_unit_sphere_centroid(same)
    with pytest.raises(DegenerateShapeError, match="one location"):
        normalize_unit_sphere_centroid(torch.ones(1, 4, 3))
    np.testing.assert_array_equal(normalize_unit_sphere_centroid(same, allow_degenerate=True), 0.0)
    with pytest.raises(DegenerateShapeError):
        unit_sphere_bbox(torch.ones(3, 3))
