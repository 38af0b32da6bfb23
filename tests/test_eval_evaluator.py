"""End-to-end evaluation on the real ShapeNetPart shapes: script path vs a loop reference, the
Lightning path through EvalDataModule, and the shipped config."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO_ROOT as REPO
from conftest import quiet_trainer, save_lightning_checkpoint
from test_eval_zeroshot import FakeTextEncoder

from patchalign.eval.datamodule import EvalDataModule
from patchalign.eval.evaluator import PartSegEvaluator, run_zero_shot_eval, zero_shot_predict
from patchalign.eval.protocol import ResampledDataset
from patchalign.eval.readers import ShapeNetPartTxt
from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.text import PartTextEmbedder


def _reference(encoder: PatchAlignEncoder, ds: ResampledDataset, text: FakeTextEncoder) -> dict[str, float]:
    """Shape-by-shape loop in the style of the released eval.py (python loops over parts)."""
    per_cat: dict[str, dict[str, list[float]]] = {}
    inst: dict[str, list[float]] = {"released": [], "pointbert": []}
    for i in range(len(ds)):
        s = ds[i]
        names = s["part_names"]
        prompts = [[n, f"a {n}", f"{n} part"] for n in names]
        t = torch.stack(
            [
                F.normalize(torch.stack([F.normalize(text.vec(p), dim=0) for p in ps]).mean(0), dim=0)
                for ps in prompts
            ]
        )
        pts = torch.from_numpy(s["points"])[None]
        with torch.no_grad():
            out = encoder(pts)
        patch_label = (out.patch_features[0] @ t.T).argmax(-1).numpy()
        centers = out.centers[0].numpy()
        nearest = ((s["points"][:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        pred, gt = patch_label[nearest], s["labels"]
        rel, pb = [], []
        for part in range(len(names)):
            inter = np.sum((pred == part) & (gt == part))
            union = np.sum((pred == part) | (gt == part))
            if (gt == part).sum() > 0:
                rel.append(inter / union)
            pb.append(1.0 if union == 0 else inter / union)
        for conv, vals in (("released", rel), ("pointbert", pb)):
            if vals:
                inst[conv].append(float(np.mean(vals)))
                per_cat.setdefault(conv, {}).setdefault(s["category"], []).append(float(np.mean(vals)))
    out = {}
    for conv in inst:
        out[f"{conv}/instance_mIoU"] = float(np.mean(inst[conv]))
        out[f"{conv}/category_mIoU"] = float(np.mean([np.mean(v) for v in per_cat[conv].values()]))
    return out


def test_run_zero_shot_eval_matches_loop_reference(
    snp_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    enc = PatchAlignEncoder(EncoderConfig.tiny(8)).eval()
    text = FakeTextEncoder(8)
    reader = ShapeNetPartTxt(snp_root, "trainval")
    rep = run_zero_shot_eval(enc, reader, text, batch_size=2, device="cpu", out_dir=tmp_path, seed=5)
    ref = _reference(enc, ResampledDataset(reader, 2048, seed=5), text)
    for k, v in ref.items():
        assert rep.scalars[k] == pytest.approx(v, abs=1e-6), k
    # Same numbers with another batch size (per-uid seeded sampling, sum-state metric).
    rep1 = run_zero_shot_eval(enc, reader, text, batch_size=1, device="cpu", seed=5, verbose=False)
    assert rep1.scalars == pytest.approx(rep.scalars)
    # Report artefacts.
    printed = capsys.readouterr().out
    assert "Skateboard" in printed and "instance mIoU" in printed and "14004 listed but missing" in printed
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["category"] for r in rows][-2:] == ["ALL (category)", "ALL (instance)"]
    table = next(r for r in rows if r["category"] == "Table")
    assert table["num_shapes"] == "1"
    js = json.loads((tmp_path / "results.json").read_text())
    assert js["info"]["num_missing"] == 14004 and js["info"]["text_encoder"] == "fake-text"
    assert {s["uid"] for s in js["per_shape"]} == {reader.uid_of(i) for i in range(len(reader))}
    assert math.isclose(js["scalars"]["released/instance_mIoU"], rep.scalars["released/instance_mIoU"])
    best, worst = rep.best_worst("pointbert")["Skateboard"]
    assert best[0]["pointbert"] >= worst[0]["pointbert"]


def test_run_zero_shot_eval_refuses_empty_split(snp_root: Path) -> None:
    with pytest.raises(ValueError, match="no shapes"):
        run_zero_shot_eval(
            PatchAlignEncoder(EncoderConfig.tiny(8)),
            ShapeNetPartTxt(snp_root, "val"),
            FakeTextEncoder(8),
            device="cpu",
            verbose=False,
        )


def test_lightning_test_loop_with_eval_datamodule(snp_root: Path, tmp_path: Path) -> None:
    """The documented LightningModule recipe gives the script path's numbers (and logs them)."""
    import lightning as L

    torch.manual_seed(0)
    enc = PatchAlignEncoder(EncoderConfig.tiny(8)).eval()
    text = FakeTextEncoder(8)

    class ZeroShot(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = enc
            self.embedder = PartTextEmbedder(text)
            self.report = None

        def on_test_epoch_start(self) -> None:
            self.evaluator = PartSegEvaluator.from_dataset(self.trainer.datamodule.test_dataset).to(
                self.device
            )

        def test_step(self, batch: dict, batch_idx: int) -> None:
            pred = zero_shot_predict(self.encoder, batch, self.embedder)
            self.evaluator.update_batch(pred.labels, batch)

        def on_test_epoch_end(self) -> None:
            self.report = self.evaluator.compute()
            self.log_dict(self.report.log_dict("test/"))

    dm = EvalDataModule("shapenetpart", str(snp_root), split="trainval", seed=5, batch_size=2, num_workers=0)
    module = ZeroShot()
    trainer = quiet_trainer(devices=1, default_root_dir=tmp_path)
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]
    script = run_zero_shot_eval(
        enc, ShapeNetPartTxt(snp_root, "trainval"), text, batch_size=2, seed=5, device="cpu", verbose=False
    )
    assert logged["test/released/instance_mIoU"] == pytest.approx(
        script.scalars["released/instance_mIoU"], abs=1e-6
    )
    assert logged["test/find3d/category_mIoU"] == pytest.approx(
        script.scalars["find3d/category_mIoU"], abs=1e-6
    )
    assert len(module.report.per_shape) == 3
    assert dm.categories[-1] == "Table" and dm.part_names_by_category["Table"][0] == "desktop"


def test_shipped_eval_config_builds_the_datamodule(snp_root: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "eval" / "shapenetpart.yaml").read_text())
    data = cfg["data"]
    assert data["class_path"] == "patchalign.eval.datamodule.EvalDataModule"
    args = dict(data["init_args"], root=str(snp_root), num_workers=0)
    dm = EvalDataModule(**args)
    dm.setup("test")
    assert len(dm.test_dataset) == 1 and dm.test_dataset.num_points == 2048
    batch = next(iter(dm.test_dataloader()))
    assert tuple(batch["points"].shape) == (1, 2048, 3)
    assert args["part_names"] == "patchalign3d" and args["split"] == "test"
    with pytest.raises(ValueError, match="root"):
        EvalDataModule("shapenetpart", "").setup("test")


def test_eval_cli_with_export_and_text_bank(
    snp_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from patchalign.data.textbank import save_text_bank
    from patchalign.eval.__main__ import main
    from patchalign.tools.export import export_checkpoint

    save_lightning_checkpoint(tmp_path / "m.ckpt", PatchAlignEncoder(EncoderConfig.tiny(8)))
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "model")
    names = ["wheel", "deck", "belt for foot", "desktop", "leg or support", "drawer"]
    save_text_bank(tmp_path / "bank.safetensors", names, torch.randn(6, 8), "rand", ["{}"])
    args = ["--model", str(tmp_path / "model"), "--dataset", "shapenetpart", "--root", str(snp_root),
            "--split", "trainval", "--text-bank", str(tmp_path / "bank.safetensors"), "--num-workers", "0",
            "--device", "cpu", "--out", str(tmp_path / "res"), "--benchmark", "shapenetpart"]  # fmt: skip
    main(args)
    js = json.loads((tmp_path / "res" / "results.json").read_text())
    assert js["info"]["num_shapes"] == 3 and js["info"]["text_encoder"] == "rand"
    assert js["info"]["reference"]["metrics"] == {"instance_mIoU": 56.9, "category_mIoU": 53.1}
    assert js["info"]["seconds_per_shape"] > 0 and (tmp_path / "res" / "comparison.csv").is_file()
    # an earlier result is never replaced silently: one line and status 2, then --overwrite replaces it
    before = (tmp_path / "res" / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "already holds results.json" in err[0], err
    assert (tmp_path / "res" / "results.json").read_bytes() == before
    main([*args, "--overwrite"])
    with pytest.raises(SystemExit):  # a missing model: one line, no traceback
        main(["--model", str(tmp_path / "nope"), "--dataset", "shapenetpart", "--root", str(snp_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0], err


def test_shard_sampler_covers_every_shape_once() -> None:
    from patchalign.eval.datamodule import UnrepeatedShardSampler

    shards = [list(UnrepeatedShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]
    cfg = yaml.safe_load((REPO / "configs" / "eval" / "shapenetpart.yaml").read_text())
    assert cfg["trainer"]["use_distributed_sampler"] is False  # else Lightning re-wraps and pads
