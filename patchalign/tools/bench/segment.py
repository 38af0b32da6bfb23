"""``python -m patchalign bench segment``: full-resolution segmentation time and memory.

Targets (issue 21), full-size encoder (12 blocks, width 384), 2 CPU cores:

* a 1,000,000-point cloud labelled in full (every point: label + scores) in <= 3 s;
* a 100,000-face mesh, vertex + face labels and the coloured GLB + per-part GLBs written, in <= 5 s.

Weights are random (speed does not depend on them); part names are given as embeddings so no text
encoder is loaded. Peak resident memory is printed beside an N x N estimate to show it stays O(N).
Each case runs ``--repeats`` times after one warm-up; the median is reported.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def _ellipsoid_mesh(faces: int) -> tuple[np.ndarray, np.ndarray]:
    """A UV ellipsoid with about ``faces`` triangles (trimesh's ``count=[n, n]`` gives ~4 n^2)."""
    import trimesh

    n = max(int(round((faces / 4) ** 0.5)), 4)
    m = trimesh.creation.uv_sphere(count=[n, n])
    m.vertices[:, 0] *= 1.6  # not a sphere, so the normalisation is not a no-op
    return np.asarray(m.vertices), np.asarray(m.faces)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(
    points: int = 1_000_000, faces: int = 100_000, parts: int = 6, repeats: int = 3, votes: int = 1
) -> dict:
    """Time both targets; returns the numbers it prints."""
    from patchalign.model import EncoderConfig, PatchAlignEncoder
    from patchalign.pretrained import PretrainedPatchAlign
    from patchalign.segment import segment_shape
    from patchalign.tools.segment import SegmentSettings, write_outputs

    torch.manual_seed(0)
    cfg = EncoderConfig(head_dim=1280)
    model = PretrainedPatchAlign(
        PatchAlignEncoder(cfg).eval(), {"logit": {"form": "scale", "scale": 1 / 0.07}}
    )
    text = torch.nn.functional.normalize(torch.randn(parts, 1280), dim=-1)
    names = [f"part{i}" for i in range(parts)]
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(points, 3)).astype(np.float32)
    verts, tris = _ellipsoid_mesh(faces)
    settings = SegmentSettings(votes=votes, png=False)

    def cloud_case() -> None:
        seg = segment_shape(model, cloud, text, votes=votes)
        assert seg.point_labels.shape == (points,)

    def mesh_case() -> None:
        seg = segment_shape(model, verts, text, tris, votes=votes)
        seg.names = names
        with tempfile.TemporaryDirectory() as d:
            write_outputs(Path(d), Path("bench.obj"), verts.astype(np.float32), tris, seg, settings, "random")

    t_cloud = _median_time(cloud_case, repeats)
    rss_cloud = _peak_rss_gb()
    t_mesh = _median_time(mesh_case, repeats)
    rss = _peak_rss_gb()
    nxn_gb = points**2 * 4 / 1024**3
    out = {
        "threads": torch.get_num_threads(),
        "cloud_points": points,
        "cloud_s": t_cloud,
        "mesh_faces": len(tris),
        "mesh_vertices": len(verts),
        "mesh_s": t_mesh,
        "peak_rss_gb_after_cloud": rss_cloud,
        "peak_rss_gb": rss,
        "nxn_fp32_gb": nxn_gb,
        "votes": votes,
    }
    print(
        f"full-size encoder ({cfg.depth} blocks, width {cfg.trans_dim}), {out['threads']} threads, ", end=""
    )
    print(f"votes={votes}")
    print(f"{'case':<44}{'median s':>10}{'target s':>10}")
    print(f"{f'cloud, {points:,} points, labels + scores':<44}{t_cloud:>10.2f}{3.0:>10.1f}")
    print(f"{f'mesh, {len(tris):,} faces, labels + GLBs written':<44}{t_mesh:>10.2f}{5.0:>10.1f}")
    print(f"peak RSS {rss:.2f} GB (after the cloud {rss_cloud:.2f} GB); ", end="")
    print(f"an N x N float32 matrix would be {nxn_gb:,.0f} GB")
    return out


def main(argv: list[str] | None = None) -> int:
    from patchalign.argv import run_cli

    return run_cli(run, argv, "python -m patchalign bench segment", positional=False)
