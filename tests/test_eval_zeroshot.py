"""Zero-shot protocol: prompts, text sources, category restriction and patch->point assignment."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from patchalign.data.textbank import TextBank
from patchalign.model import EncoderConfig, PatchAlignEncoder
from patchalign.pretrained import assign_point_labels
from patchalign.text import PartTextEmbedder, build_prompts, clean_part_name


class FakeTextEncoder:
    """Deterministic stand-in for a text model: each string -> a fixed random vector (not normalised)."""

    id = "fake-text"

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.calls: list[list[str]] = []

    def vec(self, s: str) -> torch.Tensor:
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(s.encode()))) + 0.1

    def encode(self, names: list[str]) -> torch.Tensor:
        self.calls.append(list(names))
        return torch.stack([self.vec(s) for s in names])


def test_prompts_released_and_find3d() -> None:
    assert clean_part_name("  Engine_or-Frame ") == "engine or frame"
    assert build_prompts("Engine_or-Frame", None, "part_only") == [
        "engine or frame",
        "a engine or frame",
        "engine or frame part",
    ]
    assert build_prompts("wing", "Airplane", "part_plus_cat") == [
        "a wing of a airplane",
        "the wing of a airplane",
        "wing of airplane",
        "a wing part of a airplane",
    ]
    assert len(build_prompts("wing", "Airplane", "ensemble")) == 7
    assert build_prompts("wing", None, "part_plus_cat") == [
        "wing",
        "a wing",
        "wing part",
    ]  # no category: part only
    assert build_prompts("engine or frame", "Airplane", "find3d") == ["engine or frame of a airplane"]
    assert build_prompts("wing", "Airplane", ["{} of a {}", "{}"]) == ["wing of a airplane", "wing"]


def test_embedder_averages_normalised_prompt_embeddings_in_one_call() -> None:
    enc = FakeTextEncoder()
    emb = PartTextEmbedder(enc, "part_only")
    out = emb.embed(["wing", "tail"])
    assert len(enc.calls) == 1 and len(enc.calls[0]) == 6  # both names, all prompts, one batched call
    for i, name in enumerate(["wing", "tail"]):
        prompts = [name, f"a {name}", f"{name} part"]
        expect = F.normalize(torch.stack([F.normalize(enc.vec(p), dim=0) for p in prompts]).mean(0), dim=0)
        torch.testing.assert_close(out[i], expect)
    emb.embed(["tail", "wing"])
    assert len(enc.calls) == 1  # cached
    assert not emb.uses_category and PartTextEmbedder(enc, "find3d").uses_category
    with pytest.raises(ValueError, match="empty"):
        emb.embed([])
    with pytest.raises(ValueError, match="unknown template preset"):
        PartTextEmbedder(enc, "fancy")
    with pytest.raises(TypeError, match="text source"):
        PartTextEmbedder(object())


def test_embedder_precomputed_banks() -> None:
    vecs = {"wing": torch.tensor([3.0, 0, 0, 0]), "engine or frame": torch.tensor([0, 2.0, 0, 0])}
    out = PartTextEmbedder(vecs).embed(["Wing", "engine_or_frame"])  # looked up raw, then cleaned
    torch.testing.assert_close(out, torch.eye(4)[:2])
    bank = TextBank(names=["wing", "tail"], vectors=torch.eye(3)[:2], encoder_id="clip-x", templates=["{}"])
    e = PartTextEmbedder(bank)
    torch.testing.assert_close(e.embed(["tail"]), torch.eye(3)[1:2])
    assert e.id == "clip-x"
    with pytest.raises(KeyError, match="nose"):
        e.embed(["nose"])


# Two patches: centre 0 at the origin, centre 1 at x = 1. Four points, two near each centre.
CENTERS = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]]])
POINTS = torch.tensor([[[0.0, 0.1, 0], [0.25, 0, 0], [0.4, 0, 0], [1.0, 0.1, 0]]])
P2P = torch.tensor([[0, 0, 0, 1]])
F0 = F.normalize(torch.tensor([1.0, 0, 0.5, 0]), dim=0)  # patch 0 feature
FEATS = torch.stack([F0, torch.tensor([0.0, 1, 0, 0])])[None]
# text 2 belongs to another category; unmasked it would beat text 0 on patch 0 (cos .949 vs .894)
TEXT = torch.stack(
    [
        torch.tensor([1.0, 0, 0, 0]),
        torch.tensor([0.0, 1, 0, 0]),
        F.normalize(torch.tensor([1.0, 0, 1, 0]), dim=0),
    ]
)
MASK = torch.tensor([[True, True, False]])


def test_nearest_assignment_and_category_restriction() -> None:
    unmasked = assign_point_labels(FEATS, TEXT, POINTS, CENTERS, P2P)
    assert unmasked.labels.tolist() == [[2, 2, 2, 1]]
    pred = assign_point_labels(FEATS, TEXT, POINTS, CENTERS, P2P, part_mask=MASK)
    assert pred.labels.tolist() == [[0, 0, 0, 1]]
    assert torch.allclose(pred.scores[..., 2], torch.zeros(1, 4))  # masked part gets no probability
    assert torch.allclose(pred.scores.sum(-1), torch.ones(1, 4))
    cos0 = 1 / math.sqrt(1.25)  # cos(F0, text0)
    assert pred.patch_logits[0, 0, 0].item() == pytest.approx(cos0) and math.isinf(
        pred.patch_logits[0, 0, 2].item()
    )
    # "none" below a cosine threshold: patch 0's best allowed cosine is 0.894, patch 1's is 1
    thr = assign_point_labels(FEATS, TEXT, POINTS, CENTERS, P2P, part_mask=MASK, none_threshold=0.95)
    assert thr.labels.tolist() == [[-1, -1, -1, 1]]


def test_knn_assignment_hand_worked() -> None:
    # point 1 at x = 0.25: distances 0.25 and 0.75 -> weights 4 and 4/3, normalised 0.75 / 0.25
    pred = assign_point_labels(
        FEATS, TEXT, POINTS, CENTERS, P2P, part_mask=MASK, assign="knn", k=2, logit_scale=1.0
    )
    cos0 = 1 / math.sqrt(1.25)
    p_patch0 = [math.exp(cos0) / (math.exp(cos0) + 1), 1 / (math.exp(cos0) + 1)]
    p_patch1 = [1 / (1 + math.e), math.e / (1 + math.e)]
    expect = [0.75 * a + 0.25 * b for a, b in zip(p_patch0, p_patch1, strict=True)]
    assert pred.scores[0, 1, :2].tolist() == pytest.approx(expect, abs=1e-5)
    assert pred.labels[0, 1].item() == 0
    # point 2 at x = 0.4: weights 1/0.4 and 1/0.6 -> 0.6 / 0.4
    expect2 = [0.6 * a + 0.4 * b for a, b in zip(p_patch0, p_patch1, strict=True)]
    assert pred.scores[0, 2, :2].tolist() == pytest.approx(expect2, abs=1e-5)


def test_membership_assignment_averages_patches_containing_the_point() -> None:
    groups = torch.tensor([[[0, 1, 2], [2, 3, 3]]])  # point 2 is in both patches
    pred = assign_point_labels(
        FEATS, TEXT, POINTS, CENTERS, P2P, part_mask=MASK, group_index=groups, assign="membership"
    )
    # point 2: mean of (0.894, 0) and (0, 1) -> (0.447, 0.5) -> part 1; nearest would say part 0
    assert pred.labels.tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="group_index"):
        assign_point_labels(FEATS, TEXT, POINTS, CENTERS, P2P, assign="membership")
    with pytest.raises(ValueError, match="unknown assign"):
        assign_point_labels(FEATS, TEXT, POINTS, CENTERS, P2P, assign="vote")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not match"):
        assign_point_labels(FEATS, TEXT[:, :3], POINTS, CENTERS, P2P)


def test_batched_padding_equals_one_shape_at_a_time() -> None:
    """Shapes with 2, 3 and 4 parts in one padded batch give the same labels as alone, and nearest
    labels equal the argmax patch label gathered through point_to_patch (the released formula)."""
    enc = PatchAlignEncoder(EncoderConfig.tiny(8)).eval()
    pts = torch.rand(3, 64, 3) * 2 - 1
    embedder = PartTextEmbedder(FakeTextEncoder(8))
    names = [["a", "b"], ["a", "b", "c"], ["d", "c", "b", "a"]]
    with torch.no_grad():
        out = enc(pts)
        text, mask = embedder.batch(names, ["x", "y", "z"])
        assert tuple(text.shape) == (3, 4, 8) and mask.sum(1).tolist() == [2, 3, 4]
        batched = assign_point_labels(out.patch_features, text, pts, out.centers, out.point_to_patch, mask)
        for i in range(3):
            t = embedder.embed(names[i])
            single = assign_point_labels(
                out.patch_features[i : i + 1],
                t,
                pts[i : i + 1],
                out.centers[i : i + 1],
                out.point_to_patch[i : i + 1],
            )
            assert torch.equal(single.labels[0], batched.labels[i])
            released = (out.patch_features[i] @ t.T).argmax(-1)[out.point_to_patch[i]]
            assert torch.equal(released, batched.labels[i])
            assert batched.labels[i].max() < len(names[i])
