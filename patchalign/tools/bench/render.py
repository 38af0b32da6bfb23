"""Render-speed benchmark: Embree vs PyTorch3D meshes and the CPU point splatter, on real data.

Run ``python -m patchalign bench render [--image-size 448] [--layout zerokey] [--mesh PATH]
[--points 2048] [--no-pytorch3d-cpu]``. It prints per-view milliseconds (best and median of
``--repeats``: the best is the least disturbed by other processes on a shared machine) for

* ``render_mesh`` with Embree (and PyTorch3D on CPU, and on CUDA when available) on ``--mesh``,
* ``render_points`` with the CPU splatter (and PyTorch3D on CUDA) on ``--points`` vertices of the
  mesh with world radius ``--radius``,

plus how well the backends agree, so a speed number never comes from a broken render. ``--layout
zerokey`` is ZeroKey's 26 views (448 px there), ``find3d`` the data engine's 10-view ring.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from patchalign.argv import cli_main
from patchalign.render.cameras import (
    Cameras,
    find3d_cameras,
    fov_to_fit_unit_sphere,
    look_at_cameras,
    ring_view_layout,
)
from patchalign.render.io import load_mesh_normalized
from patchalign.render.mesh import RenderOutput, render_mesh
from patchalign.render.points import PointRenderOutput, render_points
from patchalign.tools.paths import SHARED_DATA

DEFAULT_MESH = SHARED_DATA / "meshes" / "cow.obj"

Layout = Literal["find3d", "zerokey"]

#: The 26-view sphere ZeroKey renders (8 azimuths at polar 45 / 90 / 135 degrees + two poles; the same
#: rings as ``zerokey.views.VIEW_RINGS[26]``, which this lower layer does not import).
SPHERE_26_RINGS = ((45.0, 8), (90.0, 8), (135.0, 8))


def _timed(fn: Callable[[], object], repeats: int, sync_cuda: bool = False) -> tuple[float, float, object]:
    """(best, median) wall seconds over ``repeats`` calls, and the last output."""
    times, out = [], None
    for _ in range(repeats):
        if sync_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if sync_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), out


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


def _point_agreement(a: PointRenderOutput, b: PointRenderOutput) -> dict[str, float]:
    a_mask, b_mask = a.mask.cpu(), b.mask.cpu()
    both = a_mask & b_mask
    same = both & (a.pix_to_point.cpu() == b.pix_to_point.cpu())
    return {
        "mask_agreement": float((a_mask == b_mask).float().mean()),
        "point_agreement_where_both_hit": float(same.sum() / both.sum().clamp_min(1)),
    }


def bench_cameras(layout: Layout, n_views: int, image_size: int) -> Cameras:
    """Find3D's ring of ``n_views`` (data engine) or ZeroKey's 26 views framing the unit sphere."""
    if layout == "find3d":
        return find3d_cameras(n_views=n_views, image_size=image_size)
    if layout == "zerokey":
        return look_at_cameras(
            ring_view_layout(SPHERE_26_RINGS, distance=2.5, pole_tilt_deg=5.0),
            fov_deg=fov_to_fit_unit_sphere(2.5),
            image_size=image_size,
        )
    raise ValueError(f"unknown layout {layout!r}; expected 'find3d' or 'zerokey'")


def _setup(layout: Layout, n_views: int, image_size: int, **what: Any) -> tuple[Cameras, dict[str, Any]]:
    """The cameras of a run and the start of its result dict (what is rendered, views, threads)."""
    cameras = bench_cameras(layout, n_views, image_size)
    result = {**what, "image_size": image_size, "layout": layout, "n_views": len(cameras)}
    return cameras, result | {"torch_threads": torch.get_num_threads()}


def bench_render(
    image_size: int = 512,
    n_views: int = 10,
    mesh_path: str | Path = DEFAULT_MESH,
    repeats: int = 3,
    pytorch3d_cpu: bool = True,
    layout: Layout = "find3d",
) -> dict:
    """Time ``render_mesh`` per backend on ``mesh_path``.

    Embree is timed over ``repeats`` calls (each includes building its BVH, as every call does);
    PyTorch3D on CPU once (it takes seconds per view at 512 px). Returns a dict of per-view
    milliseconds (``*_ms_per_view`` is the best call, ``*_median_ms_per_view`` the median), the Embree
    speed-up and backend agreement numbers.
    """
    vertices, faces = load_mesh_normalized(mesh_path)
    cameras, result = _setup(
        layout, n_views, image_size, mesh=Path(mesh_path).name, n_faces=int(faces.shape[0])
    )
    n_views = len(cameras)
    render_mesh(vertices, faces, cameras[:1], backend="embree")  # warm-up: imports, first BVH
    best, median, embree_out = _timed(
        lambda: render_mesh(vertices, faces, cameras, backend="embree"), repeats
    )
    result["embree_ms_per_view"] = 1000.0 * best / n_views
    result["embree_median_ms_per_view"] = 1000.0 * median / n_views
    result["foreground_fraction"] = float(embree_out.mask.float().mean())
    if pytorch3d_cpu:
        best, _, p3d_out = _timed(lambda: render_mesh(vertices, faces, cameras, backend="pytorch3d"), 1)
        result["pytorch3d_cpu_ms_per_view"] = 1000.0 * best / n_views
        result["speedup_embree_vs_pytorch3d_cpu"] = (
            result["pytorch3d_cpu_ms_per_view"] / result["embree_ms_per_view"]
        )
        result["agreement_cpu"] = _agreement(embree_out, p3d_out)
    if torch.cuda.is_available():
        v_cuda, f_cuda, cams_cuda = vertices.cuda(), faces.cuda(), cameras.to("cuda")
        render_mesh(v_cuda, f_cuda, cams_cuda, backend="pytorch3d")  # warm-up: CUDA context, kernels
        best, _, cuda_out = _timed(
            lambda: render_mesh(v_cuda, f_cuda, cams_cuda, backend="pytorch3d"), repeats, sync_cuda=True
        )
        result["pytorch3d_cuda_ms_per_view"] = 1000.0 * best / n_views
        result["cuda_device"] = torch.cuda.get_device_name()
        result["agreement_cuda"] = _agreement(embree_out, cuda_out)
    return result


def bench_points(
    image_size: int = 448,
    n_points: int = 2048,
    radius: float = 0.025,
    mesh_path: str | Path = DEFAULT_MESH,
    repeats: int = 3,
    layout: Layout = "zerokey",
    n_views: int = 10,
) -> dict:
    """Time the CPU point splatter (and PyTorch3D's on CUDA when available) on ``n_points`` vertices of
    ``mesh_path`` (a fixed random subset; all of them if the mesh has fewer).

    The default radius is what ZeroKey's automatic choice (1.5 x mean nearest-neighbour spacing) gives
    KeypointNet's 2048-point clouds (0.02-0.03).
    """
    vertices, _ = load_mesh_normalized(mesh_path)
    order = torch.randperm(vertices.shape[0], generator=torch.Generator().manual_seed(0))
    points = vertices[order[:n_points]]
    cameras, result = _setup(
        layout,
        n_views,
        image_size,
        points_from=Path(mesh_path).name,
        n_points=int(points.shape[0]),
        radius=radius,
    )
    n_views = len(cameras)
    render_points(points, cameras[:1], radius, backend="cpu")  # warm-up
    best, median, cpu_out = _timed(lambda: render_points(points, cameras, radius, backend="cpu"), repeats)
    result["points_cpu_ms_per_view"] = 1000.0 * best / n_views
    result["points_cpu_median_ms_per_view"] = 1000.0 * median / n_views
    result["foreground_fraction"] = float(cpu_out.mask.float().mean())
    if torch.cuda.is_available():
        p_cuda, cams_cuda = points.cuda(), cameras.to("cuda")
        render_points(p_cuda, cams_cuda, radius, backend="pytorch3d")  # warm-up
        best, _, cuda_out = _timed(
            lambda: render_points(p_cuda, cams_cuda, radius, backend="pytorch3d"), repeats, sync_cuda=True
        )
        result["points_pytorch3d_cuda_ms_per_view"] = 1000.0 * best / n_views
        result["agreement_cuda"] = _point_agreement(cpu_out, cuda_out)
    return result


def render_bench(
    image_size: int = 512,
    layout: Layout = "find3d",
    n_views: int = 10,
    mesh: Path = DEFAULT_MESH,
    repeats: int = 3,
    points: int = 2048,
    radius: float = 0.025,
    threads: int | None = None,
    no_pytorch3d_cpu: bool = False,
) -> int:
    """Render speed: Embree vs PyTorch3D meshes and the CPU point splatter, on real data.

    Args:
        image_size: rendered view size (px).
        layout: camera layout: the data engine's 10-view ring or ZeroKey's 26 views.
        n_views: views of the find3d layout (zerokey has 26).
        mesh: mesh to render.
        repeats: timed calls per backend (best and median reported).
        points: points for the splatter (0: skip it).
        radius: point disc radius (world units).
        threads: torch.set_num_threads before timing.
        no_pytorch3d_cpu: skip the slow CPU rasterizer.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    result = bench_render(image_size, n_views, mesh, repeats, not no_pytorch3d_cpu, layout)
    if points > 0:
        result["points"] = bench_points(image_size, points, radius, mesh, repeats, layout, n_views)
    print(json.dumps(result, indent=2))
    line = (
        f"{layout} {result['n_views']} views @ {image_size}px | embree: "
        f"{result['embree_ms_per_view']:.1f} ms/view (median {result['embree_median_ms_per_view']:.1f})"
    )
    if "pytorch3d_cpu_ms_per_view" in result:
        line += (
            f" | pytorch3d cpu: {result['pytorch3d_cpu_ms_per_view']:.1f} ms/view"
            f" | embree is {result['speedup_embree_vs_pytorch3d_cpu']:.1f}x faster"
        )
    if "pytorch3d_cuda_ms_per_view" in result:
        line += f" | pytorch3d cuda: {result['pytorch3d_cuda_ms_per_view']:.2f} ms/view"
    if "points" in result:
        splat = result["points"]
        line += (
            f" | points ({splat['n_points']}, r={splat['radius']}): "
            f"{splat['points_cpu_ms_per_view']:.1f} ms/view"
            f" (median {splat['points_cpu_median_ms_per_view']:.1f})"
        )
    print(line)
    return 0


main = cli_main(render_bench, "python -m patchalign bench render")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
