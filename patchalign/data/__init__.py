"""Shard format (schema, writer, text bank) and the streaming Lightning data module."""

from patchalign.data.schema import (
    MIN_POINTS,
    SCHEMA_VERSION,
    ObjectSample,
    ShardFormatError,
    decode_sample,
    encode_sample,
)
from patchalign.data.textbank import TextBank, load_text_bank, save_text_bank
from patchalign.data.writer import Manifest, ShardInfo, ShardSetWriter, read_manifest

__all__ = [
    "MIN_POINTS",
    "SCHEMA_VERSION",
    "Manifest",
    "ObjectSample",
    "ShardFormatError",
    "ShardInfo",
    "ShardSetWriter",
    "TextBank",
    "decode_sample",
    "encode_sample",
    "load_text_bank",
    "read_manifest",
    "save_text_bank",
]
