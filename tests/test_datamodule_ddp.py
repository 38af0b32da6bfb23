"""Two-process DDP (gloo, CPU) over uneven shards: equal step counts, disjoint samples, no hang."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer

from patchalign.data.datamodule import ShardDataModule
from patchalign.data.synthetic import write_synthetic_shards


class _StepRecorder(L.LightningModule):
    """Logs with ``sync_dist`` every step, so a rank with an extra batch would block in all_reduce."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.train_steps: list[list[str]] = []
        self.val_steps: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.train_steps.append(list(batch["uid"]))
        loss = (self.w * batch["points"]).mean() + self.w**2
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_steps.append([u for u, v in zip(batch["uid"], batch["valid"].tolist(), strict=True) if v])
        self.log("val_valid", batch["valid"].float().sum(), sync_dist=True, reduce_fx="sum")

    def on_fit_end(self) -> None:
        record = {
            "rank": self.global_rank,
            "world_size": self.trainer.world_size,
            "train": self.train_steps,
            "val": self.val_steps,
            "skips": self.trainer.datamodule.skip_counts(),
        }
        (Path(self.out_dir) / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cache", ["off", "host"])
def test_ddp_uneven_shards_equal_steps_disjoint_samples(tmp_path: Path, cache: str) -> None:
    write_synthetic_shards(tmp_path / "train", [7, 1, 3, 2, 6], feature_dim=4)  # 19 samples
    write_synthetic_shards(tmp_path / "val", [3, 1], feature_dim=4, uid_prefix="val")
    dm = ShardDataModule(
        str(tmp_path / "train"),
        batch_size=2,
        num_workers=1,
        num_points=256,
        shuffle_buffer=4,
        val_path=str(tmp_path / "val"),
        val_batch_size=2,
        val_num_workers=0,
        cache=cache,
    )
    model = _StepRecorder(str(tmp_path))
    trainer = quiet_trainer(
        strategy="ddp_spawn", devices=2, max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=dm)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # Default batches_per_epoch: ceil(19 samples / (2 per batch x 2 ranks)) = 5 on EVERY rank, although
    # the shard partition gives the ranks 10 samples in 3 shards (7+2+1) and 9 samples in 2 (6+3).
    assert [len(r["train"]) for r in ranks] == [5, 5]
    for step0, step1 in zip(ranks[0]["train"], ranks[1]["train"], strict=True):
        assert len(step0) == len(step1) == 2
        assert not set(step0) & set(step1)
    assert not {u for s in ranks[0]["train"] for u in s} & {u for s in ranks[1]["train"] for u in s}
    # Validation: val shards of 3 and 1 samples -> rank 0 has 2 batches, rank 1 one batch + padding.
    assert [len(r["val"]) for r in ranks] == [2, 2]
    val_uids = [u for r in ranks for s in r["val"] for u in s]
    assert sorted(val_uids) == [f"val-{i:05d}" for i in range(4)]
    assert all(r["skips"]["train"]["skipped"] == 0 for r in ranks)
    if cache == "host":  # each rank decoded exactly its own partition once
        assert sorted(r["skips"]["train"]["seen"] for r in ranks) == [9, 10]
