"""Checkpoint export, the Lightning-free inference API, and its input checking."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT as REPO
from conftest import save_lightning_checkpoint
from safetensors import safe_open

from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.pretrained import load_pretrained
from patchalign.tools.export import export_checkpoint


def _lightning_ckpt(
    path: Path, cfg: EncoderConfig, seed: int = 0, text_encoder: str | None = "openclip:ViT-B-16"
) -> PatchAlignEncoder:
    """A checkpoint laid out as Lightning saves it (encoder.*, logit params, teacher, optimizer)."""
    torch.manual_seed(seed)
    enc = PatchAlignEncoder(cfg)
    with torch.no_grad():  # non-default BatchNorm statistics, so buffers must round-trip too
        enc.encoder.first_conv[1].running_mean.uniform_(-0.5, 0.5)
        enc.encoder.first_conv[1].running_var.uniform_(0.5, 2.0)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state |= {
        "logit_params.logit_scale": torch.tensor(2.0),
        "logit_params.logit_bias": torch.tensor(-10.0),
        "teacher.proj.weight": torch.randn(4, 4),
        "ema.encoder.norm.weight": torch.ones(3),
    }
    hp = {"encoder_config": cfg.to_dict(), "lr": 1e-3}
    if text_encoder:
        hp["text_encoder"] = text_encoder
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": hp,
            "optimizer_states": [{"state": {}}],
            "lr_schedulers": [],
            "epoch": 7,
            "global_step": 700,
            "pytorch-lightning_version": "2.6",
        },
        path,
    )
    return enc.eval()


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, PatchAlignEncoder, Path]:
    ckpt = tmp_path / "last.ckpt"
    enc = _lightning_ckpt(ckpt, EncoderConfig.tiny(16))
    out = export_checkpoint(ckpt, tmp_path / "export")
    return out, enc, ckpt


def test_export_writes_encoder_only_and_config(exported: tuple[Path, PatchAlignEncoder, Path]) -> None:
    out, enc, _ = exported
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == {f"encoder.{k}" for k in enc.state_dict()}
        for k, v in enc.state_dict().items():
            assert torch.equal(f.get_tensor(f"encoder.{k}"), v)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"] == EncoderConfig.tiny(16).to_dict()
    assert cfg["text_encoder"] == "openclip:ViT-B-16"
    logit = cfg["logit"]
    assert {k: logit[k] for k in ("form", "scale", "bias")} == {
        "form": "sigmoid",
        "scale": 2.0,
        "bias": -10.0,
    }
    assert logit["multiplier"] == pytest.approx(math.exp(2.0))  # SigLIP: exp(t)
    assert cfg["templates"] == ["{part}", "a {part}", "{part} part"]
    assert cfg["epoch"] == 7
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_pretrained_matches_the_checkpoint_encoder(exported: tuple[Path, PatchAlignEncoder, Path]) -> None:
    out, _, ckpt = exported
    # Independent path: rebuild the encoder straight from the checkpoint's state_dict.
    raw = torch.load(ckpt, weights_only=True)
    ref = PatchAlignEncoder(EncoderConfig.from_dict(raw["hyper_parameters"]["encoder_config"]))
    ref.load_state_dict({k[8:]: v for k, v in raw["state_dict"].items() if k.startswith("encoder.")})
    ref.eval()
    model = load_pretrained(out)
    assert model.logit_scale_value == pytest.approx(torch.e**2)
    pts = torch.rand(2, 300, 3) * 2 - 1
    pts = pts / pts.norm(dim=-1).amax(1)[:, None, None]
    got = model.encode(pts, normalize=False)
    with torch.no_grad():
        exp = ref(pts)
    torch.testing.assert_close(got.patch_features, exp.patch_features)
    assert torch.equal(got.point_to_patch, exp.point_to_patch)
    text = F.normalize(torch.randn(5, 16), dim=1)
    seg = model.segment(pts[0], text, normalize=False)
    assert seg.labels.shape == (300,) and seg.scores.shape == (300, 5)
    assert torch.equal(seg.labels, (exp.patch_features[0] @ text.T).argmax(-1)[exp.point_to_patch[0]])
    # normalize=True is the unit-sphere normalisation of the input
    raw_pts = pts[0] * 3.0 + torch.tensor([1.0, -2.0, 0.5])
    centred = raw_pts - raw_pts.mean(0)
    assert torch.equal(
        model.segment(raw_pts, text).labels,
        model.segment(centred / centred.norm(dim=1).max(), text, normalize=False).labels,
    )


def test_segment_by_names_uses_the_exported_text_encoder(
    exported: tuple[Path, PatchAlignEncoder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _, _ = exported
    seen = {}

    class Enc:
        id = "fake"

        def encode(self, names: list[str]) -> torch.Tensor:
            g = torch.Generator().manual_seed(len(names))
            return torch.randn(len(names), 16, generator=g)

    def load_text_encoder(spec: str) -> Enc:
        seen["spec"] = spec
        return Enc()

    monkeypatch.setitem(
        sys.modules, "patchalign.text", types.SimpleNamespace(load_text_encoder=load_text_encoder)
    )
    model = load_pretrained(out)
    seg = model.segment(torch.rand(256, 3), ["wing", "tail", "body"])
    assert seen["spec"] == "openclip:ViT-B-16"
    assert seg.part_names == ["wing", "tail", "body"] and seg.scores.shape == (256, 3)
    bank = {"wing": torch.randn(16), "tail": torch.randn(16)}
    seg2 = model.segment(torch.rand(2, 256, 3), ["wing", "tail"], text_encoder=bank)
    assert seg2.labels.shape == (2, 256) and int(seg2.labels.max()) <= 1


def test_pretrained_rejects_bad_input(exported: tuple[Path, PatchAlignEncoder, Path]) -> None:
    model = load_pretrained(exported[0])
    text = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"\(N, 3\) or \(B, N, 3\)"):
        model.segment(torch.rand(100, 2), text)
    with pytest.raises(ValueError, match=r"\(N, 3\) or \(B, N, 3\)"):
        model.encode(torch.rand(2, 2, 100, 3))
    nan = torch.rand(100, 3)
    nan[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.segment(nan, text)
    with pytest.raises(ValueError, match="at least 32 points"):
        model.segment(torch.rand(31, 3), text)
    with pytest.raises(ValueError, match="empty"):
        model.segment(torch.rand(100, 3), [])
    with pytest.raises(TypeError, match="single string"):
        model.segment(torch.rand(100, 3), "wing")
    with pytest.raises(ValueError, match="dim 8"):
        model.segment(torch.rand(100, 3), torch.randn(3, 8))
    with pytest.raises(ValueError, match="all its points at one location"):
        model.segment(torch.zeros(100, 3), text)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        model.segment([[0.0, 0.0, 0.0]] * 40, text)


def test_pretrained_small_clouds_are_repeated_up_to_num_groups(tmp_path: Path) -> None:
    cfg = dataclasses.replace(EncoderConfig.tiny(16), num_groups=64, depth=1)  # 64 groups > 40 points
    _lightning_ckpt(tmp_path / "c.ckpt", cfg)
    model = load_pretrained(export_checkpoint(tmp_path / "c.ckpt", tmp_path / "e"))
    pts = torch.rand(40, 3)
    seg = model.segment(pts, torch.randn(2, 16))
    enc = model.encode(pts)
    assert seg.labels.shape == (40,) and enc.point_to_patch.shape == (1, 40)
    assert int(enc.group_index.max()) < 40


def test_export_errors(tmp_path: Path) -> None:
    cfg = EncoderConfig.tiny(16)
    enc = PatchAlignEncoder(cfg)
    save_lightning_checkpoint(tmp_path / "a.ckpt", enc, hparams={})
    with pytest.raises(ValueError, match="encoder_config"):
        export_checkpoint(tmp_path / "a.ckpt", tmp_path / "o")
    save_lightning_checkpoint(
        tmp_path / "b.ckpt", enc, hparams={"encoder_config": EncoderConfig.tiny(32).to_dict()}
    )
    with pytest.raises(ValueError, match="does not match the encoder.*2 mis-shaped.*head.proj.weight"):
        export_checkpoint(tmp_path / "b.ckpt", tmp_path / "o")
    torch.save(
        {"state_dict": {"teacher.w": torch.ones(1)}, "hyper_parameters": {"encoder_config": cfg.to_dict()}},
        tmp_path / "c.ckpt",
    )
    with pytest.raises(ValueError, match="no 'encoder"):
        export_checkpoint(tmp_path / "c.ckpt", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="not an exported"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a patchalign export"):
        load_pretrained(tmp_path)


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_torch_export_program_runs_on_cpu(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    enc = _lightning_ckpt(ckpt, EncoderConfig.tiny(16), text_encoder=None)
    out = export_checkpoint(ckpt, tmp_path / "export", torch_export=True, num_points=128)
    program = torch.export.load(str(out / "encoder.pt2")).module()
    pts = torch.rand(1, 128, 3)
    feats, centers, p2p = program(pts)
    with torch.no_grad():
        ref = enc(pts)
    torch.testing.assert_close(feats, ref.patch_features)
    torch.testing.assert_close(centers, ref.centers)
    assert torch.equal(p2p, ref.point_to_patch)
    assert json.loads((out / "config.json").read_text())["text_encoder"] is None


def test_inference_api_does_not_import_lightning(exported: tuple[Path, PatchAlignEncoder, Path]) -> None:
    code = (
        "import sys, torch\n"
        "from patchalign.pretrained import load_pretrained\n"
        f"m = load_pretrained({str(exported[0])!r})\n"
        "bank = {n: torch.randn(16) for n in ['wing', 'tail']}\n"
        "seg = m.segment(torch.rand(200, 3), ['wing', 'tail'], text_encoder=bank)\n"
        "m.encode(torch.rand(2, 200, 3))\n"
        "assert seg.labels.shape == (200,)\n"
        "bad = [k for k in sys.modules\n"
        "       if k == 'lightning' or k.startswith(('lightning.', 'pytorch_lightning'))]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_export_takes_text_provenance_from_the_stage2_text_bank(tmp_path: Path) -> None:
    from patchalign.data.textbank import save_text_bank

    cfg = EncoderConfig.tiny(16)
    enc = PatchAlignEncoder(cfg)
    save_text_bank(
        tmp_path / "bank.safetensors", ["wing"], torch.randn(1, 16), "open_clip:ViT-B-16", ["a {}", "{}"]
    )
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()} | {
        "logit_params.logit_scale": torch.tensor(14.0)
    }
    hp = {"encoder_config": cfg.to_dict(), "loss": "bce", "text_bank": str(tmp_path / "bank.safetensors")}
    torch.save({"state_dict": state, "hyper_parameters": hp}, tmp_path / "s2.ckpt")
    cfg_json = json.loads(
        (export_checkpoint(tmp_path / "s2.ckpt", tmp_path / "out") / "config.json").read_text()
    )
    # one placeholder syntax: the bank's positional templates are recorded as {part} templates
    assert cfg_json["text_encoder"] == "open_clip:ViT-B-16" and cfg_json["templates"] == [
        "a {part}",
        "{part}",
    ]
    # a checkpoint from before the `temperature` option: the linear scale it was trained with
    assert {k: cfg_json["logit"][k] for k in ("form", "scale", "bias", "multiplier")} == {
        "form": "scale",
        "scale": 14.0,
        "bias": None,
        "multiplier": 14.0,
    }
    hp["temperature"] = "log"  # the released LearnableTemp: multiplier min(exp(s), 100)
    torch.save({"state_dict": state, "hyper_parameters": hp}, tmp_path / "s2log.ckpt")
    logit = json.loads(
        (export_checkpoint(tmp_path / "s2log.ckpt", tmp_path / "o2") / "config.json").read_text()
    )["logit"]
    assert logit["form"] == "log_scale" and logit["multiplier"] == 100.0  # exp(14) clamped
    assert load_pretrained(tmp_path / "out").logit_scale_value == pytest.approx(14.0)


def test_export_verb_refuses_an_existing_export_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 item 4: a Stage 1 export into a Stage 2 export's folder used to replace it (rc 0)."""
    from patchalign.__main__ import main

    stage2, stage1, out = tmp_path / "s2.ckpt", tmp_path / "s1.ckpt", tmp_path / "exported"
    _lightning_ckpt(stage2, EncoderConfig.tiny(16), seed=2)
    save_lightning_checkpoint(stage1, PatchAlignEncoder(EncoderConfig.tiny(16)))  # no logit parameters
    assert main(["export", str(stage2), str(out), "--torch-export", "--num-points", "64"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"model.safetensors", "config.json", "encoder.pt2"}
    capsys.readouterr()
    assert main(["export", str(stage1), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    with pytest.raises(FileExistsError, match="already holds an export"):
        export_checkpoint(stage1, out)
    # told to: replaced, and the Stage 2 program is not left beside Stage 1 weights
    assert main(["export", str(stage1), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["logit"]["form"] == "none"
    assert json.loads(before["config.json"])["logit"]["form"] == "sigmoid"
    # an export read and written in the same place is refused even with --overwrite
    assert main(["export", str(out), str(out), "--overwrite"]) == 1
    assert "is the export being read" in capsys.readouterr().err


def test_export_verb_takes_both_option_spellings(tmp_path: Path) -> None:
    """jsonargparse's own spelling and the argparse one users already type parse the same."""
    from patchalign.__main__ import main

    ckpt = save_lightning_checkpoint(tmp_path / "a.ckpt", PatchAlignEncoder(EncoderConfig.tiny(16)))
    assert main(["export", str(ckpt), str(tmp_path / "a"), "--torch_export", "true", "--num_points=64"]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "b"), "--torch-export", "--num-points", "64"]) == 0
    for d in ("a", "b"):
        assert (tmp_path / d / "encoder.pt2").is_file()
    # a misspelled option: one line naming it, exit 2, nothing written
    assert main(["export", str(ckpt), str(tmp_path / "c"), "--torch-exprt"]) == 2
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", "is empty (0 bytes)"),
        (b"hello world\n", "is not a torch.save file"),
        (bytes(range(256)) * 4, "is not a torch.save file"),
        (b"PK\x03\x04" + bytes(60), "failed reading zip archive"),
        (
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }",
            "not a torch.save",
        ),
    ],
    ids=["empty", "text", "random-bytes", "broken-zip", "npy"],
)
def test_export_of_a_file_that_is_no_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, said: str
) -> None:
    """Issue 19 item 8: an empty / text file gave EOFError / KeyError: 101 tracebacks."""
    from patchalign.__main__ import main
    from patchalign.checkpoints import CheckpointError, read_checkpoint

    bad = tmp_path / "model.ckpt"
    bad.write_bytes(content)
    assert main(["export", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and said in err
    assert "expected a Lightning checkpoint (.ckpt)" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="expected a Lightning checkpoint"):
        read_checkpoint(bad)  # the reader itself, so every entry point (init_from, load_pretrained) says it


def test_broken_export_directory_is_one_line(tmp_path: Path) -> None:
    from patchalign.checkpoints import CheckpointError, read_checkpoint

    d = tmp_path / "exp"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not JSON"):
        read_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"format": "patchalign-pretrained"}))
    with pytest.raises(CheckpointError, match="has no 'encoder' architecture"):
        read_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"format": "patchalign-pretrained", "encoder": {}}))
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        read_checkpoint(d)
