"""Streaming data module: batch contents, determinism, rank partitioning, skips and hooks."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import quiet_trainer
from scipy.spatial.transform import Rotation

from patchalign.data.datamodule import ShardDataModule
from patchalign.data.pipeline import DataQualityError, partition_samples, rotate_about_axis, tar_samples
from patchalign.data.schema import decode_sample, encode_sample, npy_to_bytes
from patchalign.data.synthetic import random_object_sample, write_synthetic_shards
from patchalign.data.textbank import load_text_bank
from patchalign.data.writer import MANIFEST_NAME, ShardInfo, read_manifest

P = 512  # points per training shape in these tests (objects store 2048)


def _dm(path: Path, **kw) -> ShardDataModule:
    args = dict(batch_size=2, num_workers=0, num_points=P, shuffle_buffer=4, seed=0)
    args.update(kw)
    dm = ShardDataModule(str(path), **args)
    dm.setup("fit")
    return dm


def _originals(path: Path) -> dict[str, object]:
    urls = read_manifest(path).shard_urls()
    return {s.uid: s for s in (decode_sample(r) for r in wds.WebDataset(urls, shardshuffle=False))}


def _valid_uids(batches: list[dict]) -> list[str]:
    return [u for b in batches for u, v in zip(b["uid"], b["valid"].tolist(), strict=True) if v]


# ------------------------------------------------------------------------------------- batch contents
def test_val_batches_match_stored_objects(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [3, 2], feature_dim=8)
    dm = _dm(tmp_path, val_path=str(tmp_path), val_batch_size=2)
    bank = load_text_bank(tmp_path / "text_bank.safetensors")
    orig = _originals(tmp_path)
    batches = list(dm.val_dataloader())
    assert len(batches) == 3 and sorted(_valid_uids(batches)) == sorted(orig)
    for batch in batches:
        b_sz = len(batch["uid"])
        assert batch["points"].shape == (b_sz, P, 3) and batch["points"].dtype == torch.float32
        assert batch["features"].shape == (b_sz, P, 8) and batch["features"].dtype == torch.float32
        l_max = batch["label_ids"].shape[1]
        assert batch["membership"].shape == (b_sz, P, l_max)
        for i, uid in enumerate(batch["uid"]):
            if not batch["valid"][i]:
                assert uid == "" and not batch["label_mask"][i].any() and not batch["feature_mask"][i].any()
                continue
            s = orig[uid]
            row_of = {p.tobytes(): j for j, p in enumerate(s.points)}
            idx = np.array([row_of[p.tobytes()] for p in batch["points"][i].numpy()])
            assert len(set(idx.tolist())) == P  # subsampled without replacement
            np.testing.assert_array_equal(batch["features"][i].numpy(), s.features[idx].astype(np.float32))
            n_l = len(s.part_names)
            np.testing.assert_array_equal(batch["membership"][i, :, :n_l].numpy(), s.membership[idx])
            assert (batch["membership"][i, :, n_l:] == 0).all()
            assert batch["label_ids"][i, :n_l].tolist() == [bank.index(n) for n in s.part_names]
            assert (batch["label_ids"][i, n_l:] == -1).all()
            assert batch["label_mask"][i].tolist() == [j < n_l for j in range(l_max)]
            assert batch["feature_mask"][i].all()


def test_validation_is_deterministic_and_exactly_once_across_ranks(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [5, 1, 2], feature_dim=4)  # uneven; 4 slots > 3 shards
    ref = _dm(tmp_path, val_path=str(tmp_path), val_batch_size=2)
    first = list(ref.val_dataloader())
    second = list(ref.val_dataloader())
    assert [b["uid"] for b in first] == [b["uid"] for b in second]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a["points"], b["points"], rtol=0, atol=0)
    points_of = {u: b["points"][i] for b in first for i, u in enumerate(b["uid"]) if b["valid"][i]}

    per_rank = []
    for rank in range(2):
        dm = ShardDataModule(
            str(tmp_path), batch_size=2, num_points=P, val_path=str(tmp_path), val_num_workers=2
        )
        dm.set_distributed(rank, 2)
        dm.setup("validate")
        loader = dm.val_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
        for b in batches:  # same points for a uid whatever rank/worker reads it
            for i, u in enumerate(b["uid"]):
                if b["valid"][i]:
                    torch.testing.assert_close(b["points"][i], points_of[u], rtol=0, atol=0)
    assert len(per_rank[0]) == len(per_rank[1])  # no rank waits for the other
    all_uids = _valid_uids(per_rank[0]) + _valid_uids(per_rank[1])
    assert sorted(all_uids) == sorted(points_of) and len(all_uids) == 8


# ------------------------------------------------------------------------------------- training stream
@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_fixed_batches_and_disjoint_ranks(tmp_path: Path, num_workers: int) -> None:
    write_synthetic_shards(tmp_path, [5, 1, 3, 2], feature_dim=4)
    manifest = read_manifest(tmp_path)
    seen: list[set[str]] = []
    for rank in range(2):
        dm = ShardDataModule(
            str(tmp_path),
            batch_size=3,
            num_workers=num_workers,
            num_points=P,
            batches_per_epoch=5,
            shuffle_buffer=4,
        )
        dm.set_distributed(rank, 2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == 5
        assert all(len(b["uid"]) == 3 and b["valid"].all() for b in batches)
        seen.append({u for b in batches for u in b["uid"]})
        plan = partition_samples(manifest.shards, manifest.shard_urls(), 2)[rank]
        allowed = {u for s in manifest.shards if str(tmp_path / s.name) in plan.urls for u in s.uids}
        assert seen[-1] <= allowed
        assert dm.skip_counts()["train"]["skipped"] == 0 and dm.skip_counts()["train"]["seen"] >= 15
    assert not seen[0] & seen[1]


def test_more_workers_than_batches(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [3, 3], feature_dim=4)
    dm = _dm(tmp_path, num_workers=2, batches_per_epoch=1)
    assert len(list(dm.train_dataloader())) == 1  # the idle worker ends at once instead of streaming forever


def test_fewer_shards_than_ranks_splits_samples(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [6], feature_dim=4)
    seen = []
    for rank in range(2):
        dm = ShardDataModule(str(tmp_path), batch_size=2, num_workers=0, num_points=P, batches_per_epoch=4)
        dm.set_distributed(rank, 2)
        dm.setup("fit")
        seen.append({u for b in dm.train_dataloader() for u in b["uid"]})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 6


def test_training_order_is_seeded_and_changes_per_epoch(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [4, 4], feature_dim=4)

    def epoch_uids(dm: ShardDataModule, loader) -> list[str]:
        return [u for b in loader for u in b["uid"]]

    dm1, dm2 = _dm(tmp_path, batches_per_epoch=4), _dm(tmp_path, batches_per_epoch=4)
    l1, l2 = dm1.train_dataloader(), dm2.train_dataloader()
    e0 = epoch_uids(dm1, l1)
    assert e0 == epoch_uids(dm2, l2)  # same seed -> same stream
    loader_epoch = {"e": 0}
    l1.epoch_fn = lambda: loader_epoch["e"]
    assert epoch_uids(dm1, l1) == e0
    loader_epoch["e"] = 1
    assert epoch_uids(dm1, l1) != e0  # next epoch -> new resampling/shuffle/subsample
    other = _dm(tmp_path, batches_per_epoch=4, seed=1)
    assert epoch_uids(other, other.train_dataloader()) != e0


def test_rotate_about_axis_matches_scipy() -> None:
    pts = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    for axis, vec in enumerate(np.eye(3)):
        ref = Rotation.from_rotvec(0.7 * vec).apply(pts.astype(np.float64))
        np.testing.assert_allclose(rotate_about_axis(pts, 0.7, axis), ref, atol=1e-5)


def test_augmentation_rotates_about_up_and_scales(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [4], feature_dim=4)  # meta up_axis = "y"
    orig = _originals(tmp_path)
    dm = _dm(tmp_path, batches_per_epoch=2, rotate_up=True, scale_range=(2.0, 2.0))
    for batch in dm.train_dataloader():
        for i, uid in enumerate(batch["uid"]):
            pts = batch["points"][i].numpy() / 2.0
            np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 1.0, atol=1e-5)  # unit sphere x 2
            src = orig[uid].points
            ys = {round(float(y), 5) for y in src[:, 1]}
            assert all(round(float(y), 5) in ys for y in pts[:, 1])  # heights (y) unchanged
            assert not np.isin(pts[:, 0], src[:, 0]).all()  # but x changed: it was rotated


# ------------------------------------------------------------------------------------- broken data
def _write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for d in samples:
            for suffix in ("points.npy", "features.npy", "membership.npy", "parts.json", "meta.json"):
                if suffix in d:
                    info = tarfile.TarInfo(f"{d['__key__']}.{suffix}")
                    info.size = len(d[suffix])
                    tar.addfile(info, io.BytesIO(d[suffix]))


def _add_to_manifest(root: Path, name: str, uids: list[str]) -> None:
    m = json.loads((root / MANIFEST_NAME).read_text())
    size = (root / name).stat().st_size if (root / name).exists() else 0
    m["shards"].append(vars(ShardInfo(name=name, n_samples=len(uids), bytes=size, sha256="", uids=uids)))
    (root / MANIFEST_NAME).write_text(json.dumps(m))


def _broken_shard_set(root: Path) -> dict[str, int]:
    """Good shard (4) + a shard of bad samples (5 bad, 1 good) + truncated + corrupt + missing shards."""
    write_synthetic_shards(root, [4], feature_dim=8)
    rng = np.random.default_rng(1)

    def enc(uid: str, n: int = 2048, parts: tuple[str, ...] = ("leg",)) -> dict:
        return encode_sample(random_object_sample(uid, rng, n, 8, parts))

    nan_points = enc("nan-points")
    pts = np.load(io.BytesIO(nan_points["points.npy"]))
    pts[100] = np.nan
    nan_points["points.npy"] = npy_to_bytes(pts)
    nan_feats = enc("nan-features")
    nan_feats["features.npy"] = npy_to_bytes(np.full((2048, 8), np.nan, np.float16))
    few = encode_sample(random_object_sample("few-points", rng, 2048, 8, ("leg",)))
    small = random_object_sample("few-points", rng, 2048, 8, ("leg",))
    few["points.npy"] = npy_to_bytes(small.points[:300])
    few["features.npy"] = npy_to_bytes(small.features[:300])
    few["membership.npy"] = npy_to_bytes(np.packbits(small.membership[:300], axis=1))
    no_feats = {k: v for k, v in enc("no-features").items() if k != "features.npy"}
    unknown = enc("unknown-part", parts=("propeller",))
    good = enc("good-in-bad-shard")
    _write_tar(root / "bad-samples.tar", [nan_points, nan_feats, few, no_feats, unknown, good])
    _add_to_manifest(
        root, "bad-samples.tar", [d["__key__"] for d in (nan_points, nan_feats, few, no_feats, unknown, good)]
    )

    # Truncated: cut in the middle of the 2nd sample's features -> 1 good sample, 1 partial (points only).
    trio = [enc(f"trunc-{i}") for i in range(3)]
    _write_tar(root / "truncated.tar", trio)
    with tarfile.open(root / "truncated.tar") as tar:
        member = tar.getmember(f"{trio[1]['__key__']}.features.npy")
    data = (root / "truncated.tar").read_bytes()
    (root / "truncated.tar").write_bytes(data[: member.offset_data + member.size // 2])
    _add_to_manifest(root, "truncated.tar", [d["__key__"] for d in trio])

    (root / "corrupt.tar").write_bytes(np.random.default_rng(2).bytes(5000))
    _add_to_manifest(root, "corrupt.tar", ["c0"])
    _add_to_manifest(root, "missing.tar", ["m0"])
    return {
        "non_finite": 2,
        "too_few_points": 1,
        "missing_keys": 2,  # no-features + the truncated shard's partial sample
        "unknown_part": 1,
        "tar_error": 2,  # truncated + corrupt (each counted once)
        "missing_shard": 1,
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_inputs_are_skipped_and_counted(tmp_path: Path, workers: int) -> None:
    expected = _broken_shard_set(tmp_path)
    dm = _dm(tmp_path, val_path=str(tmp_path), val_num_workers=workers, max_skip_fraction=0.7)
    uids = _valid_uids(list(dm.val_dataloader()))
    assert sorted(uids) == sorted([f"obj-{i:05d}" for i in range(4)] + ["good-in-bad-shard", "trunc-0"])
    counts = dm.skip_counts()["val"]
    n_skipped = sum(expected.values())
    assert {k: v for k, v in counts.items() if k not in ("seen", "skipped")} == expected
    assert counts["skipped"] == n_skipped
    assert counts["seen"] == 6 + n_skipped  # 6 good samples
    assert dm.skip_metrics()["data/val/tar_error"] == 2.0


def test_too_many_skips_fail_the_run(tmp_path: Path) -> None:
    _broken_shard_set(tmp_path)  # 9 of 15 skipped = 60%
    dm = _dm(tmp_path, val_path=str(tmp_path), max_skip_fraction=0.5)
    with pytest.raises(DataQualityError, match=r"skipped 9 of 15 samples \(60.0%\).*max_skip_fraction=50.0%"):
        list(dm.val_dataloader())


def test_unreadable_training_data_raises_instead_of_hanging(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [2], feature_dim=4)
    (tmp_path / "shard-000000.tar").write_bytes(b"\x00garbage" * 100)
    dm = _dm(tmp_path, batches_per_epoch=2)
    with pytest.raises(DataQualityError, match="consecutive"):
        next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------------- targets / hooks
class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.epochs: list[list[str]] = []

    def on_train_epoch_start(self) -> None:
        self.epochs.append([])

    def training_step(self, batch, batch_idx):
        assert batch["features"].dtype == torch.float32  # converted by the datamodule hook
        self.epochs[-1].extend(batch["uid"])
        self.log_dict(self.trainer.datamodule.skip_metrics(), reduce_fx="sum")
        return (self.w * batch["points"]).mean() + self.w**2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_fp16_transfer(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path / "s", [4, 3], feature_dim=4)
    dm = ShardDataModule(
        str(tmp_path / "s"),
        batch_size=2,
        num_workers=0,
        num_points=P,
        batches_per_epoch=3,
        features_fp16_transfer=True,
    )
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["features"].dtype == torch.float16  # shipped as fp16
    model = _Recorder()
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=ShardDataModule(**{**dm.hparams}))
    assert [len(e) for e in model.epochs] == [6, 6]
    assert model.epochs[0] != model.epochs[1]  # epoch number from the Trainer reseeds the stream
    assert math.isclose(trainer.callback_metrics["data/train/skipped"].item(), 0.0)
    assert Counter(u for e in model.epochs for u in e).keys() <= {f"obj-{i:05d}" for i in range(7)}


def _tar_reader_run(urls: list[str]) -> tuple[list[str], list[Exception]]:
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    samples = list(tar_samples(handler)([{"url": u} for u in urls]))
    return [decode_sample(s).uid for s in samples if "meta.json" in s], errors


def test_tar_reader_detects_silent_truncation_and_garbage(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [3], feature_dim=4)
    shard = tmp_path / "shard-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    third_header = members[10].offset  # first member of the third sample
    assert _tar_reader_run([str(shard)]) == (["obj-00000", "obj-00001", "obj-00002"], [])
    # WebDataset's pipe: reader (the remote-URL path) yields the same samples.
    assert _tar_reader_run([f"pipe:cat {shard}"]) == (["obj-00000", "obj-00001", "obj-00002"], [])

    # Cut exactly at a member boundary: tarfile alone would report a clean end after 2 samples.
    (tmp_path / "cut.tar").write_bytes(data[:third_header])
    uids, errors = _tar_reader_run([str(tmp_path / "cut.tar")])
    assert uids == ["obj-00000", "obj-00001"] and len(errors) == 1
    assert "end-of-archive" in str(errors[0])

    # Garbage where the third sample's header should be.
    garbled = bytearray(data)
    garbled[third_header : third_header + 512] = b"\x07" * 512
    (tmp_path / "garbled.tar").write_bytes(bytes(garbled))
    uids, errors = _tar_reader_run([str(tmp_path / "garbled.tar"), str(shard)])
    assert uids == ["obj-00000", "obj-00001", "obj-00000", "obj-00001", "obj-00002"] and len(errors) == 1


def test_stage2_can_skip_teacher_features(tmp_path: Path) -> None:
    """``load_features=False`` ships width-0 features; everything else is the same stream."""
    write_synthetic_shards(tmp_path, [4, 3], feature_dim=8)
    full = _dm(tmp_path, batches_per_epoch=3, rotate_up=True, num_val_shards=1)
    slim = _dm(tmp_path, batches_per_epoch=3, rotate_up=True, num_val_shards=1, load_features=False)
    for a, b in zip(full.train_dataloader(), slim.train_dataloader(), strict=True):
        assert a["features"].shape[-1] == 8 and b["features"].shape == (*b["points"].shape[:2], 0)
        assert a["uid"] == b["uid"]
        for key in ("points", "membership", "label_ids", "label_mask"):
            assert torch.equal(a[key], b[key]), key
    val = list(slim.val_dataloader())
    assert val and all(b["features"].shape[-1] == 0 for b in val)


def test_streamed_patch_targets_move_with_the_points(tmp_path: Path) -> None:
    """Compact shards: stored centres (synthetic ones are stored points) get the points' rotation/scale."""
    write_synthetic_shards(tmp_path, [4], feature_dim=6, targets="patches", n_patches=16)
    orig = _originals(tmp_path)
    dm = _dm(tmp_path, num_points=2048, batches_per_epoch=2, rotate_up=True, scale_range=(0.5, 2.0))
    for batch in dm.train_dataloader():
        assert batch["features"].shape == (2, 2048, 0)
        assert batch["patch_centers"].shape == (2, 16, 3) and batch["patch_features"].shape == (2, 16, 6)
        for i, uid in enumerate(batch["uid"]):
            d = torch.cdist(batch["patch_centers"][i].double(), batch["points"][i].double()).min(1).values
            assert float(d.max()) < 1e-5
            s = orig[uid]
            np.testing.assert_array_equal(
                batch["patch_features"][i].numpy(), s.patch_features.astype(np.float32)
            )
            assert not np.allclose(batch["patch_centers"][i].numpy(), s.patch_centers, atol=1e-3)


def test_validation_pads_carry_no_patch_targets(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path / "v", [3], feature_dim=6, targets="patches", n_patches=16)
    dm = _dm(tmp_path / "v", val_path=str(tmp_path / "v"), val_num_workers=0)
    batches = list(dm.val_dataloader())
    assert [b["valid"].tolist() for b in batches] == [[True, True], [True, False]]
    pad = batches[1]
    assert torch.isfinite(pad["patch_centers"][0]).all() and torch.isnan(pad["patch_centers"][1]).all()
    assert (pad["patch_features"][1] == 0).all()
