"""Keypoints from PatchAlign3D's dense features: zero-shot (from text) and few-shot (from prototypes).

Reproduces the two keypoint uses of the encoder that the PatchAlign3D talk reports on KeypointNet
(IoU@0.10: 32.88 zero-shot, 64.07 few-shot; PatchAlign3D, Hadgi et al., arXiv:2601.02457; code
dickoah/PatchAlign3D@655561b83a99e8c5631e8e3e29c064a446faf66c). The released code
ships no keypoint detector, so the rules below are ours and documented here:

* **Per-point fields.** Patch values (cosines to a name's text embedding, or patch features) are
  carried to the points by inverse-squared-distance interpolation over the ``k = 3`` nearest patch
  centres (PointNet++'s feature propagation, arXiv:1706.02413 §3.4). Unlike the nearest-centre
  transfer of ``segment``, the field varies inside a patch, so a peak is not a whole 32-point patch.
* **Zero-shot peaks.** Per name, a softmax over the queried names (the segmentation convention, so a
  name "wins" where it beats the other names) gives a probability field. A keypoint is the
  score-weighted centroid of the points within ``region_radius`` (geodesic) of the field's maximum,
  snapped to the nearest input point. Names with several instances (``instances[k] > 1``) repeat
  the search after suppressing everything within ``nms_radius`` geodesic distance of the previous
  peaks (geodesic non-maximum suppression: two legs of a chair are close in space but far apart
  along the surface).
* **Few-shot prototypes.** One prototype per semantic keypoint id: the mean of the L2-normalised
  per-point features at its annotated points over the support shapes. A query's keypoint is its
  point of highest cosine similarity to the prototype (a support shape queried with its own
  prototype therefore returns its own annotated point).

Geodesic distances are shortest paths on the symmetrised k-nearest-neighbour graph of the cloud, the
graph KeypointNet's evaluation uses (:mod:`zerokey.geodesics`, O(N k) memory: a 200,000-point cloud
works as a 2,048-point one does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zerokey.geodesics import geodesic_graph, graph_geodesics

__all__ = [
    "Peak",
    "interpolate_patch_values",
    "name_probabilities",
    "peak_keypoints",
    "KeypointPrototypes",
    "build_prototypes",
    "match_prototypes",
]


def interpolate_patch_values(points: Tensor, centers: Tensor, values: Tensor, k: int = 3) -> Tensor:
    """Carry per-patch values to points: inverse squared distance over the ``k`` nearest centres.

    Args:
        points: ``(B, N, 3)`` or ``(N, 3)``.
        centers: ``(B, G, 3)`` or ``(G, 3)`` patch centres, same frame.
        values: ``(B, G, C)`` or ``(G, C)``.
        k: neighbours (PointNet++ uses 3). A point on a centre takes that centre's value exactly.

    Returns:
        ``(B, N, C)`` (or ``(N, C)`` for unbatched input).
    """
    unbatched = points.dim() == 2
    if unbatched:
        points, centers, values = points[None], centers[None], values[None]
    k = min(k, centers.shape[1])
    d2 = torch.cdist(points.float(), centers.float()).square()  # (B, N, G)
    d2, idx = d2.topk(k, dim=-1, largest=False)
    w = 1.0 / d2.clamp_min(1e-12)
    # A point that coincides with a centre: its weight dominates by ~1e12 -> that centre's value.
    w = w / w.sum(-1, keepdim=True)
    b, n, _ = idx.shape
    c = values.shape[-1]
    gathered = torch.gather(values.float(), 1, idx.reshape(b, n * k, 1).expand(-1, -1, c)).reshape(b, n, k, c)
    out = (gathered * w[..., None]).sum(2)
    return out[0] if unbatched else out


def name_probabilities(
    patch_features: Tensor, text: Tensor, logit_scale: float, mode: str = "softmax"
) -> Tensor:
    """``(G, K)`` patch scores per name: ``softmax`` over the names of scaled cosines, or raw ``cosine``."""
    cos = F.normalize(patch_features.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    if mode == "cosine":
        return cos
    if mode != "softmax":
        raise ValueError(f"unknown score mode {mode!r}: use 'softmax' or 'cosine'")
    return torch.softmax(cos * logit_scale, dim=-1)


@dataclass
class Peak:
    """One detected keypoint: ``name_index``/``instance``, the snapped point and its support."""

    name_index: int
    instance: int
    point_index: int
    xyz: Tensor
    score: float
    region_size: int


def peak_keypoints(
    points: Tensor,
    scores: Tensor,
    instances: Sequence[int] | None = None,
    region_radius: float = 0.05,
    nms_radius: float = 0.2,
    min_score: float | None = None,
    graph_k: int = 10,
) -> list[Peak]:
    """Keypoints at the peaks of per-point score fields (see the module docstring for the rule).

    Args:
        points: ``(N, 3)`` in the unit-sphere frame the radii refer to.
        scores: ``(N, K)`` per-point score per name (higher = more likely).
        instances: how many keypoints per name (default one each).
        region_radius: geodesic radius around a peak whose points form the weighted centroid.
        nms_radius: geodesic radius suppressed around a peak before the next instance of that name.
        min_score: drop peaks whose maximum score is below this (``None``: keep all).
        graph_k: neighbours of the k-NN graph geodesics run on.

    Returns:
        Peaks sorted by name then instance. All names are searched together each round.
    """
    n, kk = scores.shape
    instances = list(instances) if instances is not None else [1] * kk
    if len(instances) != kk:
        raise ValueError(f"{len(instances)} instance counts for {kk} names")
    available = torch.ones(kk, n, dtype=torch.bool, device=points.device)
    field = scores.T.float()  # (K, N)
    neg = torch.finfo(field.dtype).min
    peaks: list[Peak] = []
    graph = geodesic_graph(points, graph_k)
    for round_ in range(max(instances, default=0)):
        active = [i for i in range(kk) if instances[i] > round_ and available[i].any()]
        if not active:
            break
        act = torch.tensor(active, device=points.device)
        masked = field[act].masked_fill(~available[act], neg)
        best_score, best = masked.max(-1)  # (A,)
        geo = graph_geodesics(points, best, graph=graph)  # (A, N)
        region = geo <= region_radius
        w = field[act].clamp_min(0) * region
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, region.float())
        centroid = (w @ points.float()) / w.sum(-1, keepdim=True).clamp_min(1e-12)  # (A, 3)
        snapped = torch.cdist(centroid, points.float()).argmin(-1)
        available[act] &= geo > nms_radius
        for j, i in enumerate(active):
            if min_score is not None and float(best_score[j]) < min_score:
                available[i] = False  # a weaker later instance cannot pass either
                continue
            p = int(snapped[j])
            peaks.append(Peak(i, round_, p, points[p], float(best_score[j]), int(region[j].sum())))
    return sorted(peaks, key=lambda q: (q.name_index, q.instance))


@dataclass
class KeypointPrototypes:
    """Few-shot prototypes: ``ids (P,)`` semantic ids, ``features (P, D)`` L2-normalised means (float64),
    ``support (P,)`` how many support shapes annotate each id, ``n_shapes`` support shapes used."""

    ids: Tensor
    features: Tensor
    support: Tensor
    n_shapes: int


def build_prototypes(
    point_features: Sequence[Tensor], point_indices: Sequence[Tensor], semantic_ids: Sequence[Tensor]
) -> KeypointPrototypes:
    """Average the normalised features at annotated points per semantic id over the support shapes.

    Args:
        point_features: per support shape ``(N_i, D)`` per-point features.
        point_indices: per support shape ``(M_i,)`` annotated point indices.
        semantic_ids: per support shape ``(M_i,)`` their semantic ids (non-negative ints).
    """
    if not point_features:
        raise ValueError("few-shot prototypes need at least one support shape")
    feats = torch.cat(
        [
            F.normalize(f[i.long()].double(), dim=-1)
            for f, i in zip(point_features, point_indices, strict=True)
        ]
    )
    sid = torch.cat([s.long() for s in semantic_ids]).to(feats.device)
    shape_of = torch.cat([torch.full((len(s),), j, dtype=torch.long) for j, s in enumerate(semantic_ids)]).to(
        feats.device
    )
    ids, inverse = torch.unique(sid, return_inverse=True)
    feats = feats.double()
    sums = feats.new_zeros(len(ids), feats.shape[1]).index_add_(0, inverse, feats)
    seen = torch.zeros(len(ids), len(point_features), dtype=torch.bool, device=feats.device)
    seen[inverse, shape_of] = True
    return KeypointPrototypes(ids, F.normalize(sums, dim=-1), seen.sum(1), len(point_features))


def match_prototypes(query_features: Tensor, prototypes: KeypointPrototypes) -> tuple[Tensor, Tensor]:
    """Best-matching query point per prototype: ``(P,)`` point indices and their cosine similarity.

    Computed in float64: interpolated fields are smooth, so neighbouring points can sit within
    float32 rounding of each other's similarity and the arg-max would be decided by rounding.
    """
    q = F.normalize(query_features.double(), dim=-1)
    sim = (q @ prototypes.features.double().T.to(q.device)).float()
    best_sim, best = sim.max(0)
    return best, best_sim
