"""Labelled text datasets: JSONL/JSON/CSV files, Hugging Face ``datasets``, and headlab's built-in sets.

A dataset spec is one of:
  ``builtin:capitals`` | ``builtin:sentiment`` | ``builtin:ioi`` (or the bare name) — see :mod:`data.builtin`;
  ``path/to/file.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` — one example per record;
  ``hf:NAME`` or ``hf:NAME:CONFIG`` — a Hugging Face hub dataset (online), split chosen with ``split``;
  a directory written by ``datasets.Dataset.save_to_disk``.

Fields are configurable: ``text_field`` (default ``text``), ``label_field`` (one name or several; the first is
the primary label), ``mark_field`` (default ``mark``: the character offset, or list of offsets, of the token(s) to
read with ``--positions marked``) and ``group_field`` (e.g. a question id, so grouped splits keep its rows
together).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.builtin import BUILTIN_DATASETS, load_builtin
from data.labels import LabelKind, infer_schema, label_array
from headlab.errors import HeadlabError


@dataclass(frozen=True)
class DatasetConfig:
    """Which labelled dataset to read and which of its fields mean what (shared by ``cache`` and the steering
    check, which rebuilds the same examples from the cache's manifest)."""

    spec: str
    """a .jsonl/.json/.csv/.tsv file, ``hf:NAME[:CONFIG]``, a save_to_disk directory, or a built-in set"""
    text_field: str = "text"
    """field holding the text"""
    label_field: str | list[str] = "label"
    """field(s) holding labels; the first is the primary label"""
    mark_field: str = "mark"
    """field holding the character offset(s) of marked tokens (used when present)"""
    group_field: str | None = "group"
    """field grouping examples for grouped splits (used when present)"""
    label_kind: LabelKind = "auto"
    """``auto`` infers binary / multiclass / regression from the label values"""
    split: str = "train"
    """split to read for Hugging Face datasets"""
    limit: int | None = None
    """read only the first ``limit`` examples"""

    @property
    def label_fields(self) -> list[str]:
        return [self.label_field] if isinstance(self.label_field, str) else list(self.label_field)

    def fields(self) -> dict[str, Any]:
        """The field options as the cache's manifest and content address record them."""
        return {"text_field": self.text_field, "label_field": self.label_fields, "mark_field": self.mark_field,
                "group_field": self.group_field, "split": self.split, "limit": self.limit}

    @classmethod
    def from_manifest(cls, record: dict[str, Any]) -> DatasetConfig:
        """The config a cache was built from, from its manifest's ``dataset`` entry."""
        known = {f for f in cls.__dataclass_fields__ if f != "spec"}
        return cls(record["spec"], **{k: v for k, v in record.items() if k in known})


@dataclass
class LabelledDataset:
    """Texts with one or more label columns, optional marked character offsets and optional groups."""

    spec: str
    texts: list[str]
    labels: dict[str, np.ndarray]  # column -> [examples]
    schema: dict[str, dict[str, Any]]
    marks: list[list[int]] | None = None  # per example: character offsets of the tokens to read
    groups: np.ndarray | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """sha256 of the texts, labels, marks and groups: equal datasets give equal caches."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.texts).encode())
        for name in sorted(self.labels):
            digest.update(name.encode())
            digest.update(json.dumps(self.labels[name].tolist()).encode())
        digest.update(json.dumps(self.marks).encode())
        digest.update(json.dumps(None if self.groups is None else self.groups.tolist()).encode())
        return digest.hexdigest()


def _read_records(spec: str, split: str) -> list[dict[str, Any]]:
    name = spec.removeprefix("builtin:")
    if spec.startswith("builtin:") or (name in BUILTIN_DATASETS and not Path(spec).exists()):
        if name not in BUILTIN_DATASETS:
            raise HeadlabError(f"unknown built-in dataset '{name}'; choose one of: {', '.join(BUILTIN_DATASETS)}")
        return load_builtin(name)
    if spec.startswith("hf:"):
        return _read_hub(spec[3:], split)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_saved_hf(path, split)
    if not path.exists():
        raise HeadlabError(
            f"dataset file {spec} does not exist; pass a .jsonl/.json/.csv file, hf:NAME, or one of the built-in "
            f"sets: {', '.join(BUILTIN_DATASETS)}"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open() as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        elif suffix == ".json":
            records = json.loads(path.read_text())
            if isinstance(records, dict):
                records = records.get("data", records.get("examples", []))
        elif suffix in {".csv", ".tsv"}:
            with path.open(newline="") as handle:
                records = [_parse_csv_row(row) for row in csv.DictReader(handle, delimiter="," if suffix == ".csv"
                                                                          else "\t")]
        else:
            raise HeadlabError(f"dataset file {spec} has an unknown extension; use .jsonl, .json, .csv or .tsv")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise HeadlabError(f"cannot parse dataset file {spec}: {error}") from error
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise HeadlabError(f"dataset file {spec} must hold one JSON object per example")
    return records


def _parse_csv_row(row: dict[str, str]) -> dict[str, Any]:
    """CSV cells are strings: read integers, floats and true/false as such, so label types match JSONL."""
    parsed: dict[str, Any] = {}
    for key, value in row.items():
        text = (value or "").strip()
        if text.lower() in {"true", "false"}:
            parsed[key] = text.lower() == "true"
            continue
        for cast in (int, float):
            try:
                parsed[key] = cast(text)
                break
            except ValueError:
                continue
        else:
            parsed[key] = value
    return parsed


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise HeadlabError("hf: datasets need the `datasets` package: pip install 'headlab[datasets]'") from error
    repo, _, config = name.partition(":")
    try:
        return list(datasets.load_dataset(repo, config or None, split=split))
    except Exception as error:  # datasets raises many types for offline / unknown names
        raise HeadlabError(
            f"cannot load hub dataset '{name}' split '{split}' ({type(error).__name__}); check the name and split, "
            "or save it with save_to_disk / as JSONL and pass that path (the hub is unreachable offline)"
        ) from error


def _read_saved_hf(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise HeadlabError(f"{path} is a directory; reading it needs `pip install 'headlab[datasets]'`") from error
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise HeadlabError(f"{path} is a directory but not a saved Hugging Face dataset; pass a file") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise HeadlabError(f"{path} has splits {list(loaded)}, not '{split}'; pass --split")
        loaded = loaded[split]
    return list(loaded)


def load_dataset(config: DatasetConfig | str) -> LabelledDataset:
    """Read and check a labelled dataset (a spec alone reads it with the default fields). ``group_field`` and
    ``mark_field`` are used when present."""
    if isinstance(config, str):
        config = DatasetConfig(config)
    spec, text_field, mark_field, group_field = config.spec, config.text_field, config.mark_field, config.group_field
    if config.limit is not None and config.limit < 1:
        raise HeadlabError(f"--limit {config.limit} must be a positive number of examples (or leave it unset)")
    records = _read_records(spec, config.split)
    if config.limit is not None:
        records = records[: config.limit]
    if not records:
        raise HeadlabError(f"dataset {spec} is empty; it needs at least one example")
    label_fields = config.label_fields
    available = sorted(records[0])
    for needed, option in [(text_field, "--text_field"), *[(f, "--label_field") for f in label_fields]]:
        missing = next((i for i, r in enumerate(records) if needed not in r), None)
        if missing is not None:
            raise HeadlabError(
                f"dataset {spec} has no field '{needed}' (example {missing}); pass {option} with one of: "
                f"{', '.join(available)}"
            )
    texts = []
    for i, record in enumerate(records):
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise HeadlabError(f"dataset {spec}: example {i} has no text in '{text_field}' (got {text!r}); give "
                               "every example a non-empty text or drop it")
        texts.append(text)
    labels = {name: label_array(name, [r[name] for r in records], f"dataset {spec}") for name in label_fields}
    schema = {name: infer_schema(name, values, config.label_kind) for name, values in labels.items()}
    marks = None
    if any(mark_field in r for r in records):
        marks = []
        for i, record in enumerate(records):
            mark = record.get(mark_field)
            offsets = mark if isinstance(mark, list) else [mark]
            if mark is None or not offsets or not all(
                    isinstance(o, int) and not isinstance(o, bool) and 0 <= o < len(texts[i]) for o in offsets):
                raise HeadlabError(
                    f"dataset {spec}: example {i} has '{mark_field}'={mark!r}; give a character offset (or list of "
                    f"offsets) inside its text (0..{len(texts[i]) - 1})"
                )
            marks.append(offsets)
    groups = None
    if group_field and any(group_field in r for r in records):
        if not all(group_field in r for r in records):
            raise HeadlabError(f"dataset {spec}: some examples lack '{group_field}'; give every example a group")
        groups = np.asarray([str(r[group_field]) for r in records])
    return LabelledDataset(spec, texts, labels, schema, marks, groups, fields=config.fields())
