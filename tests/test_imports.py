"""The installed stack: both import packages and the PyTorch3D binary on the pinned torch."""

import importlib

import pytest
import torch


@pytest.mark.parametrize(
    "name", ["patchalign", "zerokey", "pytorch3d", "pytorch3d.ops", "pytorch3d.renderer"]
)
def test_imports(name: str) -> None:
    importlib.import_module(name)


def test_pinned_torch() -> None:
    # easypytorch3d's extension only links against this torch; a drift here breaks `import pytorch3d._C`.
    assert torch.__version__.split("+")[0] == "2.11.0"


def test_pytorch3d_extension_runs_on_cpu() -> None:
    """The compiled kernels (not just the Python package) load: run one FPS + kNN through _C."""
    from pytorch3d.ops import knn_points, sample_farthest_points

    pts = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]]])
    _, idx = sample_farthest_points(pts, K=2)
    assert idx.tolist() == [[0, 3]]  # (0,0,3) is farthest from the start point
    knn = knn_points(pts, pts, K=2)
    assert knn.idx[0, :, 0].tolist() == [0, 1, 2, 3]
    assert knn.dists[0, 0, 1].item() == pytest.approx(1.0)
