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
