"""The prepared GPU check: one command, one table, no downloads (issue 13).

``python -m patchalign bench gpu [--json OUT] [--budget-s 480]`` on one CUDA GPU runs, in order:

1. ``imports``: torch/CUDA/bf16, PyTorch3D with its CUDA rasteriser, Embree, Lightning, WebDataset,
   hdbscan.
2. ``render parity``: PyTorch3D CUDA rasteriser vs Embree on the shared KeypointNet chair mesh
   (10 views, 512 px): mask and face agreement.
3. ``encoder``: full-size encoder (1280 head) inference shapes/s at batch 1 / 32 / 256, fp32 and
   bf16, with peak GPU memory (target: >= 10,000 shapes/s at batch 256 bf16).
4. ``fit stage1`` / ``fit stage2``: 50 Lightning steps each in ``bf16-mixed`` from synthetic shards
   through the decoded device cache (Stage 1 on released-style patch targets that are a learnable
   function of position): loss finite and falling.
5. ``loader vs step``: :mod:`patchalign.tools.bench.train` at batch 256 bf16, <= 8 workers, streaming
   and cached (target: loader >= 1.5x the step rate with the cache).
6. ``zerokey``: ``python -m zerokey predict`` on the shared KeypointNet chair with the PyTorch3D
   CUDA renderer and the oracle pointer (zero noise): every annotated keypoint has a prediction
   within 0.03.

``--cpu-smoke`` runs the same code on the CPU with tiny sizes (2 views at 96 px, a tiny encoder,
6 steps, batch 4) so the check itself is tested without a GPU; its numbers mean nothing.
Every check is timed; a failing check is a ``FAIL`` row (the rest still run) and the exit status is
1 if any check failed. Nothing is downloaded; data comes from ``../shared/data`` and synthetic shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from patchalign.argv import cli_main
from patchalign.tools.bench import write_json
from patchalign.tools.paths import REPO_ROOT as REPO
from patchalign.tools.paths import SHARED_DATA as SHARED

CHAIR_ID = "88382b877be91b2a572f8e1c1caad99e"
CHAIR_MESH = SHARED / "keypointnet" / "meshes" / "03001627" / f"{CHAIR_ID}.ply"


@dataclass
class Sizes:
    """Problem sizes: the real check, or the CPU smoke run."""

    device: str
    views: int
    image_size: int
    encoder_batches: tuple[int, ...]
    encoder_tiny: bool
    fit_steps: int
    fit_batch: int
    fit_objects: int
    bench_batch: int
    bench_workers: int
    zerokey_image_size: int
    render_backend: str


GPU = Sizes("cuda", 10, 512, (1, 32, 256), False, 50, 32, 256, 256, 8, 448, "pytorch3d")
SMOKE = Sizes("cpu", 2, 96, (1, 2), True, 6, 4, 16, 4, 1, 96, "embree")


@dataclass
class Row:
    check: str
    status: str  # PASS / FAIL / WARN
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ checks
def check_imports(sz: Sizes) -> Row:
    import lightning
    import webdataset

    parts = [
        f"torch {torch.__version__}",
        f"lightning {lightning.__version__}",
        f"webdataset {webdataset.__version__}",
    ]
    ok = True
    if sz.device == "cuda":
        if not torch.cuda.is_available():
            return Row("imports", "FAIL", "torch.cuda.is_available() is False")
        parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
        parts.append(f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
        ok &= torch.cuda.is_bf16_supported()
    for mod in ("pytorch3d", "embreex", "hdbscan"):
        try:
            m = __import__(mod)
            parts.append(f"{mod} {getattr(m, '__version__', 'ok')}")
        except ImportError as e:
            parts.append(f"{mod} MISSING ({e})")
            ok = False
    if sz.device == "cuda":
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes  # noqa: F401
        from pytorch3d.structures import Meshes

        v = torch.tensor([[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0]], device="cuda")
        f = torch.tensor([[0, 1, 2]], device="cuda")
        from pytorch3d.renderer.mesh.rasterize_meshes import rasterize_meshes as rm

        p2f, *_ = rm(Meshes([v], [f]), image_size=8, blur_radius=0.0, faces_per_pixel=1)
        parts.append(f"pytorch3d CUDA rasteriser {'ok' if p2f.is_cuda else 'NOT on CUDA'}")
        ok &= p2f.is_cuda
    return Row("imports", "PASS" if ok else "FAIL", "; ".join(parts))


def canonical_faces(faces: torch.Tensor) -> torch.Tensor:
    """Per face, the index of its first copy among faces with the same vertex set.

    KeypointNet's ShapeNet meshes are double-sided (every triangle twice, opposite windings): at
    such a pixel both backends hit the same surface but may report either copy.
    """
    key = faces.sort(dim=1).values
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), faces.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(faces.shape[0]), reduce="amin")
    return first[inverse]


def check_render(sz: Sizes) -> Row:
    from patchalign.render import find3d_cameras, load_mesh_normalized, render_mesh

    vertices, faces = load_mesh_normalized(CHAIR_MESH)
    cams = find3d_cameras(n_views=sz.views, image_size=sz.image_size)
    render_mesh(vertices, faces, cams[:1], backend="embree")  # warm-up
    t0 = time.perf_counter()
    ref = render_mesh(vertices, faces, cams, backend="embree")
    t_embree = time.perf_counter() - t0
    dev = torch.device(sz.device)
    v, f, c = vertices.to(dev), faces.to(dev), cams.to(dev)
    render_mesh(v, f, c[:1], backend="pytorch3d")  # warm-up (CUDA context, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = render_mesh(v, f, c, backend="pytorch3d")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_p3d = time.perf_counter() - t0
    canon = canonical_faces(faces)
    a_mask, b_mask = ref.mask.cpu(), out.mask.cpu()
    both = a_mask & b_mask
    fa = canon[ref.pix_to_face.cpu().clamp_min(0)]
    fb = canon[out.pix_to_face.cpu().clamp_min(0)]
    same = both & (fa == fb)
    mask_agree = float((a_mask == b_mask).float().mean())
    face_agree = float(same.sum() / both.sum().clamp_min(1))
    depth = (ref.depth.cpu() - out.depth.cpu())[same].abs()
    max_depth = float(depth.max()) if depth.numel() else 0.0
    ok = mask_agree >= 0.995 and face_agree >= 0.98 and max_depth < 1e-3
    n_dup = int(faces.shape[0] - torch.unique(canon).numel())
    detail = (
        f"chair {CHAIR_MESH.name[:8]}, {faces.shape[0]} faces ({n_dup} duplicates), {len(cams)} views "
        f"@ {sz.image_size} px: mask agree {mask_agree:.4f}, surface agree {face_agree:.4f}, max depth diff "
        f"{max_depth:.1e}; pytorch3d ({dev.type}) {1e3 * t_p3d / len(cams):.2f} ms/view, embree "
        f"{1e3 * t_embree / len(cams):.2f} ms/view"
    )
    return Row("render parity", "PASS" if ok else "FAIL", detail)


def _encoder_config(sz: Sizes, head_dim: int | None = None) -> Any:
    """The full-size encoder, or the unit tests' tiny one in the CPU smoke run (default head width)."""
    from patchalign.model import EncoderConfig

    head_dim = head_dim or EncoderConfig().head_dim
    return EncoderConfig.tiny(head_dim) if sz.encoder_tiny else EncoderConfig(head_dim=head_dim)


def check_encoder(sz: Sizes) -> Row:
    from patchalign.model import PatchAlignEncoder

    dev = torch.device(sz.device)
    model = PatchAlignEncoder(_encoder_config(sz, 1280)).to(dev).eval()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for bs in sz.encoder_batches:
            pts = torch.randn(bs, 2048, 3, device=dev)
            pts = pts / pts.norm(dim=-1, keepdim=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

            def run(pts: torch.Tensor = pts, dtype: torch.dtype = dtype) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32),
                ):
                    out = model(pts)
                    assert torch.isfinite(out.patch_features.float()).all()

            run()  # warm-up
            n, t0 = 0, time.perf_counter()
            while True:
                run()
                n += 1
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if time.perf_counter() - t0 > (1.0 if dev.type == "cuda" else 0.2) and n >= 2:
                    break
            sps = n * bs / (time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            name = "fp32" if dtype == torch.float32 else "bf16"
            rows.append({"dtype": name, "batch": bs, "shapes_s": sps, "peak_GiB": peak})
    best = [r for r in rows if r["dtype"] == "bf16" and r["batch"] == max(sz.encoder_batches)][0]
    target = 10_000.0
    status = "PASS" if (sz.device == "cpu" or best["shapes_s"] >= target) else "WARN"
    detail = ", ".join(
        f"{r['dtype']} b{r['batch']}: {r['shapes_s']:.0f}/s ({r['peak_GiB']:.2f} GiB)" for r in rows
    )
    detail += f"; target >= {target:.0f} shapes/s at bf16 b256" if sz.device == "cuda" else ""
    return Row("encoder", status, detail, data={"rows": rows})


def write_learnable_patch_shards(out: Path, n: int, feature_dim: int = 64, seed: int = 0) -> Path:
    """Compact shards whose patch targets are a smooth function of the centre position (learnable)."""
    from patchalign.data.synthetic import DEFAULT_PARTS, random_object_sample
    from patchalign.data.writer import ShardSetWriter

    rng = np.random.default_rng(seed)
    w = np.random.default_rng(123).standard_normal((24, feature_dim)).astype(np.float32)
    freqs = np.random.default_rng(7).standard_normal((3, 12)).astype(np.float32) * 2.0
    with ShardSetWriter(out, max_samples_per_shard=64) as writer:
        for i in range(n):
            s = random_object_sample(
                f"learn-{i:05d}", rng, 2048, feature_dim, DEFAULT_PARTS[:3], targets="patches"
            )
            ang = s.patch_centers @ freqs
            f = np.concatenate([np.sin(ang), np.cos(ang)], axis=1) @ w
            s.patch_features = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16)
            writer.write(s)
    return out


class LossRecorder(L.Callback):
    """Collects the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()))


def _fit(stage: str, sz: Sizes, root: Path) -> Row:
    from patchalign.data.datamodule import ShardDataModule
    from patchalign.data.synthetic import write_synthetic_shards, write_synthetic_text_bank
    from patchalign.model import PatchAlignEncoder
    from patchalign.training.modules import Stage1Distillation, Stage2Alignment

    if stage == "stage1":
        path = write_learnable_patch_shards(root / "fit1", sz.fit_objects)
        dm = ShardDataModule(
            str(path),
            batch_size=sz.fit_batch,
            num_workers=2,
            num_points=2048,
            cache="device",
            rotate_up=True,
            features_fp16_transfer=True,
        )
        dm.setup("fit")
        module = Stage1Distillation(PatchAlignEncoder(_encoder_config(sz, dm.feature_dim)))
    else:
        path = write_synthetic_shards(
            root / "fit2", [64] * max(1, sz.fit_objects // 64), targets="none", with_text_bank=False
        )
        bank = write_synthetic_text_bank(
            root / "fit2" / "text_bank.safetensors", dim=1280 if not sz.encoder_tiny else 16
        )
        dm = ShardDataModule(
            str(root / "fit2"),
            batch_size=sz.fit_batch,
            num_workers=2,
            num_points=2048,
            cache="device",
            load_features=False,
            text_bank=str(bank),
        )
        module = Stage2Alignment(
            PatchAlignEncoder(_encoder_config(sz, 1280 if not sz.encoder_tiny else 16)), text_bank=str(bank)
        )
    rec = LossRecorder()
    trainer = L.Trainer(
        max_steps=sz.fit_steps,
        accelerator="gpu" if sz.device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[rec],
    )
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    dt = time.perf_counter() - t0
    losses = rec.losses
    k = max(1, len(losses) // 5)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    finite = all(math.isfinite(x) for x in losses)
    ok = finite and len(losses) == sz.fit_steps and last < first
    detail = (
        f"{len(losses)} steps bf16-mixed, batch {sz.fit_batch}, cache on {sz.device}: "
        f"loss {first:.4f} -> {last:.4f} (mean of first/last {k}), {'finite' if finite else 'NON-FINITE'}, "
        f"{len(losses) * sz.fit_batch / dt:.0f} samples/s incl. cache build"
    )
    return Row(f"fit {stage}", "PASS" if ok else "FAIL", detail, data={"losses": losses})


def check_loader_vs_step(sz: Sizes, root: Path) -> Row:
    from patchalign.tools.bench.train import run_train_bench

    r = run_train_bench(
        batch_sizes=(sz.bench_batch,),
        workers=sz.bench_workers,
        steps=3 if sz.device == "cuda" else 1,
        device=sz.device,
        precision="bf16",
        loader_batches=6 if sz.device == "cuda" else 2,
        n_stream=48 if sz.device == "cuda" else 8,
        n_cache=512 if sz.device == "cuda" else 16,
        model_max_batch=sz.bench_batch,
        shard_root=str(root / "bench"),
        encoder=_encoder_config(sz),
    )
    parts, ok = [], True
    for x in r["rows"]:
        parts.append(
            f"{x['stage']} {x['path']}: loader {x['loader_samples_s']:.0f}/s vs step "
            f"{x['model_samples_s']:.0f}/s = {x['loader_over_step']:.2f}x"
        )
        if x["path"] == "cache" and sz.device == "cuda":
            ok &= x["loader_over_step"] >= 1.5
    return Row(
        "loader vs step",
        "PASS" if ok else "WARN",
        f"batch {sz.bench_batch} bf16: " + "; ".join(parts),
        data=r,
    )


def check_zerokey(sz: Sizes, root: Path) -> Row:
    from zerokey.__main__ import main as zk_main
    from zerokey.data import KeypointNetDataset

    kpn = SHARED / "keypointnet"
    out = root / "zerokey"
    args = [
        "predict",
        "--config", str(REPO / "configs" / "zerokey.yaml"),
        "--trainer.default_root_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "gpu" if sz.device == "cuda" else "cpu",
        "--model.namer.init_args.semantic_names", str(kpn / "semantic_names.json"),
        "--model.pointer.init_args.noise_px", "0",
        "--model.pointer.init_args.dropout", "0",
        "--model.pointer.init_args.outlier_rate", "0",
        "--model.views.image_size", str(sz.zerokey_image_size),
        "--model.views.backend", sz.render_backend,
        "--data.keypointnet_root", str(kpn),
        "--data.model_ids", json.dumps([CHAIR_ID]),
    ]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        zk_main(args)
    rec = json.loads((out / "03001627" / f"{CHAIR_ID}.json").read_text())
    sample = KeypointNetDataset(kpn, model_ids=[CHAIR_ID])[0]
    gt = sample.to_original(sample.keypoints).numpy()
    pred = np.array([k["xyz"] for k in rec["keypoints"]]) if rec["keypoints"] else np.zeros((0, 3))
    worst = (
        float(np.linalg.norm(gt[:, None] - pred[None], axis=-1).min(1).max()) if len(pred) else float("inf")
    )
    ok = rec["status"] == "complete" and worst < 0.03
    t = rec.get("timings", {})
    detail = (
        f"chair {CHAIR_ID[:8]}: {rec['status']}, {len(rec['keypoints'])} keypoints, "
        f"{rec['counts']['views']} views @ {sz.zerokey_image_size} px ({sz.render_backend}); "
        f"worst GT->pred {worst:.4f} (< 0.03); "
        + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if isinstance(v, int | float))
    )
    return Row("zerokey", "PASS" if ok else "FAIL", detail, data={"record": rec})


# ------------------------------------------------------------------------------------------ runner
def run_checks(sz: Sizes, only: list[str] | None = None, budget_s: float = 480.0) -> list[Row]:
    """Run every check (or ``only`` those), each guarded; a check past the budget is not started."""
    t_start = time.perf_counter()
    rows: list[Row] = []
    tmp = tempfile.TemporaryDirectory(prefix="patchalign-gpucheck-")
    root = Path(tmp.name)
    checks: list[tuple[str, Callable[[], Row]]] = [
        ("imports", lambda: check_imports(sz)),
        ("render", lambda: check_render(sz)),
        ("encoder", lambda: check_encoder(sz)),
        ("fit1", lambda: _fit("stage1", sz, root)),
        ("fit2", lambda: _fit("stage2", sz, root)),
        ("bench", lambda: check_loader_vs_step(sz, root)),
        ("zerokey", lambda: check_zerokey(sz, root)),
    ]
    try:
        for name, fn in checks:
            if only and name not in only:
                continue
            if time.perf_counter() - t_start > budget_s:
                rows.append(Row(name, "FAIL", f"not run: the {budget_s:.0f} s budget is spent"))
                continue
            t0 = time.perf_counter()
            try:
                row = fn()
            except (Exception, SystemExit) as e:  # one failing check must not hide the others' results
                row = Row(name, "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:300])
                row.data["traceback"] = traceback.format_exc()
            row.seconds = time.perf_counter() - t0
            rows.append(row)
            print(f"[gpu check] {row.check}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        tmp.cleanup()
    return rows


def print_table(rows: list[Row], sz: Sizes) -> None:
    title = (
        "GPU check" if sz.device == "cuda" else "GPU check, CPU SMOKE RUN (tiny sizes; numbers mean nothing)"
    )
    counts = {k: sum(r.status == k for r in rows) for k in ("PASS", "WARN", "FAIL")}
    total = sum(r.seconds for r in rows)
    print(f"{title} -- {counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail, {total:.0f} s")
    print(f"| {'check':<15} | {'status':<6} | {'s':>6} | detail |")
    print(f"|{'-' * 17}|{'-' * 8}|{'-' * 8}|--------|")
    for r in rows:
        print(f"| {r.check:<15} | {r.status:<6} | {r.seconds:>6.1f} | {r.detail} |")


Check = Literal["imports", "render", "encoder", "fit1", "fit2", "bench", "zerokey"]


def gpu_check(
    cpu_smoke: bool = False, only: list[Check] | None = None, budget_s: float = 480.0, json: str | None = None
) -> int:
    """The prepared one-GPU check: one command, one table, no downloads; exit 1 if a check fails.

    Args:
        cpu_smoke: tiny sizes on the CPU (tests the check itself; its numbers mean nothing).
        only: run only these checks.
        budget_s: do not start checks after this many seconds.
        json: also write every row (with raw data) here.
    """
    sz = SMOKE if cpu_smoke else GPU
    if not cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-smoke to test the check on a CPU)", file=sys.stderr)
        return 1
    if not CHAIR_MESH.is_file():
        print(f"error: {CHAIR_MESH} missing (the shared data is needed)", file=sys.stderr)
        return 1
    rows = run_checks(sz, only, budget_s)
    print_table(rows, sz)
    write_json([vars(r) for r in rows], json)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


main = cli_main(gpu_check, "python -m patchalign bench gpu")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
