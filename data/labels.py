"""Label columns: type checks and the schema a probe needs (binary, multi-class or regression)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from headlab.errors import HeadlabError

LabelKind = Literal["auto", "binary", "multiclass", "regression"]
_MAX_AUTO_CLASSES = 50


def _type_name(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def label_array(name: str, values: Sequence[Any], where: str = "dataset") -> np.ndarray:
    """Check that a label column has one type (ints and floats count as numbers) and no missing values, and
    return it as a numpy array (bool, int64, float64 or unicode)."""
    kinds: dict[str, int] = {}
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise HeadlabError(f"{where}: label '{name}' is missing at row {row}; give every example a label")
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            raise HeadlabError(f"{where}: label '{name}' is {value} at row {row}; give every example a finite label")
        kinds.setdefault(_type_name(value), row)
    if {"int", "float"} <= kinds.keys():
        kinds.pop("int")
    if len(kinds) > 1:
        (t1, r1), (t2, r2) = sorted(kinds.items(), key=lambda kv: kv[1])[:2]
        raise HeadlabError(
            f"{where}: label '{name}' mixes types: {values[r1]!r} ({t1}) at row {r1} and {values[r2]!r} ({t2}) at "
            f"row {r2}; make every value one type"
        )
    kind = next(iter(kinds), "str")
    if kind not in {"bool", "int", "float", "str"}:
        raise HeadlabError(f"{where}: label '{name}' has values of type {kind}; use bool, int, float or str labels")
    dtype = {"bool": bool, "int": np.int64, "float": np.float64, "str": str}[kind]
    return np.asarray(list(values), dtype=dtype)


def infer_schema(name: str, values: np.ndarray, kind: LabelKind = "auto") -> dict[str, Any]:
    """``{"kind": ..., "classes": [...]}`` for a label column. Floats are regression targets; bools, strings and
    ints (up to 50 distinct values) are classes, sorted. ``kind`` overrides the guess."""
    values = np.asarray(values)
    if kind == "auto":
        if values.dtype.kind == "f" or (values.dtype.kind in "iu" and len(np.unique(values)) > _MAX_AUTO_CLASSES):
            kind = "regression"
        else:
            kind = "binary" if len(np.unique(values)) <= 2 else "multiclass"
    if kind == "regression":
        if values.dtype.kind not in "iuf":
            raise HeadlabError(f"label '{name}' is not numeric and cannot be a regression target")
        return {"kind": "regression"}
    classes = np.unique(values).tolist()
    if kind == "binary" and len(classes) > 2:
        raise HeadlabError(f"label '{name}' has {len(classes)} classes, not 2; use label_kind multiclass")
    return {"kind": kind, "classes": classes}


def encode_labels(values: np.ndarray, schema: dict[str, Any]) -> np.ndarray:
    """Class ids ``int64`` (index into ``schema["classes"]``) or float targets for regression."""
    if schema["kind"] == "regression":
        return np.asarray(values, dtype=np.float64)
    classes = np.asarray(schema["classes"], dtype=np.asarray(values).dtype)
    ids = np.searchsorted(classes, values)
    ids = np.clip(ids, 0, len(classes) - 1)
    if not np.array_equal(classes[ids], values):
        raise HeadlabError("label values outside the schema's classes; rebuild the cache")
    return ids.astype(np.int64)
