"""Shard schema, text bank and the atomic/resumable writer."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from patchalign.data.schema import (
    MIN_POINTS,
    SCHEMA_VERSION,
    ShardFormatError,
    decode_sample,
    encode_sample,
    npy_from_bytes,
    npy_to_bytes,
    sample_key,
)
from patchalign.data.synthetic import random_object_sample, write_synthetic_text_bank
from patchalign.data.textbank import load_text_bank, save_text_bank
from patchalign.data.writer import MANIFEST_NAME, TEXT_BANK_NAME, ShardSetWriter, read_manifest
from patchalign.text import clean_part_name


def _sample(uid: str = "chair/1a2b.v1", n: int = MIN_POINTS, c: int = 12, parts: int = 11, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = [f"part {i}" for i in range(parts)]
    return random_object_sample(uid, rng, num_points=n, feature_dim=c, part_names=names)


def _read_all(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


# ------------------------------------------------------------------------------------------ schema
def test_encode_decode_roundtrip_is_exact() -> None:
    s = _sample()
    s.membership[:5] = True  # points in all 11 parts (multi-label), L not a multiple of 8
    s.membership[5:9] = False  # points in no part
    d = encode_sample(s)
    assert set(d) == {"__key__", "points.npy", "features.npy", "membership.npy", "parts.json", "meta.json"}
    assert npy_from_bytes(d["membership.npy"]).shape == (MIN_POINTS, 2)  # 11 bits packed into 2 bytes
    out = decode_sample(d)
    assert out.uid == s.uid
    np.testing.assert_array_equal(out.points, s.points)
    assert out.features.dtype == np.float16
    np.testing.assert_array_equal(out.features.view(np.uint16), s.features.view(np.uint16))  # bitwise
    np.testing.assert_array_equal(out.membership, s.membership)
    assert out.part_names == s.part_names
    assert out.meta["category"] == "synthetic"
    assert out.meta["schema_version"] == SCHEMA_VERSION
    assert (out.meta["n_points"], out.meta["n_parts"], out.meta["feature_dim"]) == (MIN_POINTS, 11, 12)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.zeros((0, 5), np.float16),
        np.array([[1, 0, 255]], np.uint8),
    ],
)
def test_npy_from_bytes_matches_numpy(array: np.ndarray) -> None:
    data = npy_to_bytes(array)
    ref = np.load(io.BytesIO(data), allow_pickle=False)
    got = npy_from_bytes(data)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_npy_from_bytes_rejects_truncated_and_garbage() -> None:
    data = npy_to_bytes(np.ones((10, 3), np.float32))
    with pytest.raises(ShardFormatError, match="expected 120") as e:
        npy_from_bytes(data[:-4])
    assert e.value.reason == "decode_error"
    with pytest.raises(ShardFormatError, match="magic"):
        npy_from_bytes(b"not an array at all")


@pytest.mark.parametrize(
    ("mutate", "reason", "match"),
    [
        (lambda s: setattr(s, "points", s.points.astype(np.float64)), "bad_array", "points must be float32"),
        (lambda s: s.points.__setitem__((3, 1), np.nan), "non_finite", "points contain NaN"),
        (lambda s: s.features.__setitem__((7, 0), np.inf), "non_finite", "features contain NaN"),
        (lambda s: setattr(s, "features", s.features * np.float16(2)), "bad_features", "L2-normalised"),
        (lambda s: setattr(s, "part_names", s.part_names[:-1]), "schema", "membership must be"),
        (lambda s: s.part_names.__setitem__(0, "Arm_Rest"), "schema", "'arm rest'"),
        (lambda s: s.part_names.__setitem__(0, "unknown"), "schema", "unknown"),
        (lambda s: s.part_names.__setitem__(1, s.part_names[0]), "schema", "duplicate"),
        (lambda s: s.meta.__setitem__("uid", "other"), "schema", "differs"),
        (lambda s: s.meta.__setitem__("bad", object()), "schema", "JSON"),
    ],
)
def test_validate_rejects_each_rule(mutate, reason: str, match: str) -> None:
    s = _sample()
    s.validate()  # valid before the mutation
    mutate(s)
    with pytest.raises(ShardFormatError, match=match) as e:
        s.validate()
    assert e.value.reason == reason


def test_validate_too_few_points_and_zero_feature_rows() -> None:
    s = _sample()
    s.features[:10] = 0  # "no teacher feature" rows are allowed
    s.validate()
    small = _sample(n=100)
    small.validate(min_points=64)
    with pytest.raises(ShardFormatError, match="100 points") as e:
        small.validate()
    assert e.value.reason == "too_few_points"


def test_decode_reports_missing_members_and_wrong_version() -> None:
    d = encode_sample(_sample())
    partial = {k: v for k, v in d.items() if k != "features.npy"}
    with pytest.raises(ShardFormatError, match="features.npy") as e:
        decode_sample(partial)
    assert e.value.reason == "missing_keys"
    meta = json.loads(d["meta.json"])
    meta["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ShardFormatError, match="schema_version") as e:
        decode_sample({**d, "meta.json": json.dumps(meta).encode()})
    assert e.value.reason == "schema_version"


def test_clean_part_name_and_sample_keys() -> None:
    assert clean_part_name("  Arm_Rest  ") == "arm rest"
    assert clean_part_name("Seat\tCushion\n") == "seat cushion"
    assert clean_part_name("t-shirt") == "t shirt"  # released _clean_text: punctuation -> space
    assert sample_key("plain_uid-1") == "plain_uid-1"
    k1, k2 = sample_key("a/b.c"), sample_key("a_b_c")
    assert k1 != k2 and "." not in k1 and "/" not in k1


# ------------------------------------------------------------------------------------------ text bank
def test_text_bank_roundtrip(tmp_path: Path) -> None:
    vecs = torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 1.0]])
    save_text_bank(
        tmp_path / "b.safetensors", ["leg", "seat", "back"], vecs, "openclip:ViT-B-16", ["a {} of a chair"]
    )
    bank = load_text_bank(tmp_path / "b.safetensors")
    assert bank.names == ["leg", "seat", "back"] and len(bank) == 3 and bank.dim == 2
    assert bank.encoder_id == "openclip:ViT-B-16" and bank.templates == ["a {} of a chair"]
    expected = torch.tensor([[0.6, 0.8], [0.0, -1.0], [2**-0.5, 2**-0.5]])
    torch.testing.assert_close(bank.vectors, expected)
    assert bank.vectors.dtype == torch.float32
    assert bank.index("seat") == 1 and "back" in bank and "arm" not in bank
    with pytest.raises(KeyError, match="arm"):
        bank.index("arm")


def test_text_bank_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ShardFormatError, match="clean"):
        save_text_bank(tmp_path / "b.st", ["Leg"], torch.ones(1, 2), "x", [])
    with pytest.raises(ShardFormatError, match="unique"):
        save_text_bank(tmp_path / "b.st", ["leg", "leg"], torch.ones(2, 2), "x", [])
    with pytest.raises(ShardFormatError, match=r"\(T=2, D\)"):
        save_text_bank(tmp_path / "b.st", ["leg", "arm"], torch.ones(3, 2), "x", [])
    (tmp_path / "junk.st").write_bytes(b"\x00" * 64)
    with pytest.raises(ShardFormatError, match="safetensors"):
        load_text_bank(tmp_path / "junk.st")


# ------------------------------------------------------------------------------------------ writer
def test_writer_shards_manifest_and_checksums(tmp_path: Path) -> None:
    bank = write_synthetic_text_bank(tmp_path / "bank.st", [f"part {i}" for i in range(11)])
    samples = [_sample(f"obj-{i}", parts=3, seed=i) for i in range(7)]
    out = tmp_path / "shards"
    with ShardSetWriter(out, max_samples_per_shard=3, text_bank=bank) as w:
        for s in samples:
            assert w.write(s)
    m = read_manifest(out / MANIFEST_NAME)
    assert m.complete and m.schema_version == SCHEMA_VERSION and m.feature_dim == 12
    assert [s.n_samples for s in m.shards] == [3, 3, 1]
    assert [u for s in m.shards for u in s.uids] == [s.uid for s in samples]
    assert m.totals == {
        "n_shards": 3,
        "n_samples": 7,
        "bytes": sum(s.bytes for s in m.shards),
        "n_points": 7 * 2048,
    }
    assert m.vocabulary == {"part 0": 7, "part 1": 7, "part 2": 7}
    assert m.text_bank == TEXT_BANK_NAME and load_text_bank(m.text_bank_path()).names[0] == "part 0"
    for info, path in zip(m.shards, m.shard_paths(), strict=True):
        assert path.stat().st_size == info.bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    raw = _read_all(m.shard_urls())
    assert [decode_sample(r).uid for r in raw] == [s.uid for s in samples]
    assert not list(out.glob(".*"))  # no temp files left


def test_writer_splits_on_bytes(tmp_path: Path) -> None:
    one = len(b"".join(v for k, v in encode_sample(_sample(parts=2)).items() if k != "__key__"))
    with ShardSetWriter(tmp_path, max_samples_per_shard=100, max_bytes=int(2.5 * one)) as w:
        for i in range(7):
            w.write(_sample(f"o{i}", parts=2, seed=i))
    # A shard is closed once it reaches max_bytes: 3 samples each (tar headers push 3 past 2.5x).
    assert [s.n_samples for s in read_manifest(tmp_path).shards] == [3, 3, 1]


def test_writer_rejects_inconsistent_samples(tmp_path: Path) -> None:
    bank = write_synthetic_text_bank(tmp_path / "bank.st", ["part 0", "part 1"])
    with ShardSetWriter(tmp_path / "a", text_bank=bank) as w:
        w.write(_sample("a", parts=2))
        with pytest.raises(ShardFormatError, match="'b' has feature_dim 5, shard set has 12"):
            w.write(_sample("b", c=5, parts=2))
        both = _sample("p", parts=2)
        both.patch_centers = both.points[:8].copy()
        both.patch_features = np.eye(8, 12, dtype=np.float16)  # unit rows
        with pytest.raises(
            ShardFormatError,
            match=r"'p' has targets \['points', 'patches'\], shard set has \['points'\]; write per-point",
        ):
            w.write(both)
        with pytest.raises(ShardFormatError, match="not in the text bank"):
            w.write(_sample("c", parts=3))
        bad = _sample("d", parts=2)
        bad.points[0, 0] = np.nan
        with pytest.raises(ShardFormatError, match="NaN"):
            w.write(bad)
    assert read_manifest(tmp_path / "a").n_samples == 1
    with ShardSetWriter(tmp_path / "b") as w:
        w.write(_sample("a", parts=3))
        with pytest.raises(ShardFormatError, match="lacks part names"):
            w.set_text_bank(bank)


def test_writer_resumes_after_crash(tmp_path: Path) -> None:
    samples = [_sample(f"obj-{i}", parts=2, seed=i) for i in range(10)]
    with pytest.raises(RuntimeError, match="preempted"):
        with ShardSetWriter(tmp_path, max_samples_per_shard=3) as w:
            for s in samples[:7]:
                w.write(s)
            raise RuntimeError("preempted")
    m = read_manifest(tmp_path)
    assert not m.complete
    assert [s.n_samples for s in m.shards] == [3, 3, 1]  # whole samples of the open shard were kept
    (tmp_path / ".shard-000009.tar.tmp").write_bytes(b"half written")  # a stale temp from a hard kill
    w = ShardSetWriter(tmp_path, max_samples_per_shard=3)
    assert w.done_uids == {s.uid for s in samples[:7]}
    assert not (tmp_path / ".shard-000009.tar.tmp").exists()
    written = [w.write(s) for s in samples]
    assert written == [False] * 7 + [True] * 3
    w.close()
    m = read_manifest(tmp_path)
    assert m.complete
    uids = [decode_sample(r).uid for r in _read_all(m.shard_urls())]
    assert sorted(uids) == sorted(s.uid for s in samples)  # each exactly once


def test_writer_adopts_unlisted_shard_and_drops_damaged_one(tmp_path: Path) -> None:
    with ShardSetWriter(tmp_path, max_samples_per_shard=2) as w:
        for i in range(6):
            w.write(_sample(f"obj-{i}", parts=2, seed=i))
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    # Crash between a shard's os.replace and the manifest update: the manifest lacks the last shard.
    manifest["shards"] = manifest["shards"][:2]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    # And the first shard got truncated on disk (size no longer matches the manifest).
    first = tmp_path / "shard-000000.tar"
    first.write_bytes(first.read_bytes()[:1000])
    w = ShardSetWriter(tmp_path, max_samples_per_shard=2)
    assert w.done_uids == {"obj-2", "obj-3", "obj-4", "obj-5"}
    assert not first.exists()
    assert w.manifest.vocabulary == {"part 0": 4, "part 1": 4}  # adopted shard's counts included
    for i in range(6):
        w.write(_sample(f"obj-{i}", parts=2, seed=i))
    m = read_manifest(w.close())
    assert sorted(u for s in m.shards for u in s.uids) == [f"obj-{i}" for i in range(6)]
    assert m.totals["n_points"] == 6 * 2048


def test_writer_discards_sample_interrupted_mid_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_addfile = tarfile.TarFile.addfile
    calls = {"n": 0}

    def flaky_addfile(self, tarinfo, fileobj=None):
        calls["n"] += 1
        if calls["n"] == 8:  # third member of the second sample
            raise OSError("disk full")
        return real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", flaky_addfile)
    with pytest.raises(OSError, match="disk full"):
        with ShardSetWriter(tmp_path, max_samples_per_shard=10) as w:
            for i in range(3):
                w.write(_sample(f"obj-{i}", parts=2, seed=i))
    # The open shard held a half-written sample, so it was discarded entirely; nothing is "done".
    assert read_manifest(tmp_path).shards == []
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)
    assert ShardSetWriter(tmp_path).done_uids == set()


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "patchalign-shards", "schema_version": 999}))
    with pytest.raises(ShardFormatError, match="Rebuild"):
        read_manifest(tmp_path)


# ------------------------------------------------------------------------------ compact patch targets
def _compact(uid: str = "compact-1", targets: str = "patches", seed: int = 0):
    rng = np.random.default_rng(seed)
    return random_object_sample(
        uid, rng, num_points=MIN_POINTS, feature_dim=12, targets=targets, n_patches=128
    )


def test_compact_patch_target_sample_roundtrip_and_size() -> None:
    s = _compact()
    d = encode_sample(s)
    assert {"patch_centers.npy", "patch_features.npy"} <= set(d)
    out = decode_sample(d)
    assert out.features.shape == (MIN_POINTS, 0) and out.feature_dim == 12
    assert out.targets == ["patches"] and out.meta["targets"] == ["patches"] and out.meta["n_patches"] == 128
    np.testing.assert_array_equal(out.patch_centers, s.patch_centers)
    np.testing.assert_array_equal(out.patch_features.view(np.uint16), s.patch_features.view(np.uint16))
    # the released size: 128 x 768 fp16 + 128 x 3 fp32 is ~198 KB, vs 5000 x 768 fp16 = 7.68 MB per point
    big = random_object_sample("b", np.random.default_rng(0), 5000, 768, targets="patches")
    nbytes = sum(len(v) for k, v in encode_sample(big).items() if k.startswith("patch_"))
    assert 128 * 768 * 2 + 128 * 12 <= nbytes < 128 * 768 * 2 + 128 * 12 + 512


def test_patch_members_come_together_and_are_checked() -> None:
    d = encode_sample(_compact())
    with pytest.raises(ShardFormatError, match="only one of the patch-target members") as e:
        decode_sample({k: v for k, v in d.items() if k != "patch_features.npy"})
    assert e.value.reason == "missing_keys"
    s = _compact()
    s.patch_features = (s.patch_features.astype(np.float32) * 3).astype(np.float16)
    with pytest.raises(ShardFormatError, match="L2-normalised"):
        s.validate()
    s = _compact()
    s.patch_centers[3, 1] = np.nan
    with pytest.raises(ShardFormatError, match="patch_centers contain NaN"):
        s.validate()
    s = _compact(targets="both")
    s.patch_features = s.patch_features[:, :5].copy()
    with pytest.raises(ShardFormatError, match="width 5 != per-point width 12"):
        s.validate()


def test_version_1_samples_are_still_read() -> None:
    d = encode_sample(_sample())
    meta = json.loads(d["meta.json"])
    meta["schema_version"] = 1
    del meta["targets"]
    out = decode_sample({**d, "meta.json": json.dumps(meta).encode()})
    assert out.targets == ["points"] and out.patch_centers is None


def test_writer_keeps_one_target_kind_per_set(tmp_path: Path) -> None:
    with ShardSetWriter(tmp_path) as w:
        w.write(_compact("a"))
        with pytest.raises(ShardFormatError, match="separate sets"):
            w.write(_compact("b", targets="both"))
    m = read_manifest(tmp_path)
    assert m.targets == ["patches"] and m.feature_dim == 12 and m.n_samples == 1
