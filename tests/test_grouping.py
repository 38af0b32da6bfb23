"""Grouping must agree index for index with PyTorch3D's FPS and kNN."""

import pytest
import torch
from pytorch3d.ops import knn_points, sample_farthest_points

from patchalign.grouping import (
    farthest_point_sample,
    group_points,
    knn_indices,
    nearest_center,
    patch_membership_fraction,
)


def _clouds(b: int = 3, n: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, n, 3, generator=g)


def test_fps_matches_pytorch3d() -> None:
    pts = _clouds()
    ours = farthest_point_sample(pts, 128, start_index=0, rule="pytorch3d")
    _, ref = sample_farthest_points(pts, K=128, random_start_point=False)
    assert torch.equal(ours, ref)


def test_fps_with_other_start_matches_pytorch3d_on_rolled_cloud() -> None:
    # PyTorch3D always starts at index 0 (deterministically); starting at k equals rolling the cloud.
    pts = _clouds(b=2, n=512)
    starts = torch.tensor([17, 300])
    ours = farthest_point_sample(pts, 64, start_index=starts, rule="pytorch3d")
    for i, k in enumerate(starts.tolist()):
        rolled = torch.roll(pts[i : i + 1], shifts=-k, dims=1)
        _, ref = sample_farthest_points(rolled, K=64)
        assert torch.equal(ours[i], (ref[0] + k) % pts.shape[1])


def test_fps_is_farthest_by_hand() -> None:
    pts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [5, 0, 0], [2, 0, 0], [4.9, 0, 0]]])
    # start 0 → farthest is 5 (index 2) → farthest from {0,5} is 2 (index 3) → then 1 or 4.9: dist 1 vs 0.1
    assert farthest_point_sample(pts, 4).tolist() == [[0, 2, 3, 1]]


def _pointnet2_kernel_reference(cloud: list[list[float]], m: int) -> list[int]:
    """A one-thread transcription of pointnet2_ops' furthest_point_sampling_kernel rules, in Python
    floats: first index 0, temp starts at 1e10, points with x*x+y*y+z*z <= 1e-3 are skipped,
    besti = 0 / best = -1 before each scan, strict '>' keeps the lowest index on ties."""
    temp = [1e10] * len(cloud)
    idxs, old = [0], 0
    for _ in range(1, m):
        besti, best = 0, -1.0
        x1, y1, z1 = cloud[old]
        for k, (x2, y2, z2) in enumerate(cloud):
            if x2 * x2 + y2 * y2 + z2 * z2 <= 1e-3:
                continue
            d2 = min((x2 - x1) ** 2 + (y2 - y1) ** 2 + (z2 - z1) ** 2, temp[k])
            temp[k] = d2
            if d2 > best:
                besti, best = k, d2
        old = besti
        idxs.append(old)
    return idxs


def test_fps_pointnet2_rule_by_hand() -> None:
    # Index 1 (|p|^2 = 1e-4) and 3 (4e-4) lie inside the kernel's 1e-3 ball. After {0, 2, 4} every
    # remaining candidate is skipped, so the kernel returns its initial besti = 0; plain FPS picks
    # index 1 (min distance 0.9801 vs 0.9604 for index 3).
    pts = torch.tensor([[[1.0, 0, 0], [0.01, 0, 0], [-1, 0, 0], [0, 0.02, 0], [0, 1, 0]]])
    assert farthest_point_sample(pts, 4, rule="pointnet2").tolist() == [[0, 2, 4, 0]]
    assert farthest_point_sample(pts, 4, rule="pytorch3d").tolist() == [[0, 2, 4, 1]]
    assert _pointnet2_kernel_reference(pts[0].tolist(), 4) == [0, 2, 4, 0]


def test_fps_pointnet2_rule_matches_kernel_reference_on_clouds_with_a_core() -> None:
    # Unit-sphere clouds with 5% of the points inside the skipped ball: plain FPS differs there.
    g = torch.Generator().manual_seed(4)
    pts = torch.randn(2, 400, 3, generator=g)
    pts = pts / pts.norm(dim=-1, keepdim=True) * torch.rand(2, 400, 1, generator=g).sqrt()
    pts[:, 1::20] *= 0.01
    ours = farthest_point_sample(pts, 64, rule="pointnet2")
    for i in range(2):
        assert ours[i].tolist() == _pointnet2_kernel_reference(pts[i].tolist(), 64)
        core = (pts[i] ** 2).sum(-1) <= 1e-3
        assert not core[ours[i][1:]].any()
    with pytest.raises(ValueError, match="unknown FPS rule"):
        farthest_point_sample(pts, 4, rule="cuda")  # type: ignore[arg-type]


def test_fps_random_start_is_seeded_and_valid() -> None:
    pts = _clouds(b=2, n=256)
    torch.manual_seed(3)
    a = farthest_point_sample(pts, 16, start_index=None)
    torch.manual_seed(3)
    b = farthest_point_sample(pts, 16, start_index=None)
    assert torch.equal(a, b)
    assert all(len(set(row.tolist())) == 16 for row in a)


def test_knn_matches_pytorch3d() -> None:
    pts = _clouds()
    centers = pts[:, :128]
    ours = knn_indices(centers, pts, 32)
    ref = knn_points(centers, pts, K=32, return_sorted=True).idx
    assert torch.equal(ours, ref)


def test_group_points_shapes_and_centering() -> None:
    pts = _clouds(b=2, n=1024)
    neigh, centers, gidx = group_points(pts, 64, 16)
    assert neigh.shape == (2, 64, 16, 3) and centers.shape == (2, 64, 3) and gidx.shape == (2, 64, 16)
    # the nearest neighbour of a centre is the centre itself → first offset is exactly zero
    assert torch.all(neigh[:, :, 0] == 0)
    recon = torch.gather(pts, 1, gidx.reshape(2, -1, 1).expand(-1, -1, 3)).reshape(2, 64, 16, 3)
    assert torch.allclose(neigh + centers[:, :, None], recon, atol=1e-6)


def test_nearest_center_by_hand() -> None:
    pts = torch.tensor([[[0.0, 0, 0], [0.9, 0, 0], [2.1, 0, 0]]])
    centers = torch.tensor([[[0.0, 0, 0], [2.0, 0, 0]]])
    assert nearest_center(pts, centers).tolist() == [[0, 0, 1]]


def test_patch_membership_fraction_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    membership = (torch.rand(2, 100, 5, generator=g) > 0.6).float()
    gidx = torch.randint(0, 100, (2, 7, 10), generator=g)
    got = patch_membership_fraction(gidx, membership)
    for b in range(2):
        for p in range(7):
            expected = membership[b, gidx[b, p]].mean(0)
            assert torch.allclose(got[b, p], expected)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="cannot sample"):
        farthest_point_sample(torch.zeros(1, 4, 3), 5)
    with pytest.raises(ValueError, match="must be"):
        farthest_point_sample(torch.zeros(4, 3), 2)
    with pytest.raises(ValueError, match="exceeds"):
        knn_indices(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), 5)
