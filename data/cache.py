"""The head cache: every head's output for every row, on disk, written in atomic shards and read lazily.

Layout of a cache directory::

    manifest.json          what was cached and how (model, layers, heads, d_head, positions rule, dtype, rows,
                           dataset fingerprint, label schema, shard list with sha256 checksums); ``complete`` is
                           true once every shard is written
    labels/<column>.npy    one entry per row for every label column (and ``group`` when the dataset has groups)
    rows/example.npy       the dataset example each row came from
    rows/token.npy         the token position each row was read at (-1 for ``mean``)
    shards/00000.npy ...   activations ``[rows, layers, heads, d_head]``, row-major, float16 by default
    shards/00000.rows.npy  ``[rows, 2]``: example and token index of each row of that shard

Each shard is written to a temporary name and renamed, and the manifest is rewritten (atomically) after every
shard, so a killed run resumes from the last complete shard. The cache is content addressed: its ``key`` hashes
everything that determines its contents (model weights fingerprint, dataset fingerprint, layers, positions rule,
dtype, max length), and a directory holding a cache of other inputs is never written into.

Row-major shards suit both consumers: minibatches of rows (toy probing, streaming) read contiguous bytes, and the
all-heads probe reads whole shards sequentially and transposes each into head-major blocks in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from headlab.errors import HeadlabError
from headlab.runs import atomic_write, atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_of_array(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as .npy atomically, streaming it to disk without an in-memory copy."""
    atomic_write(path, lambda handle: np.lib.format.write_array(handle, np.ascontiguousarray(array),
                                                                  allow_pickle=False))


class ShardedArray:
    """A read-only, lazily read array ``[rows, ...]`` made of memory-mapped shards concatenated along axis 0.

    Supports ``len``, ``shape``, ``dtype``, ``np.asarray`` and numpy indexing whose first index is an int, a slice
    or an integer/boolean array (``a[10:20]``, ``a[:, 3, 5]``, ``a[[1, 7, 9]]``). Only the shards a read touches
    are mapped, and each shard's checksum is verified the first time it is touched (``verify=True``).
    """

    def __init__(self, paths: list[Path], rows: list[int], row_shape: tuple[int, ...], dtype: np.dtype,
                 checksums: list[str] | None = None, verify: bool = True):
        self._paths = paths
        self._rows = rows
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._checksums = checksums
        self._verify = verify and checksums is not None
        self._maps: dict[int, np.ndarray] = {}
        self.shape = (int(self._offsets[-1]), *row_shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def n_shards(self) -> int:
        return len(self._paths)

    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memory map ``[shard_rows, ...]`` (verified on first use)."""
        if index not in self._maps:
            path = self._paths[index]
            array = np.load(path, mmap_mode="r")
            expected = (self._rows[index], *self.shape[1:])
            if array.shape != expected or array.dtype != self.dtype:
                raise HeadlabError(
                    f"cache shard {path} holds {array.dtype}{list(array.shape)}, expected {self.dtype}{list(expected)};"
                    " the cache is corrupt: delete it and run the cache command again"
                )
            if self._verify and sha256_of_array(array) != self._checksums[index]:
                raise HeadlabError(
                    f"cache shard {path} fails its checksum (the file changed after it was written); "
                    "delete the shard and run the same cache command again to rewrite it"
                )
            self._maps[index] = array
        return self._maps[index]

    def shard_bounds(self, index: int) -> tuple[int, int]:
        return int(self._offsets[index]), int(self._offsets[index + 1])

    def verify(self) -> None:
        for index in range(self.n_shards):
            self.shard(index)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            row = int(first) + n if first < 0 else int(first)
            if not 0 <= row < n:
                raise IndexError(f"row {first} out of range for {n} rows")
            index = int(np.searchsorted(self._offsets, row, side="right") - 1)
            return np.asarray(self.shard(index)[(row - self._offsets[index], *rest)])
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            if step == 1:
                pieces = []
                for index in range(self.n_shards):
                    lo, hi = self.shard_bounds(index)
                    a, b = max(start, lo), min(stop, hi)
                    if a < b:
                        pieces.append(np.asarray(self.shard(index)[(slice(a - lo, b - lo), *rest)]))
                if not pieces:
                    return np.empty((0, *np.empty(self.shape[1:], self.dtype)[rest].shape), self.dtype)
                return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)
            first = np.arange(start, stop, step)
        rows = np.asarray(first)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean row index has shape {rows.shape}, expected ({n},)")
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + n, rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        probe = np.empty((1, *self.shape[1:]), self.dtype)[(slice(None), *rest)]
        out = np.empty((rows.size, *probe.shape[1:]), self.dtype)
        for index in np.unique(shard_of):
            where = np.flatnonzero(shard_of == index)
            local = rows[where] - self._offsets[index]
            out[where] = self.shard(int(index))[(local, *rest)]
        return out

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={self.n_shards})"


class HeadCache:
    """A head cache on disk, opened read-only.

    >>> c = HeadCache.open("runs/cache/gpt2-capitals")
    >>> c.activations.shape           # [rows, layers, heads, d_head], read lazily
    >>> c.labels                      # DataFrame, one row per row of activations
    >>> c.head(5, 1)                  # [rows, d_head] for layer 5 (index into manifest["layers"]), head 1
    """

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = True):
        self.path = path
        self.manifest = manifest
        shards = manifest["shards"]
        self.activations = ShardedArray(
            [path / s["file"] for s in shards],
            [s["rows"] for s in shards],
            (len(manifest["layers"]), manifest["n_heads"], manifest["d_head"]),
            np.dtype(manifest["dtype"]),
            [s["sha256"] for s in shards],
            verify=verify,
        )
        self._labels: pd.DataFrame | None = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> HeadCache:
        """Open the cache in ``path``. Fails with a one-line error when it is missing, incomplete or damaged."""
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise HeadlabError(f"{path} is not a head cache (no {MANIFEST}); create one with `python train.py cache`")
        if not manifest.get("complete"):
            done = sum(s["rows"] for s in manifest["shards"])
            raise HeadlabError(
                f"head cache {path} is incomplete ({len(manifest['shards'])} shards, {done} rows written); "
                "run the same cache command again to resume it"
            )
        for shard in manifest["shards"]:
            file = path / shard["file"]
            if not file.exists():
                raise HeadlabError(f"head cache {path} is missing shard {shard['file']}; run the cache command again")
        return cls(path, manifest, verify=verify)

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def layers(self) -> list[int]:
        """The model layer index of each entry along the activations' layer axis."""
        return list(self.manifest["layers"])

    @property
    def n_heads(self) -> int:
        return int(self.manifest["n_heads"])

    @property
    def d_head(self) -> int:
        return int(self.manifest["d_head"])

    @property
    def label_schema(self) -> dict[str, dict[str, Any]]:
        """``{column: {"kind": "binary"|"multiclass"|"regression", "classes": [...]}}``."""
        return dict(self.manifest.get("label_schema", {}))

    @property
    def labels(self) -> pd.DataFrame:
        """One row per row of activations: every label column, plus ``group`` when the dataset had groups."""
        if self._labels is None:
            columns = {}
            for name in [*self.manifest.get("label_schema", {}), *self.manifest.get("extra_columns", [])]:
                columns[name] = np.load(self.path / "labels" / f"{name}.npy", allow_pickle=False)
            self._labels = pd.DataFrame(columns, index=pd.RangeIndex(self.rows))
        return self._labels

    @property
    def example_index(self) -> np.ndarray:
        """``[rows]``: the dataset example each row was read from."""
        return np.load(self.path / "rows" / "example.npy")

    @property
    def token_index(self) -> np.ndarray:
        """``[rows]``: the token position each row was read at (-1 for the ``mean`` rule)."""
        return np.load(self.path / "rows" / "token.npy")

    def head(self, layer: int, head: int) -> np.ndarray:
        """``[rows, d_head]`` for one head; ``layer`` indexes the cached layers (``self.layers``)."""
        return self.activations[:, layer, head]

    def verify(self) -> None:
        """Check every shard's checksum now (otherwise each is checked when first read)."""
        self.activations.verify()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"HeadCache({str(self.path)!r}, model={m['model'].get('id')!r}, rows={self.rows}, "
                f"layers={len(self.layers)}, heads={self.n_heads}, d_head={self.d_head}, dtype={m['dtype']})")


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise HeadlabError(f"{file} is not valid JSON ({error}); delete the cache directory and rebuild it") from error


def cache_key(identity: Mapping[str, Any]) -> str:
    """Content address of a cache: sha256 of the canonical JSON of everything that determines its contents."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class CacheWriter:
    """Writes a cache shard by shard, resuming a partial cache of the same inputs.

    ``identity`` holds everything that determines the cache's contents; its hash is the cache key. ``header`` adds
    descriptive fields to the manifest (layers, n_heads, d_head, dtype, label schema, ...). Row metadata and labels
    are written by :meth:`finish`, after :meth:`add_shard` has been called once per shard, in order.
    """

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
        if existing is None and self.path.exists() and any(p.name != "config.yaml" for p in self.path.iterdir()):
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
        listed = {s["file"] for s in self.manifest["shards"]}
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

    def add_shard(self, activations: np.ndarray, example: np.ndarray, token: np.ndarray, end_example: int) -> None:
        """Append one shard ``[rows, layers, heads, d_head]`` covering dataset examples up to ``end_example``.

        ``example`` and ``token`` (``[rows]``) say which example and token position each row was read at.
        """
        index = len(self.manifest["shards"])
        name = f"shards/{index:05d}.npy"
        _save_npy(self.path / f"shards/{index:05d}.rows.npy", np.stack([example, token], 1).astype(np.int64))
        digest = sha256_of_array(activations)
        _save_npy(self.path / name, activations)
        self.manifest["shards"].append({
            "file": name,
            "rows": int(activations.shape[0]),
            "start_example": self.examples_done,
            "end_example": int(end_example),
            "sha256": digest,
        })
        self.manifest["rows"] = int(sum(s["rows"] for s in self.manifest["shards"]))
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def finish(self, labels: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None,
               **fields: Any) -> HeadCache:
        """Write the per-row label columns (``labels[column][example]`` of each row) and mark the cache complete.

        ``labels`` and ``extra`` (e.g. ``group``) hold one value per dataset example.
        """
        meta = [np.load(self.path / s["file"].replace(".npy", ".rows.npy")) for s in self.manifest["shards"]]
        rows = np.concatenate(meta) if meta else np.empty((0, 2), np.int64)
        example, token = rows[:, 0], rows[:, 1]
        for name, values in {**labels, **(extra or {})}.items():
            _save_npy(self.path / "labels" / f"{name}.npy", np.asarray(values)[example])
        _save_npy(self.path / "rows" / "example.npy", example)
        _save_npy(self.path / "rows" / "token.npy", token)
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
