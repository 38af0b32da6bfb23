"""The easypytorch3d wheel's compiled extension loads and rasterizes correctly on this torch build.

The wheel links against one exact torch/torchvision build; a mismatch shows up as an import error of
``pytorch3d._C`` (undefined symbol) or, worse, garbage results. This rasterizes a tiny mesh on the CPU
through the compiled kernel and checks which face covers known pixels.
"""

import torch


def test_pytorch3d_extension_rasterizes_known_faces() -> None:
    from pytorch3d import _C  # noqa: F401  (the compiled extension itself)
    from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes
    from pytorch3d.structures import Meshes

    # Two triangles already in NDC (PyTorch3D: +x is image LEFT, +y is image UP, z is depth).
    # Face 0 covers the left half of the image (x > 0) at depth 1, face 1 the right half at depth 2.
    verts = torch.tensor(
        [
            [0.1, -1.5, 1.0],
            [0.1, 1.5, 1.0],
            [3.0, 0.0, 1.0],
            [-0.1, -1.5, 2.0],
            [-0.1, 1.5, 2.0],
            [-3.0, 0.0, 2.0],
        ]
    )
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    pix_to_face, zbuf, bary, dists = rasterize_meshes(
        Meshes(verts=[verts], faces=[faces]), image_size=16, faces_per_pixel=1, bin_size=0
    )
    assert pix_to_face.shape == (1, 16, 16, 1)
    assert pix_to_face[0, 8, 2, 0].item() == 0  # left column -> face 0
    assert pix_to_face[0, 8, 13, 0].item() == 1  # right column -> face 1
    assert abs(zbuf[0, 8, 2, 0].item() - 1.0) < 1e-5 and abs(zbuf[0, 8, 13, 0].item() - 2.0) < 1e-5
    assert torch.allclose(bary[0, 8, 2, 0].sum(), torch.tensor(1.0))
    # Pixel centres sit at x = +-(2k+1)/16: only columns 7 and 8 (x = +-0.0625) fall in the gap
    # |x| < 0.1 between the triangles; their neighbours (x = +-0.1875) are covered.
    assert pix_to_face[0, 8, 6:10, 0].tolist() == [0, -1, -1, 1]
