"""``python -m patchalign app --model M [--host 127.0.0.1 --port 7860]``: segment shapes in the browser.

A Gradio page (the ``app`` extra: ``pip install -e ".[app]"``) in the spirit of the released
``app.py`` (dickoah/PatchAlign3D@b269f6d9: a ``Model3D`` upload, a part-names textbox, a plot), but
on the full-resolution path of :mod:`patchalign.segment`:

* upload a mesh or point cloud (or pick an example from ``../shared/data/meshes`` when it is beside
  the checkout), type part names, press *Segment*;
* the coloured result in a 3D viewer (the GLB that ``python -m patchalign segment`` writes; clouds as
  a GLB of coloured points), a legend with each part's share of the surface (area-weighted for
  meshes, of the points for clouds), the patch features' PCA (what the encoder separates before
  any text), and download buttons for the GLB, ``labels.npz`` and the per-part files;
* a *Keypoints* tab: zero-shot keypoints from the same features (per name, the peaks of its
  text-similarity field; :mod:`zerokey.features.keypoints`), shown as spheres on the shape; and
  ZeroKey itself when the app is started with a pointer server (``--pointer_url``, e.g. vLLM serving
  Molmo): views rendered, the MLLM points at each name, lifted and clustered.

Every error a user can cause (no names, unreadable or empty file, NaN, too few points) is shown in
the page as one message (``gr.Error``), never a stack trace. The segmentation endpoint is also an
API: ``gradio_client.Client(url).predict(handle_file(path), "seat, back", 1, api_name="/segment")``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchalign.tools.segment import (
    INPUT_SUFFIXES,
    MESH_SUFFIXES,
    InputError,
    SegmentSettings,
    load_input,
    parse_parts,
    segment_one,
)

TITLE = "PatchAlign3D: segment 3D shapes into parts named in text"
#: Gradio's 3D viewer (Babylon.js) picks WebGPU whenever ``navigator.gpu`` exists and then fails where
#: the browser has no adapter (headless Chromium, many Linux desktops without a GPU): the viewer stays
#: blank. Hiding ``navigator.gpu`` makes it use WebGL2, which every browser here renders.
WEBGL_VIEWER_HEAD = "<script>try { delete Navigator.prototype.gpu; } catch (e) {}</script>"
MAX_VOTES = 8


def example_meshes(shared_data: Path | None = None) -> list[Path]:
    """The shared real meshes, when ``../shared/data/meshes`` is beside the checkout."""
    from patchalign.tools.paths import SHARED_DATA

    root = (shared_data or SHARED_DATA) / "meshes"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.suffix.lower() in MESH_SUFFIXES)


def _legend_html(names: list[str], fractions: dict[str, float], colors: dict[str, str], what: str) -> str:
    rows = "".join(
        f'<tr><td><span style="display:inline-block;width:1em;height:1em;background:{colors[n]};'
        f'border:1px solid #555"></span></td><td>{n}</td><td style="text-align:right">'
        f"{100 * fractions[n]:.1f} %</td></tr>"
        for n in names
    )
    return (
        f'<table class="patchalign-legend"><thead><tr><th></th><th>part</th><th>share of {what}</th>'
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )


def _cloud_view_glb(points: np.ndarray, labels: np.ndarray, k: int, path: Path) -> Path:
    """A GLB of coloured points: the 3D viewer shows glTF, and PLY point clouds not everywhere."""
    import trimesh

    from patchalign.eval.pictures import label_colors

    rgba = np.concatenate([label_colors(labels, k), np.ones((len(labels), 1))], 1)
    trimesh.Scene(trimesh.PointCloud(points, colors=(rgba * 255).astype(np.uint8))).export(path)
    return path


class SegmentApp:
    """The page's callbacks around one loaded model (kept apart from Gradio so tests can call them)."""

    def __init__(
        self,
        model: Any,
        work_dir: Path | None = None,
        settings: SegmentSettings | None = None,
        zerokey: Any = None,
    ) -> None:
        """``zerokey``: a :class:`zerokey.pipeline.ZeroKeyPipeline` whose pointer is a configured MLLM
        server (``app --pointer_url``); without it the Keypoints tab offers the feature keypoints only."""
        self.model = model
        self.zerokey = zerokey
        self.settings = settings or SegmentSettings()
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="patchalign-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def segment(self, path: str | None, parts: str, votes: float = 1) -> tuple[str, str, str, list[str]]:
        """-> (GLB for the viewer, legend HTML, PCA picture, files to download). Raises InputError."""
        from patchalign.eval.pictures import part_palette, plot_feature_pca

        if not path:
            raise InputError("upload a mesh or point cloud first")
        src = Path(path)
        if src.suffix.lower() not in INPUT_SUFFIXES:
            raise InputError(
                f"unknown file type {src.suffix or '(none)'!r}; expected one of {' '.join(INPUT_SUFFIXES)}"
            )
        names = parse_parts(parts)
        self._count += 1
        out = self.work_dir / f"{self._count:05d}_{src.stem}"
        settings = SegmentSettings(**{**self.settings.__dict__, "votes": int(votes)})
        text = self.model.text_embeddings(names)
        segment_one(self.model, src, text, names, out, settings, "app")
        z = np.load(out / "labels.npz")
        palette = part_palette(len(names))
        colors = {
            n: "#" + "".join(f"{int(round(c * 255)):02x}" for c in palette[i][:3])
            for i, n in enumerate(names)
        }
        vertices, faces = load_input(src)
        if faces is not None:
            areas = 0.5 * np.linalg.norm(
                np.cross(
                    vertices[faces[:, 1]] - vertices[faces[:, 0]],
                    vertices[faces[:, 2]] - vertices[faces[:, 0]],
                ),
                axis=1,
            )
            shares = np.bincount(z["face_labels"], weights=areas, minlength=len(names))
            view, what = out / "segmented.glb", "surface"
        else:
            shares = np.bincount(z["point_labels"], minlength=len(names)).astype(np.float64)
            view = _cloud_view_glb(vertices, z["point_labels"], len(names), out / "segmented_points.glb")
            what = "points"
        fractions = {
            n: float(s) / max(float(shares.sum()), 1e-12) for n, s in zip(names, shares, strict=True)
        }
        samples = torch.as_tensor(z["samples"][0])
        enc = self.model.encode(samples)
        pca_png = plot_feature_pca(
            out / "features_pca.png",
            samples.numpy(),
            enc.patch_features[0].cpu(),
            enc.point_to_patch[0].cpu(),
            title="patch features, PCA to RGB",
        )
        parts_zip = out / f"{src.stem}_parts.zip"
        with zipfile.ZipFile(parts_zip, "w") as zf:
            for p in sorted((out / "parts").iterdir()):
                zf.write(p, arcname=p.name)
        downloads = [
            str(out / ("segmented.glb" if faces is not None else "segmented.ply")),
            str(out / "labels.npz"),
        ]
        downloads.append(str(parts_zip))
        return str(view), _legend_html(names, fractions, colors, what), str(pca_png), downloads

    def keypoints(
        self, path: str | None, names: str, per_name: float = 1, method: str = "features"
    ) -> tuple[str, str]:
        """Keypoints by name -> (GLB of the shape with a sphere per keypoint, HTML table).

        ``features``: zero-shot from the same patch features, per name the peaks of its
        text-similarity field over the 2048 points the model sees
        (:func:`zerokey.features.keypoints.peak_keypoints`, geodesic NMS between instances).
        ``zerokey``: ZeroKey itself (render views, the configured MLLM points at each name, lift,
        cluster), when the app was started with a pointer server.
        """
        if not path:
            raise InputError("upload a mesh or point cloud first")
        query = parse_parts(names)
        vertices, faces = load_input(Path(path))
        if method == "zerokey":
            found = self._zerokey_keypoints(Path(path), query, int(per_name))
        elif method == "features":
            found = self._feature_keypoints(vertices, faces, query, int(per_name))
        else:
            raise InputError(f"unknown keypoint method {method!r}: features or zerokey")
        return self._keypoint_outputs(Path(path), vertices, faces, query, found)

    def _feature_keypoints(
        self, vertices: np.ndarray, faces: np.ndarray | None, query: list[str], per_name: int
    ) -> list[tuple[int, np.ndarray, float]]:
        from patchalign.geometry import normalize_unit_sphere_centroid, sample_surface
        from patchalign.segment import draw_indices
        from zerokey.features.keypoints import peak_keypoints
        from zerokey.features.pipeline import DenseFeatures

        verts = torch.as_tensor(vertices, dtype=torch.float32)
        if faces is None:
            idx = draw_indices(len(verts), min(len(verts), self.settings.num_points), self.settings.seed)
            points = verts[idx]
        else:
            tris = torch.as_tensor(faces, dtype=torch.long)
            points = sample_surface(verts, tris, self.settings.num_points, seed=self.settings.seed).points
        unit = normalize_unit_sphere_centroid(points)
        enc = self.model.encode(unit, normalize=False)
        dense = DenseFeatures(unit, enc.patch_features[0].float(), enc.centers[0].float(), interp_k=3)
        scores = dense.name_scores(self.model.text_embeddings(query), self.model.logit_scale_value, "softmax")
        peaks = peak_keypoints(unit, scores, instances=[per_name] * len(query))
        return [(p.name_index, points[p.point_index].numpy(), p.score) for p in peaks]

    def _zerokey_keypoints(
        self, path: Path, query: list[str], per_name: int
    ) -> list[tuple[int, np.ndarray, float]]:
        from zerokey.data import load_shape

        if self.zerokey is None:
            raise InputError(
                "ZeroKey needs an MLLM pointer: start the app with --pointer_url URL --pointer_model NAME"
            )
        shape = load_shape(path, names=[n for n in query for _ in range(per_name)])
        record = self.zerokey.predict(shape).record
        if record.get("status") == "failed":
            raise InputError(f"ZeroKey failed on this shape: {record.get('error')}")
        return [
            (
                query.index(k["name"]),
                np.asarray(k["xyz"], dtype=np.float32),
                float(k.get("support", {}).get("weight", 0)),
            )
            for k in record["keypoints"]
            if k["name"] in query
        ]

    def _keypoint_outputs(
        self,
        path: Path,
        vertices: np.ndarray,
        faces: np.ndarray | None,
        query: list[str],
        found: list[tuple[int, np.ndarray, float]],
    ) -> tuple[str, str]:
        import trimesh

        from patchalign.eval.pictures import part_palette

        palette = part_palette(len(query))
        radius = 0.02 * float(np.ptp(vertices, axis=0).max())
        scene = trimesh.Scene()
        if faces is not None:
            scene.add_geometry(trimesh.Trimesh(vertices, faces, process=False))
        else:
            scene.add_geometry(trimesh.PointCloud(vertices))
        rows = []
        for name_index, xyz, score in found:
            ball = trimesh.creation.icosphere(subdivisions=2, radius=radius)
            ball.apply_translation(xyz)
            ball.visual.face_colors = (np.append(palette[name_index][:3], 1.0) * 255).astype(np.uint8)
            scene.add_geometry(ball)
            coords = ", ".join(f"{c:.3f}" for c in xyz)
            rows.append(f"<tr><td>{query[name_index]}</td><td>{coords}</td><td>{score:.3f}</td></tr>")
        self._count += 1
        out = self.work_dir / f"{self._count:05d}_{path.stem}_keypoints.glb"
        scene.export(out)
        table = (
            '<table class="patchalign-keypoints"><thead><tr><th>name</th><th>x, y, z (input frame)</th>'
            f"<th>score</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        return str(out), table

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def build_app(
    model: Any, examples: list[Path] | None = None, work_dir: Path | None = None, zerokey: Any = None
) -> Any:
    """The Gradio Blocks page around ``model`` (a :class:`patchalign.pretrained.PretrainedPatchAlign`);
    ``zerokey``: a ZeroKey pipeline with a configured pointer for the Keypoints tab (optional)."""
    import gradio as gr

    app = SegmentApp(model, work_dir, zerokey=zerokey)

    def on_segment(path: str | None, parts: str, votes: float):
        try:
            return app.segment(path, parts, votes)
        except (InputError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title=TITLE, analytics_enabled=False, head=WEBGL_VIEWER_HEAD) as page:
        gr.Markdown(f"# {TITLE}\nUpload a mesh or point cloud, name its parts, press **Segment**.")
        with gr.Tab("Segment"):
            with gr.Row():
                with gr.Column(scale=1):
                    shape = gr.File(
                        label="mesh or point cloud", file_types=list(INPUT_SUFFIXES), type="filepath"
                    )
                    parts = gr.Textbox(
                        label="part names, comma-separated", placeholder="seat, back, leg, arm"
                    )
                    votes = gr.Slider(
                        1, MAX_VOTES, value=1, step=1, label="votes (independent 2048-point samples)"
                    )
                    run = gr.Button("Segment", variant="primary", elem_id="segment-button")
                    if examples:
                        gr.Examples(
                            [[str(p), ""] for p in examples], inputs=[shape, parts], label="shared meshes"
                        )
                with gr.Column(scale=2):
                    view = gr.Model3D(
                        label="segmented", clear_color=(1.0, 1.0, 1.0, 1.0), elem_id="segmented-view"
                    )
                    legend = gr.HTML(elem_id="legend")
                    pca = gr.Image(label="patch features (PCA)", type="filepath")
                    files = gr.File(label="downloads", file_count="multiple", elem_id="downloads")
        with gr.Tab("Keypoints"):
            gr.Markdown(
                "Zero-shot keypoints from the same patch features: per name, the peaks of its text "
                "similarity (no MLLM). ZeroKey's MLLM pointing runs with `python -m zerokey predict`."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    kp_shape = gr.File(
                        label="mesh or point cloud", file_types=list(INPUT_SUFFIXES), type="filepath"
                    )
                    kp_names = gr.Textbox(
                        label="keypoint names, comma-separated", placeholder="nose, wing tip"
                    )
                    kp_count = gr.Slider(1, 4, value=1, step=1, label="keypoints per name")
                    methods = ["features"] + (["zerokey"] if zerokey is not None else [])
                    kp_method = gr.Radio(methods, value="features", label="method")
                    kp_run = gr.Button("Find keypoints", variant="primary", elem_id="keypoints-button")
                with gr.Column(scale=2):
                    kp_view = gr.Model3D(label="keypoints", clear_color=(1.0, 1.0, 1.0, 1.0))
                    kp_table = gr.HTML(elem_id="keypoints-table")
        run.click(
            on_segment, inputs=[shape, parts, votes], outputs=[view, legend, pca, files], api_name="segment"
        )

        def on_keypoints(path: str | None, names: str, count: float, method: str):
            try:
                return app.keypoints(path, names, count, method)
            except (InputError, ValueError) as e:
                raise gr.Error(str(e), print_exception=False) from None

        kp_run.click(
            on_keypoints,
            inputs=[kp_shape, kp_names, kp_count, kp_method],
            outputs=[kp_view, kp_table],
            api_name="keypoints",
        )
    page.patchalign_app = app
    return page


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentParser

    from patchalign.argv import parse_one_line

    p = ArgumentParser(
        prog="python -m patchalign app", description="Segment shapes by part name in the browser."
    )
    p.add_argument(
        "--model", type=str, required=True, help="export directory, Lightning .ckpt or patchalign3d.pt"
    )
    p.add_argument("--host", type=str, default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument(
        "--pointer_url", type=str, default=None, help="OpenAI-compatible server (e.g. vLLM + Molmo)"
    )
    p.add_argument("--pointer_model", type=str, default="allenai/Molmo-7B-D-0924")
    p.add_argument("--pointer_api_key_env", type=str, default=None, help="env var holding the server's key")
    cfg = parse_one_line(p, argv, "python -m patchalign app")
    if cfg is None:
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('patchalign app: error: Gradio is not installed: pip install -e ".[app]"', file=sys.stderr)
        return 2
    from patchalign.pretrained import load_pretrained

    try:
        model = load_pretrained(cfg.model, device=cfg.device)
    except (OSError, ValueError) as e:
        print(f"patchalign app: error: {e}", file=sys.stderr)
        return 2
    zerokey = None
    if cfg.pointer_url:
        from zerokey.mllm.namers import StaticNamer
        from zerokey.mllm.pointers import OpenAIPointer
        from zerokey.pipeline import ZeroKeyPipeline

        pointer = OpenAIPointer(cfg.pointer_url, cfg.pointer_model, api_key_env=cfg.pointer_api_key_env)
        zerokey = ZeroKeyPipeline(StaticNamer([]), pointer)
        try:
            pointer.check()  # the server answers before the page opens
        except Exception as e:  # noqa: BLE001 - any failure of the pre-flight call is one line
            print(f"patchalign app: error: pointer server {cfg.pointer_url}: {e}", file=sys.stderr)
            return 2
    page = build_app(model, example_meshes(), zerokey=zerokey)
    page.launch(server_name=cfg.host, server_port=cfg.port, show_api=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
