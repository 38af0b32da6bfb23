"""Teachers (DINOv2 / timm / OpenCLIP vision) and text encoders (OpenCLIP / transformers / MiniLM).

Real loaders, tiny random models: each is built from a config, saved to tmp_path and loaded back
through the same spec-string path users call, then checked against the in-memory original.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from patchalign.teachers import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherNotFoundError,
    load_teacher,
    sample_grid_at_pixels,
)
from patchalign.text import (  # noqa: E402
    TextEmbeddingCache,
    TextEncoder,
    encode_part_names,
    load_text_encoder,
)


def _imagenet(images: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------- teachers
def test_dinov2_teacher_from_saved_dir(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    model = Dinov2Model(cfg).eval()
    model.save_pretrained(tmp_path / "dino")
    teacher = load_teacher(f"dinov2:{tmp_path / 'dino'}", input_size=56)
    assert teacher.teacher_id == f"dinov2:{tmp_path / 'dino'}"
    images = torch.rand(3, 70, 70, 3)
    grid = teacher.patch_features(images, batch_size=2)
    assert grid.shape == (3, 32, 4, 4)
    with torch.no_grad():
        tokens = model(pixel_values=_imagenet(images, 56)).last_hidden_state[:, 1:]  # drop CLS
    expected = tokens.reshape(3, 4, 4, 32).permute(0, 3, 1, 2)  # row-major patch order
    torch.testing.assert_close(grid, expected, atol=1e-5, rtol=1e-4)
    dense = teacher.dense_features(images)
    assert dense.shape == (3, 32, 70, 70)
    torch.testing.assert_close(
        dense, F.interpolate(expected, size=(70, 70), mode="bilinear"), atol=1e-5, rtol=1e-4
    )


def test_dinov2_missing_weights_error_and_random_fallback(tmp_path, capsys):
    with pytest.raises(TeacherNotFoundError, match="no DINOv2 weights"):
        load_teacher(f"dinov2:{tmp_path / 'nothing'}")
    t1 = load_teacher(f"dinov2:{tmp_path / 'nothing'}", allow_random=True, input_size=28, random_seed=3)
    out = capsys.readouterr().out
    assert "randomly initialised DINOv2 (seed 3)" in out and "NOT semantic" in out
    assert "random" in t1.teacher_id and "seed=3" in t1.teacher_id
    t2 = load_teacher("dinov2-random:3", input_size=28)
    images = torch.rand(2, 28, 28, 3)
    torch.testing.assert_close(t1.patch_features(images), t2.patch_features(images))  # fixed seed
    t3 = load_teacher("dinov2-random:4", input_size=28)
    assert not torch.allclose(t1.patch_features(images), t3.patch_features(images))


def test_timm_teacher_from_weights_file(tmp_path):
    import timm

    # timm's own tiny test ViT (64 wide, patch 16); the loader path is the one real ViTs take.
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64, dynamic_img_size=True)
    path = tmp_path / "test_vit.pth"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(f"timm:test_vit@{path}", input_size=64)
    assert teacher.feature_dim == 64 and teacher.grid_size == 4
    images = torch.rand(2, 64, 64, 3)
    grid = teacher.patch_features(images)
    with torch.no_grad():
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        tokens = model.eval().forward_features(_imagenet(images, 64, mean, std))[:, model.num_prefix_tokens :]
    torch.testing.assert_close(grid, tokens.reshape(2, 4, 4, 64).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny random OpenCLIP model: (config json, weights file, in-memory model)."""
    import open_clip

    d = tmp_path_factory.mktemp("openclip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = d / "tiny-test-clip.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model("tiny-test-clip", pretrained=None).eval()
    weights = d / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return cfg_path, weights, model


def test_open_clip_vision_teacher(tiny_open_clip):
    cfg_path, weights, model = tiny_open_clip
    teacher = load_teacher(f"open_clip:{cfg_path}@{weights}")
    assert (teacher.feature_dim, teacher.input_size, teacher.grid_size) == (32, 32, 4)
    images = torch.rand(2, 32, 32, 3)
    grid = teacher.patch_features(images)
    visual = model.visual
    with torch.no_grad():
        x = _imagenet(images, 32, visual.image_mean, visual.image_std)
        emb = visual._embeds(x)
        tokens = visual.ln_post(visual.transformer(emb))[:, 1:]
    torch.testing.assert_close(grid, tokens.reshape(2, 4, 4, 32).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-4)


def test_teacher_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown teacher spec"):
        load_teacher("resnet:50")
    with pytest.raises(TeacherNotFoundError):
        load_teacher(f"timm:test_vit@{tmp_path / 'missing.pth'}")


def test_sample_grid_at_pixels_equals_interpolate():
    grid = torch.randn(2, 5, 3, 4)
    dense = F.interpolate(grid, size=(11, 13), mode="bilinear", align_corners=False)
    v, r, c = torch.meshgrid(torch.arange(2), torch.arange(11), torch.arange(13), indexing="ij")
    got = sample_grid_at_pixels(grid, v.flatten(), r.flatten(), c.flatten(), (11, 13))
    torch.testing.assert_close(got, dense.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- text
def test_open_clip_text_encoder_same_path(tiny_open_clip):
    import open_clip

    cfg_path, weights, model = tiny_open_clip
    enc = load_text_encoder(f"open_clip:{cfg_path}@{weights}")
    assert enc.dim == 16 and enc.encoder_id.startswith("open_clip:")
    texts = ["chair leg", "airplane wing", "a lamp shade"]
    got = enc.encode(texts)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(open_clip.get_tokenizer("tiny-test-clip")(texts)), dim=-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


class _CountingEncoder(TextEncoder):
    """Deterministic fake encoder: a fixed random vector per string; counts encoded strings."""

    def __init__(self) -> None:
        self.encoder_id, self.dim, self.calls = "fake", 8, []

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        self.calls.extend(texts)
        return torch.stack(
            [torch.randn(8, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts]
        )


def test_encode_part_names_templates_and_cache(tmp_path):
    enc = _CountingEncoder()
    templates = ("{}", "a {}", "{} part")
    cache = TextEmbeddingCache(enc.encoder_id, templates, tmp_path / "cache.pt")
    names, vecs = encode_part_names(enc, ["Arm_Rest", "leg", "arm rest", "  LEG "], templates, cache)
    assert names == ["arm rest", "leg"]  # cleaned, de-duplicated, first-occurrence order
    assert len(enc.calls) == 2 * 3  # each name x template encoded once
    for name, v in zip(names, vecs, strict=True):
        per_template = F.normalize(enc._encode_batch([t.format(name) for t in templates]), dim=-1)
        torch.testing.assert_close(v, F.normalize(per_template.mean(0), dim=0))
    enc.calls.clear()
    names2, vecs2 = encode_part_names(enc, ["leg", "seat"], templates, cache)
    assert enc.calls == ["seat", "a seat", "seat part"]  # only the new name
    torch.testing.assert_close(vecs2[0], vecs[1])
    cache.save()
    reloaded = TextEmbeddingCache(enc.encoder_id, templates, tmp_path / "cache.pt")
    assert set(reloaded.vectors) == {"arm rest", "leg", "seat"}
    assert len(TextEmbeddingCache("other-encoder", templates, tmp_path / "cache.pt")) == 0  # never mixed
    with pytest.raises(ValueError, match="exactly one"):
        encode_part_names(enc, ["leg"], ("{} of {}",))


def test_minilm_demo_encoder_real():
    enc = load_text_encoder("demo")
    assert enc.encoder_id == "sentence-transformers:all-MiniLM-L6-v2" and enc.dim == 384
    names, v = encode_part_names(enc, ["wheel", "tire", "lamp shade"])
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2]  # wheel ~ tire, not ~ lamp shade: a real, semantic model


def test_hf_text_encoders(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer, SiglipConfig, SiglipModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "chair", "leg", "wing", "a", "part"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=8)
    # Mean-pooled encoder (no get_text_features), e.g. Gemma/BERT.
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).eval()
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    enc = load_text_encoder(f"hf:{tmp_path / 'bert'}")
    texts = ["chair leg", "wing"]
    inputs = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(**inputs).last_hidden_state
    m = inputs["attention_mask"][..., None].float()
    torch.testing.assert_close(
        enc.encode(texts), F.normalize((h * m).sum(1) / m.sum(1), dim=-1), atol=1e-5, rtol=1e-4
    )
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    # SigLIP: get_text_features with max_length padding (as trained, and as Find3D encodes labels).
    siglip = SiglipModel(
        SiglipConfig(
            text_config=dict(tiny, vocab_size=len(vocab), max_position_embeddings=8),
            vision_config=dict(tiny, image_size=16, patch_size=8),
        )
    ).eval()  # fmt: skip
    siglip.save_pretrained(tmp_path / "siglip")
    tok.save_pretrained(tmp_path / "siglip")
    enc = load_text_encoder(f"hf:{tmp_path / 'siglip'}")
    ids = tok(texts, padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = F.normalize(siglip.get_text_features(input_ids=ids), dim=-1)
    torch.testing.assert_close(enc.encode(texts), ref, atol=1e-5, rtol=1e-4)


def test_text_encoder_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("word2vec:x")
    with pytest.raises(FileNotFoundError):
        load_text_encoder(f"hf:{tmp_path / 'missing'}")
