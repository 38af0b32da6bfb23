"""Pictures: PCA colouring, labelled renders with legends, the viz CLI (and its one-line errors) and the
evaluation's best/worst figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_lightning_checkpoint
from PIL import Image

from patchalign.eval.pictures import part_palette, pca_rgb, plot_feature_pca, plot_part_labels
from patchalign.tools.viz import main


def _has_color(path: Path, rgb: np.ndarray, tol: int = 6) -> bool:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return bool((np.abs(img - np.round(rgb * 255)).max(-1) <= tol).any())


def test_pca_rgb_follows_the_dominant_direction() -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(-1, 1, 40)
    feats = np.outer(t, rng.normal(size=16)) * 10 + rng.normal(scale=0.01, size=(40, 16))
    rgb = pca_rgb(feats)
    assert rgb.shape == (40, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # The first channel is the first principal axis: monotone in t (either sign).
    assert abs(np.corrcoef(rgb[:, 0], t)[0, 1]) > 0.99
    flat = pca_rgb(np.ones((5, 4)))  # no variance at all: mid-grey, not NaN
    assert np.allclose(flat, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        pca_rgb(np.zeros((0, 4)))


def test_part_render_has_every_part_colour_and_legend(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, size=(600, 3)).astype(np.float32)
    labels = (pts[:, 1] > 0).astype(np.int64) + 2 * (pts[:, 0] > 0.5)
    names = ["seat", "back", "leg", "arm"]
    path = plot_part_labels(tmp_path / "a" / "parts.png", pts, labels, names, gt_labels=labels, title="chair")
    assert path.is_file() and Image.open(path).size[0] > 400
    pal = part_palette(4)
    for k in range(4):  # every part (present in points or only in the legend) shows its colour
        assert _has_color(path, pal[k]), names[k]
    with pytest.raises(ValueError, match="labels"):
        plot_part_labels(tmp_path / "b.png", pts, labels[:10], names)
    p2p = (pts[:, 0] > 0).astype(np.int64)
    feats = np.stack([np.ones(8), -np.ones(8)])
    pca = plot_feature_pca(tmp_path / "pca.png", pts, feats, p2p)
    assert _has_color(pca, pca_rgb(feats)[0]) and _has_color(pca, pca_rgb(feats)[1])
    with pytest.raises(ValueError, match="point_to_patch"):
        plot_feature_pca(tmp_path / "pca2.png", pts, feats, p2p + 5)


def test_viz_cli_with_exported_model_and_text_bank(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from patchalign.data.textbank import save_text_bank
    from patchalign.model import EncoderConfig, PatchAlignEncoder
    from patchalign.tools.export import export_checkpoint

    cfg = EncoderConfig.tiny(16)
    enc = PatchAlignEncoder(cfg)
    save_lightning_checkpoint(tmp_path / "m.ckpt", enc)
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "model")
    save_text_bank(
        tmp_path / "bank.safetensors", ["wing", "tail", "body"], torch.randn(3, 16), "rand", ["{}"]
    )
    shape = np.random.default_rng(1).normal(size=(500, 3)).astype(np.float32)
    np.save(tmp_path / "plane.npy", shape)
    assert (
        main(
            [
                "--model",
                str(tmp_path / "model"),
                "--input",
                str(tmp_path / "plane.npy"),
                "--parts",
                "wing, tail,body",
                "--text-bank",
                str(tmp_path / "bank.safetensors"),
                "--out",
                str(tmp_path / "pics"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    counts = {
        ln.split(":")[0].strip(): int(ln.split(":")[1].split()[0])
        for ln in out.splitlines()
        if "points" in ln
    }
    assert set(counts) == {"wing", "tail", "body"} and sum(counts.values()) == 500
    assert (tmp_path / "pics" / "plane_parts.png").is_file() and (
        tmp_path / "pics" / "plane_pca.png"
    ).is_file()


def test_evaluation_writes_best_and_worst_pictures(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "shapenetpart" / "shapenetcore_partanno_segmentation_benchmark_v0_normal"
    if not root.is_dir():
        pytest.skip("real ShapeNetPart shapes not available")
    from patchalign.eval.evaluator import run_zero_shot_eval
    from patchalign.eval.readers import ShapeNetPartTxt
    from patchalign.model import EncoderConfig, PatchAlignEncoder

    bank = {
        n: torch.randn(8) for n in ["wheel", "deck", "belt for foot", "desktop", "leg or support", "drawer"]
    }
    run_zero_shot_eval(
        PatchAlignEncoder(EncoderConfig.tiny(8)),
        ShapeNetPartTxt(root, "trainval", ["Table"]),
        bank,
        device="cpu",
        out_dir=tmp_path,
        viz_per_category=1,
        verbose=False,
    )
    pics = sorted(p.name for p in (tmp_path / "viz").glob("*.png"))
    # one Table: it is both the best and the worst shape; a parts and a PCA picture each
    stem = "04379243_1a2abbc9712e2fffc3bd24f986301745"
    assert pics == sorted(f"Table_{t}0_{stem}_{k}.png" for t in ("best", "worst") for k in ("parts", "pca"))


@pytest.fixture
def viz_inputs(tmp_path: Path) -> dict[str, Path]:
    """A tiny exported model, a text bank of three names and a point file."""
    from patchalign.data.textbank import save_text_bank
    from patchalign.model import EncoderConfig, PatchAlignEncoder
    from patchalign.tools.export import export_checkpoint

    save_lightning_checkpoint(tmp_path / "m.ckpt", PatchAlignEncoder(EncoderConfig.tiny(16)))
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "model")
    save_text_bank(
        tmp_path / "bank.safetensors", ["wing", "tail", "body"], torch.randn(3, 16), "rand", ["{}"]
    )
    np.save(tmp_path / "plane.npy", np.random.default_rng(1).normal(size=(300, 3)).astype(np.float32))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a shape\n")
    return {
        "model": tmp_path / "model",
        "bank": tmp_path / "bank.safetensors",
        "input": tmp_path / "plane.npy",
        "empty": tmp_path / "empty.ckpt",
        "text": tmp_path / "notes.txt",
        "out": tmp_path / "pics",
    }


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"--model": "{tmp}/nope"}, "not found"),
        ({"--model": "{empty}"}, "is empty (0 bytes)"),
        ({"--input": "{tmp}/nope.obj"}, "no such file"),
        ({"--input": "{text}"}, "notes.txt"),
        ({"--input": "{bank}"}, "bank.safetensors"),
        ({"--parts": " , "}, "names no part"),
        ({"--parts": "wing,wing"}, "more than once"),
        ({"--parts": "wing,engine"}, "'engine' has no precomputed text embedding"),
        ({"--text-bank": "{tmp}/nope.safetensors"}, "does not exist"),
        ({"--text-bank": "{empty}"}, "not a readable safetensors file"),
        ({"--num-points": "0"}, "must be positive"),
        ({"--device": "cuda:7"}, "cuda:7"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, str) else None,
)
def test_viz_cli_errors_are_one_line(
    viz_inputs: dict[str, Path], capsys: pytest.CaptureFixture, change: dict[str, str], said: str
) -> None:
    """Issue 19 item 8: every viz error a user can cause is one line on stderr and exit status 1."""
    if change.get("--device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    paths = {k: str(v) for k, v in viz_inputs.items()} | {"tmp": str(viz_inputs["model"].parent)}
    args = {
        "--model": "{model}", "--input": "{input}", "--parts": "wing,tail,body", "--text-bank": "{bank}",
        "--out": "{out}", "--device": "cpu",
    }  # fmt: skip
    args |= change
    argv = [tok for k, v in args.items() for tok in (k, v.format(**paths))]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and said in err, err
    assert "Traceback" not in captured.out + captured.err
    assert not viz_inputs["out"].exists()


def test_viz_cli_bad_command_line_is_one_line(
    viz_inputs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    assert main(["--model", str(viz_inputs["model"]), "--input", str(viz_inputs["input"])]) == 2  # no --parts
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the following arguments are required: parts "
        "(python -m patchalign.tools.viz --help lists the options)"
    ]
    assert main(["--model", "m", "--input", "i", "--parts", "a", "--assign", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "assign" in err and "bogus" in err


def test_viz_cli_never_replaces_earlier_pictures_unless_told(
    viz_inputs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    paths = {k: str(v) for k, v in viz_inputs.items()}
    argv = ["--model", paths["model"], "--input", paths["input"], "--parts", "wing,tail",
            "--text-bank", paths["bank"], "--out", paths["out"], "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    first = (viz_inputs["out"] / "plane_parts.png").read_bytes()
    capsys.readouterr()
    assert main([*argv[:5], "wing,tail,body", *argv[6:]]) == 1  # other parts, same shape: refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plane_parts.png" in err and "--overwrite" in err
    assert (viz_inputs["out"] / "plane_parts.png").read_bytes() == first
    assert main([*argv[:5], "wing,tail,body", *argv[6:], "--overwrite"]) == 0
    assert (viz_inputs["out"] / "plane_parts.png").read_bytes() != first
