"""Text bank: the fixed vocabulary of part names and their text-encoder embeddings.

Stage 2 scores every patch against every name in the bank, so the bank is stored once next to the
shards (not per sample) and samples refer to names, which the data module maps to row indices.
Stored as safetensors (one ``vectors`` tensor) with the names, encoder id and prompt templates in the
header metadata, so a single file fully describes how the vectors were made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from patchalign.atomic import atomic_path
from patchalign.data.schema import ShardFormatError
from patchalign.text import clean_part_name

TEXT_BANK_FORMAT = "patchalign-text-bank"
TEXT_BANK_VERSION = "1"


@dataclass
class TextBank:
    """Part-name vocabulary with L2-normalised float32 embeddings ``vectors (T, D)``."""

    names: list[str]
    vectors: Tensor
    encoder_id: str
    templates: list[str]
    _lookup: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._lookup = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._lookup

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def index(self, name: str) -> int:
        """Row of ``name``; ``KeyError`` with the bank's source if it is not in the vocabulary."""
        try:
            return self._lookup[name]
        except KeyError:
            raise KeyError(
                f"part name {name!r} is not in the text bank ({len(self)} names, {self.encoder_id})"
            ) from None

    def indices(self, names: list[str]) -> list[int]:
        return [self.index(n) for n in names]

    @property
    def lookup(self) -> dict[str, int]:
        """Name -> row mapping (read-only by convention)."""
        return self._lookup


def _check_bank(names: list[str], vectors: Tensor) -> None:
    if vectors.dim() != 2 or vectors.shape[0] != len(names):
        raise ShardFormatError(f"text bank vectors must be (T={len(names)}, D), got {tuple(vectors.shape)}")
    if len(set(names)) != len(names):
        raise ShardFormatError("text bank names must be unique")
    unclean = [n for n in names if n != clean_part_name(n) or not n]
    if unclean:
        raise ShardFormatError(f"text bank names must be cleaned with clean_part_name(): {unclean[:5]}")
    if not torch.isfinite(vectors).all():
        raise ShardFormatError("text bank vectors contain NaN/Inf")
    if (vectors.norm(dim=1) == 0).any():
        raise ShardFormatError("text bank has zero vectors (cannot be normalised)")


def save_text_bank(
    path: str | os.PathLike, names: list[str], vectors: Tensor, encoder_id: str, templates: list[str]
) -> None:
    """Write a text bank atomically (temp file + ``os.replace``); vectors are stored L2-normalised fp32."""
    vectors = vectors.detach().to("cpu", torch.float32)
    _check_bank(list(names), vectors)
    vectors = torch.nn.functional.normalize(vectors, dim=1).contiguous()
    metadata = {
        "format": TEXT_BANK_FORMAT,
        "version": TEXT_BANK_VERSION,
        "names": json.dumps(list(names)),
        "encoder_id": str(encoder_id),
        "templates": json.dumps(list(templates)),
    }
    with atomic_path(path) as tmp:
        save_file({"vectors": vectors}, str(tmp), metadata=metadata)


def load_text_bank(path: str | os.PathLike) -> TextBank:
    """Read a bank written by :func:`save_text_bank`; re-normalises defensively."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text bank {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vectors = f.get_tensor("vectors")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ShardFormatError(f"text bank {path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != TEXT_BANK_FORMAT:
        raise ShardFormatError(f"{path} is not a patchalign text bank (format={meta.get('format')!r})")
    names = json.loads(meta["names"])
    vectors = vectors.to(torch.float32)
    _check_bank(names, vectors)
    return TextBank(
        names=names,
        vectors=torch.nn.functional.normalize(vectors, dim=1),
        encoder_id=meta.get("encoder_id", ""),
        templates=json.loads(meta.get("templates", "[]")),
    )
