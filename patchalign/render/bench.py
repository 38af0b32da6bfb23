"""Render-speed benchmark: Embree vs PyTorch3D on a real mesh, same cameras, same outputs.

Run ``python -m patchalign.render.bench [--image-size 512] [--n-views 10] [--mesh PATH]``. It prints
per-view milliseconds for each backend (PyTorch3D on CPU, and on CUDA when available), the speed ratio,
and how well the backends agree, so a speed number never comes from a broken render.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patchalign.render.cameras import find3d_cameras
from patchalign.render.io import load_mesh_normalized
from patchalign.render.mesh import RenderOutput, render_mesh

DEFAULT_MESH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "meshes" / "cow.obj"


def _timed(fn, repeats: int, sync_cuda: bool = False) -> tuple[float, RenderOutput]:
    """Best-of-``repeats`` wall time in seconds (best, not mean: the machine is shared)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if sync_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def _agreement(a: RenderOutput, b: RenderOutput) -> dict[str, float]:
    a_mask, b_mask = a.mask.cpu(), b.mask.cpu()
    both = a_mask & b_mask
    same_face = both & (a.pix_to_face.cpu() == b.pix_to_face.cpu())
    depth_err = (a.depth.cpu() - b.depth.cpu())[same_face].abs()
    return {
        "mask_agreement": float((a_mask == b_mask).float().mean()),
        "face_agreement_where_both_hit": float(same_face.sum() / both.sum().clamp_min(1)),
        "max_depth_diff_same_face": float(depth_err.max()) if depth_err.numel() else 0.0,
    }


def bench_render(
    image_size: int = 512,
    n_views: int = 10,
    mesh_path: str | Path = DEFAULT_MESH,
    repeats: int = 3,
    pytorch3d_cpu: bool = True,
) -> dict:
    """Time ``render_mesh`` per backend on ``mesh_path`` with Find3D's camera ring.

    Embree is timed best-of-``repeats`` (it includes building the BVH, as every call does); PyTorch3D
    on CPU once (seconds per view at 512 px). Returns a dict of per-view milliseconds, the Embree
    speed-up and backend agreement numbers.
    """
    vertices, faces = load_mesh_normalized(mesh_path)
    cameras = find3d_cameras(n_views=n_views, image_size=image_size)
    result: dict = {
        "mesh": Path(mesh_path).name,
        "n_faces": int(faces.shape[0]),
        "image_size": image_size,
        "n_views": n_views,
        "torch_threads": torch.get_num_threads(),
    }
    render_mesh(vertices, faces, cameras[:1], backend="embree")  # warm-up: imports, first BVH
    seconds, embree_out = _timed(lambda: render_mesh(vertices, faces, cameras, backend="embree"), repeats)
    result["embree_ms_per_view"] = 1000.0 * seconds / n_views
    if pytorch3d_cpu:
        seconds, p3d_out = _timed(lambda: render_mesh(vertices, faces, cameras, backend="pytorch3d"), 1)
        result["pytorch3d_cpu_ms_per_view"] = 1000.0 * seconds / n_views
        result["speedup_embree_vs_pytorch3d_cpu"] = (
            result["pytorch3d_cpu_ms_per_view"] / result["embree_ms_per_view"]
        )
        result["agreement_cpu"] = _agreement(embree_out, p3d_out)
    if torch.cuda.is_available():
        v_cuda, f_cuda, cams_cuda = vertices.cuda(), faces.cuda(), cameras.to("cuda")
        render_mesh(v_cuda, f_cuda, cams_cuda, backend="pytorch3d")  # warm-up: CUDA context, kernels
        seconds, cuda_out = _timed(
            lambda: render_mesh(v_cuda, f_cuda, cams_cuda, backend="pytorch3d"), repeats, sync_cuda=True
        )
        result["pytorch3d_cuda_ms_per_view"] = 1000.0 * seconds / n_views
        result["cuda_device"] = torch.cuda.get_device_name()
        result["agreement_cuda"] = _agreement(embree_out, cuda_out)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--n-views", type=int, default=10)
    parser.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-pytorch3d-cpu", action="store_true", help="skip the slow CPU rasterizer")
    args = parser.parse_args(argv)
    result = bench_render(args.image_size, args.n_views, args.mesh, args.repeats, not args.no_pytorch3d_cpu)
    print(json.dumps(result, indent=2))
    line = f"embree: {result['embree_ms_per_view']:.1f} ms/view"
    if "pytorch3d_cpu_ms_per_view" in result:
        line += (
            f" | pytorch3d cpu: {result['pytorch3d_cpu_ms_per_view']:.1f} ms/view"
            f" | embree is {result['speedup_embree_vs_pytorch3d_cpu']:.1f}x faster"
        )
    if "pytorch3d_cuda_ms_per_view" in result:
        line += f" | pytorch3d cuda: {result['pytorch3d_cuda_ms_per_view']:.2f} ms/view"
    print(line)


if __name__ == "__main__":
    main()
