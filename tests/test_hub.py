"""Hugging Face Hub round trips of PretrainedPatchAlign: save_pretrained / from_pretrained / push_to_hub.

A repo id is resolved from a fake offline Hub cache laid out as huggingface_hub lays it
(``models--org--name/{refs/main, snapshots/<sha>/...}``), with ``HF_HUB_OFFLINE`` on: nothing is
downloaded, and the same code path serves a real cache on a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_released_checkpoint import make_released, save_released

from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.pretrained import PretrainedPatchAlign, load_pretrained

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def model() -> PretrainedPatchAlign:
    torch.manual_seed(0)
    enc = PatchAlignEncoder(EncoderConfig.tiny(head_dim=16)).eval()
    config = {
        "text_encoder": "open_clip:ViT-B-16",
        "logit": {"form": "scale", "scale": 2.5},
        "templates": ["{part}"],
    }
    return PretrainedPatchAlign(enc, config)


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _fake_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay ``files`` out as a downloaded snapshot of ``repo_id`` in a Hub cache folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())
    return snap


def _same_features(a: PretrainedPatchAlign, b: PretrainedPatchAlign) -> None:
    pts = torch.randn(2, 256, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.encode(pts).patch_features, b.encode(pts).patch_features)


def test_save_pretrained_writes_the_export_layout_and_loads_back(model, tmp_path):
    out = tmp_path / "export"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "patchalign-pretrained" and cfg["text_encoder"] == "open_clip:ViT-B-16"
    assert cfg["encoder"] == model.encoder.config.to_dict() and cfg["templates"] == ["{part}"]
    assert "library_name: patchalign" in (out / "README.md").read_text()
    for loaded in (PretrainedPatchAlign.from_pretrained(out), load_pretrained(out)):
        _same_features(model, loaded)
        assert loaded.logit_scale_value == pytest.approx(model.logit_scale_value)
        assert loaded.templates == ["{part}"]


def test_repo_id_resolves_from_the_offline_hub_cache(model, tmp_path, offline, monkeypatch):
    export = tmp_path / "export"
    model.save_pretrained(export)
    cache = tmp_path / "hub"
    files = {n: export / n for n in ("config.json", "model.safetensors", "README.md")}
    _fake_cache(cache, "someone/patchalign-tiny", files)
    loaded = PretrainedPatchAlign.from_pretrained("someone/patchalign-tiny", cache_dir=cache)
    _same_features(model, loaded)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # load_pretrained takes a repo id too (default cache)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    _same_features(model, load_pretrained("someone/patchalign-tiny"))
    with pytest.raises(Exception, match="(?i)offline|cannot find|not found|LocalEntryNotFound"):
        PretrainedPatchAlign.from_pretrained("someone/not-in-the-cache", cache_dir=cache)


def test_a_repo_with_the_released_file_loads_strictly(tmp_path, offline):
    parts = make_released(trans_dim=48, depth=2, encoder_dims=32, groups=16, size=8, text_dim=24)
    released = save_released(tmp_path / "patchalign3d.pt", *parts, num_group=16, group_size=8)
    cache = tmp_path / "hub"
    _fake_cache(cache, "patchalign3d/patchalign3d-encoder", {"patchalign3d.pt": released})
    loaded = PretrainedPatchAlign.from_pretrained("patchalign3d/patchalign3d-encoder", cache_dir=cache)
    _same_features(load_pretrained(released), loaded)
    broken = tmp_path / "broken.pt"
    payload = torch.load(released, weights_only=True)
    payload["model"].pop(next(iter(payload["model"])))
    torch.save(payload, broken)
    _fake_cache(cache, "someone/broken", {"patchalign3d.pt": broken})
    with pytest.raises(ValueError, match="missing"):
        PretrainedPatchAlign.from_pretrained("someone/broken", cache_dir=cache)


def test_push_to_hub_uploads_the_export(model, monkeypatch):
    from huggingface_hub import HfApi

    uploaded: dict[str, object] = {}

    class Repo:
        repo_id = "someone/patchalign-tiny"

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        folder = Path(folder_path)
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(p.name for p in folder.iterdir())
        uploaded["config"] = json.loads((folder / "config.json").read_text())
        return "https://huggingface.co/someone/patchalign-tiny/commit/x"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model.push_to_hub("someone/patchalign-tiny", token="hf_test")
    assert uploaded["repo_id"] == "someone/patchalign-tiny"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"]["format"] == "patchalign-pretrained"
