"""Writing a head cache: shard by shard, atomically, resuming a partial cache of the same inputs.

See :mod:`data.cache` for the layout. Each shard is written to a temporary name and renamed, and the manifest is
rewritten (atomically) after every shard, so a killed run resumes from its last complete shard.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data.cache import FORMAT_VERSION, MANIFEST, HeadCache, read_manifest, sha256_of_array
from data.manifest import cache_key
from headlab.errors import HeadlabError
from headlab.runs import LOCK_NAME, RUN_MARKER, atomic_write, atomic_write_json


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy atomically, streaming it to disk without an in-memory copy."""
    atomic_write(path, lambda handle: np.lib.format.write_array(handle, np.ascontiguousarray(array),
                                                                  allow_pickle=False))


PARTS = "parts"
"""Subfolder of the part manifests of a data-parallel run (see :mod:`data.cache_parts`)."""


def part_manifest(file: Path) -> dict[str, Any]:
    """One rank's part manifest (see :mod:`data.cache_parts`)."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise HeadlabError(f"cannot read the part manifest {file} ({error}); delete {file.parent} and the "
                           "shards/p* files, then run the cache command again") from error


def _part_shards(path: Path, key: str) -> set[str]:
    """Shard files listed by the part manifests of cache ``key`` (kept when the writer tidies up)."""
    folder = path / PARTS
    if not folder.is_dir():
        return set()
    return {s["file"] for f in folder.glob("*.json") if (m := part_manifest(f)).get("key") == key
            for s in m["shards"]}


class CacheWriter:
    """Writes a cache shard by shard, resuming a partial cache of the same inputs.

    ``identity`` holds everything that determines the cache's contents; its hash is the cache key. ``header`` adds
    descriptive fields to the manifest (layers, n_heads, d_head, dtype, label schema, ...). Row metadata and labels
    are written by :meth:`finish`, after :meth:`add_shard` has been called once per shard, in order.
    """

    LAYOUT = ("shards", "labels", "rows", "parts")
    """The cache's own subfolders (where a killed writer's temporary files may lie)."""

    def __init__(self, path: str | Path, identity: Mapping[str, Any], header: Mapping[str, Any]):
        self.path = Path(path)
        self.key = cache_key(identity)
        existing = read_manifest(self.path) if self.path.exists() else None
        if existing is not None and existing.get("key") != self.key:
            raise HeadlabError(
                f"{self.path} holds a head cache of different inputs (model {existing['model'].get('id')!r}, "
                f"dataset {existing['dataset'].get('spec')!r}, positions {existing.get('positions')!r}); "
                "choose another --out or delete that directory"
            )
        ours = {"config.yaml", RUN_MARKER, LOCK_NAME}
        if existing is None and self.path.exists() and any(p.name not in ours for p in self.path.iterdir()):
            raise HeadlabError(f"{self.path} exists and is not a head cache; choose an empty or new --out directory")
        if existing is not None:
            self.manifest = existing
            self._drop_unlisted_shards()
        else:
            self.manifest = {
                "format_version": FORMAT_VERSION,
                "key": self.key,
                **header,
                "identity": dict(identity),
                "rows": 0,
                "complete": False,
                "shards": [],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def examples_done(self) -> int:
        """How many dataset examples the complete shards cover (resume point)."""
        shards = self.manifest["shards"]
        return shards[-1]["end_example"] if shards else 0

    def _drop_unlisted_shards(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]} | _part_shards(self.path, self.key)
        shard_dir = self.path / "shards"
        if shard_dir.exists():
            for file in shard_dir.iterdir():
                if f"shards/{file.name.replace('.rows.npy', '.npy')}" not in listed:
                    file.unlink()
        for shard in self.manifest["shards"]:
            if not (self.path / shard["file"]).exists():
                raise HeadlabError(
                    f"head cache {self.path} lists shard {shard['file']} but the file is gone; "
                    "delete the directory and run the cache command again"
                )

    def _mark(self) -> None:
        """Mark the directory as a cache run (see :func:`headlab.runs.run_directory`), so no other command writes
        into it; the cache command has already done so."""
        if not (self.path / RUN_MARKER).exists():
            atomic_write_json(self.path / RUN_MARKER, {"command": "cache"})

    def add_shard(self, activations: np.ndarray, example: np.ndarray, token: np.ndarray, end_example: int) -> None:
        """Append one shard ``[rows, layers, heads, d_head]`` covering dataset examples up to ``end_example``.

        ``example`` and ``token`` (``[rows]``) say which example and token position each row was read at.
        """
        index = len(self.manifest["shards"])
        if index == 0:
            self._mark()
        name = self.shard_name(index)
        save_npy(self.path / name.replace(".npy", ".rows.npy"), np.stack([example, token], 1).astype(np.int64))
        digest = sha256_of_array(activations)
        save_npy(self.path / name, activations)
        self.manifest["shards"].append({
            "file": name,
            "rows": int(activations.shape[0]),
            "start_example": self.examples_done,
            "end_example": int(end_example),
            "sha256": digest,
        })
        self.manifest["rows"] = int(sum(s["rows"] for s in self.manifest["shards"]))
        self.save()

    def shard_name(self, index: int) -> str:
        """The file of shard ``index``, relative to the cache folder."""
        return f"shards/{index:05d}.npy"

    def save(self) -> None:
        """Write the manifest as it stands (a data-parallel run does so before its ranks write their parts, so
        the folder is known as this cache's from the start)."""
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def append_listed(self, shards: list[dict[str, Any]]) -> None:
        """List shards already on disk (the parts of a data-parallel run, in example order) after this
        manifest's own, in one atomic manifest write."""
        for shard in shards:
            if shard["start_example"] != self.examples_done:
                raise HeadlabError(f"shard {shard['file']} starts at example {shard['start_example']}, not at "
                                   f"{self.examples_done}; delete {self.path} and run the cache command again")
            self.manifest["shards"].append(dict(shard))
        self.manifest["rows"] = int(sum(s["rows"] for s in self.manifest["shards"]))
        self.save()

    def finish(self, labels: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None,
               **fields: Any) -> HeadCache:
        """Write the per-row label columns (``labels[column][example]`` of each row) and mark the cache complete.

        ``labels`` and ``extra`` (e.g. ``group``) hold one value per dataset example.
        """
        meta = [np.load(self.path / s["file"].replace(".npy", ".rows.npy")) for s in self.manifest["shards"]]
        rows = np.concatenate(meta) if meta else np.empty((0, 2), np.int64)
        example, token = rows[:, 0], rows[:, 1]
        for name, values in {**labels, **(extra or {})}.items():
            save_npy(self.path / "labels" / f"{name}.npy", np.asarray(values)[example])
        save_npy(self.path / "rows" / "example.npy", example)
        save_npy(self.path / "rows" / "token.npy", token)
        self.manifest["extra_columns"] = list(extra or {})
        self.manifest.update(fields)
        self.manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, self.manifest)
        return HeadCache.open(self.path, verify=False)


def write_cache(
    path: str | Path,
    activations: np.ndarray | Iterable[np.ndarray],
    labels: Mapping[str, Iterable[Any]],
    *,
    label_schema: Mapping[str, Mapping[str, Any]] | None = None,
    layers: list[int] | None = None,
    model: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    positions: str = "last",
    groups: Iterable[Any] | None = None,
) -> HeadCache:
    """Write a cache from arrays already in memory (or an iterable of shards): synthetic caches for tests,
    benchmarks and activations computed elsewhere. ``labels`` maps column -> one value per row; the schema is
    inferred when not given (see :func:`data.labels.infer_schema`)."""
    from data.labels import infer_schema

    shards: Iterator[np.ndarray] = iter([activations] if isinstance(activations, np.ndarray) else activations)
    first = next(shards)
    label_arrays = {name: np.asarray(list(values)) for name, values in labels.items()}
    schema = dict(label_schema) if label_schema else {n: infer_schema(n, v) for n, v in label_arrays.items()}
    rows_hint = len(next(iter(label_arrays.values()))) if label_arrays else None
    header = {
        "model": dict(model or {"id": "in-memory"}),
        "dataset": dict(dataset or {"spec": "in-memory"}),
        "layers": layers if layers is not None else list(range(first.shape[1])),
        "n_layers": first.shape[1] if layers is None else max(layers) + 1,
        "n_heads": int(first.shape[2]),
        "d_head": int(first.shape[3]),
        "dtype": str(first.dtype),
        "positions": positions,
        "label_schema": schema,
    }
    identity = {"random": hashlib.sha256(np.random.bytes(16)).hexdigest()} if model is None else dict(model)
    writer = CacheWriter(path, identity, header)
    extra = {"group": np.asarray(list(groups))} if groups is not None else None
    done = 0
    for shard in [first, *shards]:
        n = shard.shape[0]
        writer.add_shard(shard, np.arange(done, done + n), np.full(n, -1), end_example=done + n)
        done += n
    if rows_hint is not None and done != rows_hint:
        raise HeadlabError(f"write_cache got {done} activation rows but {rows_hint} labels; pass one label per row")
    return writer.finish(label_arrays, extra)
