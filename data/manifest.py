"""What a head cache holds and where it came from: the typed description behind ``manifest.json``, and its content
address.

:class:`CacheSpec` is built once per ``cache`` run from the model, the capture settings and the dataset. Its
:meth:`~CacheSpec.identity` is the subset that determines the activations (weights fingerprint, layers, positions
rule, dtypes, max length, dataset fingerprint and fields); :func:`cache_key` hashes it, so the same inputs map to the
same cache and different inputs are never mixed. :meth:`~CacheSpec.header` is what ``manifest.json`` shows a reader.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from data.datasets import DatasetConfig


def cache_key(identity: Mapping[str, Any]) -> str:
    """Content address of a cache: sha256 of the canonical JSON of everything that determines its contents."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """A cache's model, capture settings and dataset."""

    model_id: str  # what the user asked for
    model_source: str  # where it was loaded from
    model_class: str
    model_type: str
    revision: str | None
    weights: str  # sha256 of a sample of the weights (headlab.models.weights_fingerprint)
    model_dtype: str
    n_layers: int
    layers: list[int]
    n_heads: int
    d_head: int
    positions: str
    dtype: str  # storage dtype
    max_length: int | None
    padding_side: str
    dataset: DatasetConfig
    dataset_fingerprint: str
    examples: int
    label_schema: dict[str, Any]

    def identity(self) -> dict[str, Any]:
        """Everything that determines the cached activations and labels (hashed into the cache key)."""
        return {
            "format": 1,
            "weights": self.weights,
            "model_type": self.model_type,
            "model_dtype": self.model_dtype,
            "layers": self.layers,
            "positions": self.positions,
            "dtype": self.dtype,
            "max_length": self.max_length,
            "dataset": self.dataset_fingerprint,
            "fields": self.dataset.fields(),
        }

    def header(self) -> dict[str, Any]:
        """The descriptive fields of ``manifest.json``."""
        return {
            "model": {"id": self.model_id, "source": self.model_source, "revision": self.revision,
                      "weights_sha256_sampled": self.weights, "class": self.model_class},
            "architecture": self.model_type,
            "n_layers": self.n_layers,
            "layers": self.layers,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "positions": self.positions,
            "dtype": self.dtype,
            "model_dtype": self.model_dtype,
            "max_length": self.max_length,
            "padding_side": self.padding_side,
            "dataset": {"spec": self.dataset.spec, "fingerprint": self.dataset_fingerprint, "examples": self.examples,
                        **self.dataset.fields(), "label_kind": self.dataset.label_kind},
            "label_schema": self.label_schema,
        }


_INT, _STR, _BOOL, _DICT, _LIST = "a whole number", "a string", "true or false", "a JSON object", "a JSON list"
_TOP: dict[str, str] = {
    "format_version": _INT, "key": _STR, "rows": _INT, "layers": _LIST, "n_layers": _INT, "n_heads": _INT,
    "d_head": _INT, "dtype": _STR, "positions": _STR, "complete": _BOOL, "shards": _LIST, "label_schema": _DICT,
    "extra_columns": _LIST, "model": _DICT, "dataset": _DICT, "identity": _DICT, "truncated_examples": _INT,
    "created": _STR, "architecture": _STR, "model_dtype": _STR, "padding_side": _STR,
}
_SHARD: dict[str, str] = {"file": _STR, "rows": _INT, "start_example": _INT, "end_example": _INT, "sha256": _STR}
_KINDS = ("binary", "multiclass", "regression")


def _is(value: Any, kind: str) -> bool:
    return {_INT: isinstance(value, int) and not isinstance(value, bool), _STR: isinstance(value, str),
            _BOOL: isinstance(value, bool), _DICT: isinstance(value, dict), _LIST: isinstance(value, list)}[kind]


def manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with the types and ranges of a cache's ``manifest.json`` (None: nothing). Every field a reader
    uses is checked here, once, so a hand-edited or damaged manifest is a one-line error, never a crash later."""
    for key, kind in _TOP.items():
        if key in manifest and not _is(manifest[key], kind):
            return f"{key} is {manifest[key]!r}, not {kind}"
    for key in ("rows", "n_heads", "d_head", "n_layers", "truncated_examples"):
        if key in manifest and manifest[key] < (0 if key in ("rows", "truncated_examples") else 1):
            return f"{key} is {manifest[key]}, out of range"
    if "layers" in manifest and not all(_is(v, _INT) and v >= 0 for v in manifest["layers"]):
        return f"layers is {manifest['layers']!r}, not a list of layer indices"
    if manifest.get("dtype", "float16") not in ("float16", "float32"):
        return f"dtype is {manifest['dtype']!r}, not float16 or float32"
    for shard in manifest.get("shards", []):
        if not isinstance(shard, dict):
            return f"a shard entry is {shard!r}, not {_DICT}"
        for key, kind in _SHARD.items():
            if key in shard and not _is(shard[key], kind):
                return f"shard field {key} is {shard[key]!r}, not {kind}"
        name = str(shard.get("file", ""))
        if not name.startswith("shards/") or ".." in name or shard.get("rows", 0) < 0:
            return f"shard {name!r} ({shard.get('rows')} rows) is not a shard of this cache"
    for column, schema in manifest.get("label_schema", {}).items():
        if not isinstance(schema, dict) or schema.get("kind") not in _KINDS:
            return f"label {column!r} has schema {schema!r}; its kind must be one of {', '.join(_KINDS)}"
        if "classes" in schema and not isinstance(schema["classes"], list):
            return f"label {column!r} lists classes {schema['classes']!r}, not {_LIST}"
    if not all(_is(v, _STR) for v in manifest.get("extra_columns", [])):
        return f"extra_columns is {manifest['extra_columns']!r}, not a list of column names"
    return None
