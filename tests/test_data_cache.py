"""Decoded training cache: batch contents, augmentation, partition, equal steps, resume and skips."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import quiet_trainer
from scipy.spatial.transform import Rotation
from test_datamodule import _broken_shard_set

from patchalign.data.cache import unpack_bits
from patchalign.data.datamodule import ShardDataModule
from patchalign.data.pipeline import DataQualityError, rotation_about_axes
from patchalign.data.schema import decode_sample
from patchalign.data.synthetic import write_synthetic_shards
from patchalign.data.writer import read_manifest

N = 2048


def _originals(path: Path) -> dict:
    urls = read_manifest(path).shard_urls()
    return {s.uid: s for s in (decode_sample(r) for r in wds.WebDataset(urls, shardshuffle=False))}


def _dm(path: Path, **kw) -> ShardDataModule:
    args = dict(batch_size=3, num_workers=0, num_points=N, seed=0, cache="host", pin_memory=False)
    args.update(kw)
    dm = ShardDataModule(str(path), **args)
    dm.setup("fit")
    return dm


def _rows(a: np.ndarray) -> dict[bytes, int]:
    return {r.tobytes(): i for i, r in enumerate(np.ascontiguousarray(a))}


def test_unpack_bits_and_rotations_match_numpy_and_scipy() -> None:
    rng = np.random.default_rng(0)
    bits = rng.random((5, 7, 19)) < 0.4
    packed = torch.from_numpy(np.packbits(bits, axis=-1))
    assert torch.equal(unpack_bits(packed, 19), torch.from_numpy(bits))
    angles = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    axes = torch.tensor([0, 1, 2])
    got = rotation_about_axes(angles, axes)
    for i, name in enumerate("xyz"):
        ref = Rotation.from_euler(name, float(angles[i])).as_matrix()
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("targets", ["points", "patches"])
def test_cached_batches_are_the_stored_objects(tmp_path: Path, targets: str) -> None:
    """With num_points = N and no augmentation a batch row is a permutation of the stored object."""
    write_synthetic_shards(tmp_path, [4, 3], feature_dim=6, targets=targets, n_patches=16)
    orig = _originals(tmp_path)
    dm = _dm(tmp_path, batches_per_epoch=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert batch["points"].shape == (3, N, 3) and batch["valid"].all()
        for i, uid in enumerate(batch["uid"]):
            s = orig[uid]
            pos = _rows(s.points)
            perm = np.array([pos[r.tobytes()] for r in batch["points"][i].numpy()])
            assert sorted(perm.tolist()) == list(range(N))  # without replacement
            n_l = len(s.part_names)
            np.testing.assert_array_equal(batch["membership"][i, :, :n_l].numpy(), s.membership[perm])
            assert batch["label_mask"][i].sum() == n_l
            if targets == "points":
                np.testing.assert_array_equal(
                    batch["features"][i].numpy(), s.features[perm].astype(np.float32)
                )
                assert "patch_centers" not in batch
            else:
                assert batch["features"].shape[-1] == 0
                np.testing.assert_array_equal(batch["patch_centers"][i].numpy(), s.patch_centers)
                np.testing.assert_array_equal(
                    batch["patch_features"][i].numpy(), s.patch_features.astype(np.float32)
                )
    # one epoch of 9 draws over 7 objects: every object before any repeats
    first7 = [u for b in batches for u in b["uid"]][:7]
    assert sorted(first7) == sorted(orig)


def test_augmentation_moves_centres_with_the_points(tmp_path: Path) -> None:
    """Synthetic stored centres are stored points: after augmentation each must still be one."""
    write_synthetic_shards(tmp_path, [5], feature_dim=4, targets="patches", n_patches=32)
    orig = _originals(tmp_path)
    dm = _dm(tmp_path, batches_per_epoch=2, rotate_up=True, scale_range=(0.5, 1.5))
    for batch in dm.train_dataloader():
        for i, uid in enumerate(batch["uid"]):
            pts, ctr = batch["points"][i].double(), batch["patch_centers"][i].double()
            d = torch.cdist(ctr, pts).min(dim=1).values
            assert float(d.max()) < 1e-5
            s = orig[uid]
            scale = float(pts.norm(dim=1).mean())  # unit-sphere points, scaled
            assert 0.5 <= scale <= 1.5
            np.testing.assert_allclose(  # heights (y = up) only scaled, xz plane rotated
                np.sort(pts[:, 1].numpy()), np.sort(s.points[:, 1].astype(np.float64) * scale), atol=1e-5
            )
            assert not np.allclose(np.sort(pts[:, 0].numpy()), np.sort(s.points[:, 0] * scale), atol=1e-3)


def test_ranks_are_disjoint_with_equal_steps(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [5, 2, 1, 3], feature_dim=4, targets="patches", n_patches=8)
    seen, lengths = [], []
    for rank in range(2):
        dm = ShardDataModule(str(tmp_path), batch_size=2, num_workers=2, num_points=512, cache="host")
        dm.set_distributed(rank, 2)
        dm.setup("fit")
        cache = dm.decoded_cache()
        seen.append(set(cache.uids))
        loader = dm.train_dataloader()
        lengths.append((len(loader), len(list(loader))))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 11
    assert lengths[0] == lengths[1] == (3, 3)  # ceil(11 / (2 x 2)) on both ranks


def test_resume_position_continues_the_same_batches(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [6], feature_dim=4)
    dm = _dm(tmp_path, num_points=256, batch_size=2, batches_per_epoch=5, rotate_up=True)
    loader = dm.train_dataloader()
    full = list(loader)
    loader.position_fn = lambda: (0, 3)
    tail = list(loader)
    assert len(tail) == 2
    for a, b in zip(full[3:], tail, strict=True):
        assert a["uid"] == b["uid"] and torch.equal(a["points"], b["points"])
    loader.position_fn = lambda: (1, 0)
    assert [b["uid"] for b in loader] != [b["uid"] for b in full]  # a new epoch reshuffles


def test_skips_are_counted_once_while_building(tmp_path: Path) -> None:
    expected = _broken_shard_set(tmp_path)
    dm = _dm(tmp_path, num_points=512, batch_size=2, max_skip_fraction=0.7, num_workers=2)
    cache = dm.decoded_cache()
    assert sorted(cache.uids) == sorted([f"obj-{i:05d}" for i in range(4)] + ["good-in-bad-shard", "trunc-0"])
    counts = dm.skip_counts()["train"]
    assert {k: v for k, v in counts.items() if k not in ("seen", "skipped")} == expected
    assert counts["seen"] == 6 + sum(expected.values())
    dm2 = _dm(tmp_path, num_points=512, batch_size=2, max_skip_fraction=0.5)
    with pytest.raises(DataQualityError, match="skipped 9 of 15"):
        dm2.decoded_cache()


def test_cache_size_limit_is_a_clear_error(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, [4], feature_dim=64)
    dm = _dm(tmp_path, num_points=256, cache_max_gb=1e-3)  # 1 MB; each object is ~0.29 MB
    with pytest.raises(MemoryError, match="compact patch-target shards"):
        dm.decoded_cache()


class _Seen(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.uids: list[tuple[str, ...]] = []

    def training_step(self, batch, batch_idx):
        self.uids.append(tuple(batch["uid"]))
        assert batch["patch_features"].dtype == torch.float32  # the datamodule hook converts
        return (self.w * batch["points"]).mean() + (self.w * batch["patch_centers"].nan_to_num()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Preempted(RuntimeError):
    pass


class _StopAt(L.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise _Preempted


def _fit(path: Path, max_steps: int, ckpt: Path | None = None, cb: list | None = None) -> _Seen:
    dm = ShardDataModule(
        str(path), batch_size=2, num_workers=0, num_points=256, cache="host", features_fp16_transfer=True
    )
    model = _Seen()
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=cb or [])
    try:
        trainer.fit(model, dm, ckpt_path=str(ckpt) if ckpt else None)
    except _Preempted:
        model.preempted = True
    return model


@pytest.mark.parametrize("stop_at", [2, 3])  # mid-epoch and at the epoch boundary (3 batches/epoch)
def test_lightning_preempt_and_resume_with_cache(tmp_path: Path, stop_at: int) -> None:
    write_synthetic_shards(tmp_path / "s", [3, 3], feature_dim=4, targets="patches", n_patches=8)
    full = _fit(tmp_path / "s", 7)
    ckpt = tmp_path / "c.ckpt"
    a = _fit(tmp_path / "s", 7, cb=[_StopAt(stop_at, ckpt)])
    b = _fit(tmp_path / "s", 7, ckpt=ckpt)
    assert getattr(a, "preempted", False) and len(full.uids) == 7
    assert a.uids[:stop_at] + b.uids == full.uids


def test_fp16_finiteness_check_matches_numpy() -> None:
    """The bit-pattern check the cache and make_example share: the per-row max |x| equals numpy's
    (compared as fp16 values), and any NaN or +-Inf is refused with the sample's uid."""
    from patchalign.data.pipeline import finite_fp16_row_max
    from patchalign.data.schema import ShardFormatError

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 16)).astype(np.float16)
    feats[3] = 0.0  # a point no view saw: row max 0
    row_max = finite_fp16_row_max("ok", feats)
    np.testing.assert_array_equal(row_max.view(np.float16), np.abs(feats).max(1))
    assert row_max[3] == 0
    for bad in (np.nan, np.inf, -np.inf):
        broken = feats.copy()
        broken[10, 5] = bad
        with pytest.raises(ShardFormatError, match="'obj-7': features contain NaN/Inf"):
            finite_fp16_row_max("obj-7", broken)


def test_up_axis_meta_is_read_or_refused() -> None:
    """``meta["up_axis"]`` picks the rotation axis (sign ignored, any case); a missing one falls back to
    the configured default; anything else is a counted ``bad_meta`` format error, not a guess."""
    from patchalign.data.pipeline import ExampleConfig, up_axis_index
    from patchalign.data.schema import ShardFormatError
    from patchalign.data.synthetic import random_object_sample

    s = random_object_sample("u", np.random.default_rng(0), num_points=64)
    cfg = ExampleConfig(default_up_axis="z")
    for value, axis in (("x", 0), ("y", 1), ("+Z", 2), ("-y", 1)):
        s.meta["up_axis"] = value
        assert up_axis_index(s, cfg) == axis, value
    del s.meta["up_axis"]
    assert up_axis_index(s, cfg) == 2
    for value in ("w", ""):
        s.meta["up_axis"] = value
        with pytest.raises(ShardFormatError, match="is not x/y/z") as err:
            up_axis_index(s, cfg)
        assert err.value.reason == "bad_meta"


def test_objects_below_cache_points_are_skipped_like_any_bad_sample(tmp_path: Path, caplog) -> None:
    """``too_few_points`` goes through the same skip accounting as decode errors: counted in the
    worker with its reason, logged, and part of ``seen``; the cache keeps only the large objects."""
    from patchalign.data.synthetic import random_object_sample
    from patchalign.data.writer import ShardSetWriter

    rng = np.random.default_rng(0)
    with ShardSetWriter(tmp_path, max_samples_per_shard=4) as w:
        for i in range(4):
            w.write(random_object_sample(f"big-{i}", rng, num_points=3000))
        for i in range(2):
            w.write(random_object_sample(f"small-{i}", rng, num_points=2048))
    dm = _dm(tmp_path, num_points=512, cache_points=2500, max_skip_fraction=0.5)
    with caplog.at_level("WARNING"):
        cache = dm.decoded_cache()
    assert sorted(cache.uids) == [f"big-{i}" for i in range(4)]
    counts = dm.skip_counts()["train"]
    assert counts["too_few_points"] == 2 and counts["skipped"] == 2 and counts["seen"] == 6
    assert sum("skipping (too_few_points" in r.getMessage() for r in caplog.records) == 2
