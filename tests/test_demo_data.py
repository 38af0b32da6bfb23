"""Built-in procedural demo data: parts per category, labels per point, determinism, split, build."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import read_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from patchalign.data import load_text_bank, read_manifest  # noqa: E402
from patchalign.engine.sources.demo import (  # noqa: E402
    DEMO_CATEGORIES,
    HELDOUT_CATEGORIES,
    SEEN_CATEGORIES,
    UNSEEN_NAME_CATEGORIES,
    build_demo,
    demo_records,
    generate_object,
)
from patchalign.engine.stages import labels_for  # noqa: E402
from patchalign.geometry import face_areas_normals, sample_surface  # noqa: E402


@pytest.mark.parametrize("category", list(DEMO_CATEGORIES))
def test_every_category_produces_its_parts(category):
    seen: set[str] = set()
    for seed in range(6):
        m = generate_object(category, seed)
        assert m.category == category and len(m.part_names) >= 2
        assert set(m.part_names) <= set(DEMO_CATEGORIES[category])
        assert m.faces.min() >= 0 and m.faces.max() < len(m.vertices)
        assert np.isfinite(m.vertices).all()
        areas, _ = face_areas_normals(torch.from_numpy(m.vertices), torch.from_numpy(m.faces))
        for k, name in enumerate(m.part_names):  # every listed part has faces with real area
            assert areas[torch.from_numpy(m.face_part == k)].sum() > 1e-3, (category, seed, name)
        seen.update(m.part_names)
    assert seen == set(DEMO_CATEGORIES[category])  # optional parts (chair arms) do show up


def test_generator_is_seeded():
    a, b, c = generate_object("airplane", 5), generate_object("airplane", 5), generate_object("airplane", 6)
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.face_part, b.face_part)
    assert a.vertices.shape != c.vertices.shape or not np.array_equal(a.vertices, c.vertices)


def test_every_point_has_exactly_its_face_part():
    for rec in demo_records(8):
        obj = generate_object(rec.category, rec.extra["seed"])
        s = sample_surface(torch.from_numpy(obj.vertices), torch.from_numpy(obj.faces), 2048, seed=0)
        membership, names = labels_for(rec, s.face_ids.numpy())
        assert names == obj.part_names
        assert (membership.sum(1) == 1).all()  # every point labelled, exactly once
        np.testing.assert_array_equal(membership.argmax(1), obj.face_part[s.face_ids.numpy()])
        assert membership.any(0).all(), rec.uid  # every part gets points at 2048 samples


def test_split_follows_the_unseen_category_protocol():
    """Held-out categories reuse training part names (in new arrangements); the unseen-name slice
    shares none; the default 340 objects give >= 24 validation shapes in every split."""
    records = demo_records(340)
    by_split: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for r in records:
        by_split.setdefault(r.split, set()).add(r.category)
        counts[r.split] = counts.get(r.split, 0) + 1
    assert by_split["heldout"] == set(HELDOUT_CATEGORIES)
    assert by_split["unseen_names"] == set(UNSEEN_NAME_CATEGORIES)
    assert by_split["train"] == by_split["val"] == set(SEEN_CATEGORIES)
    assert not set(SEEN_CATEGORIES) & (set(HELDOUT_CATEGORIES) | set(UNSEEN_NAME_CATEGORIES))
    train_names = {n for c in SEEN_CATEGORIES for n in DEMO_CATEGORIES[c]}
    # A new category, every part name seen in training (the arrangement is new: a stool is a chair
    # without back, taller; a bench is long with several leg pairs; a truck has a cab, a cargo box
    # and three axles).
    for c in HELDOUT_CATEGORIES:
        assert set(DEMO_CATEGORIES[c]) <= train_names, c
    unseen_names = {n for c in UNSEEN_NAME_CATEGORIES for n in DEMO_CATEGORIES[c]}
    assert not train_names & unseen_names  # the harder slice: names never trained on
    assert counts == {"train": 192, "val": 48, "heldout": 60, "unseen_names": 40}
    assert len({r.uid for r in records}) == 340


def test_build_demo_small(tmp_path):
    out = tmp_path / "demo"
    tiny = dict(
        n_objects=64, n_views=2, image_size=64, teacher="dinov2-random", teacher_input_size=28, progress=False
    )
    stats = build_demo(str(out), workers=1, **tiny)
    # teacher features only for the training splits (48 of 64 objects); the rest is evaluation-only
    assert stats["views"].processed == 48 and stats["views"].failed == 0 and stats["views"].total == 48
    bank = load_text_bank(out / "text_bank.safetensors")
    assert bank.encoder_id == "sentence-transformers:all-MiniLM-L6-v2" and bank.dim == 384
    all_names = {n for c in DEMO_CATEGORIES.values() for n in c}
    assert set(bank.names) == all_names  # one bank for every split's names
    counts = {}
    for split in ("train", "val", "heldout", "unseen_names"):
        m = read_manifest(out / split)
        assert m.complete and m.text_bank == "text_bank.safetensors"
        counts[split] = m.n_samples
        assert (out / split / "text_bank.safetensors").is_file()
    # 64 objects = 3 cycles of 17 + 13 (the 12 seen slots and a stool): 8 per seen category, its 5th
    # -> val; held-out 3 per category + the stool; unseen names 3 per category.
    assert counts == {"train": 42, "val": 6, "heldout": 10, "unseen_names": 6}
    train, heldout = read_shards(out / "train")[0], read_shards(out / "heldout")[0]
    assert train.features.shape[0] == 2048 and train.features.shape[1] > 0
    assert heldout.features.shape == (2048, 0) and heldout.membership.any(1).all()  # labels, no teacher
    # Re-running is a no-op: everything is cached or already in the shards.
    again = build_demo(str(out), workers=1, **tiny)
    assert again["views"].processed == 0 and again["views"].cached == 48
    assert again["write:train"].cached == counts["train"]


@pytest.mark.slow
def test_build_demo_with_worker_processes(tmp_path):
    """Two spawned worker processes (one chunk each) give the same shards as one process."""
    tiny = dict(
        n_objects=16, n_views=2, image_size=64, teacher="dinov2-random", teacher_input_size=28, progress=False
    )
    one = build_demo(str(tmp_path / "one"), workers=1, **tiny)
    two = build_demo(str(tmp_path / "two"), workers=2, **tiny)
    assert two["views"].processed == 12 and two["views"].total == 12 and two["sample"].processed == 16
    assert {k: v.processed for k, v in one.items()} == {k: v.processed for k, v in two.items()}
    for split in ("train", "heldout"):
        a, b = read_manifest(tmp_path / "one" / split), read_manifest(tmp_path / "two" / split)
        assert [s.uids for s in a.shards] == [s.uids for s in b.shards]
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # byte-identical shards
