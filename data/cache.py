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

Writing is :mod:`data.cache_writer`: each shard is written to a temporary name and renamed, and the manifest is
rewritten (atomically) after every shard, so a killed run resumes from the last complete shard. The cache is
content addressed (:mod:`data.manifest`), and a directory holding a cache of other inputs is never written into.

Row-major shards suit both consumers: minibatches of rows (toy probing, streaming) read contiguous bytes, and the
all-heads probe reads whole shards sequentially and transposes each into head-major blocks in memory.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.manifest import manifest_problem
from headlab.errors import HeadlabError
from headlab.runs import read_json_object

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_of_array(array: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


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
        self._verified: set[int] = set()
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
        """Shard ``index`` as a read-only memory map ``[shard_rows, ...]`` (shape-checked when mapped, checksum-
        verified on first use when ``verify``).

        Mapping parses the ``.npy`` header (``np.load`` runs ``ast.literal_eval``), which CPython 3.11 cannot do
        safely from several threads at once, so a shard is only ever mapped on the main thread: code that reads
        from worker threads calls :meth:`open_all` first, and a worker that meets an unmapped shard raises.
        """
        if index not in self._maps:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    f"cache shard {index} mapped from worker thread {threading.current_thread().name}; call "
                    "ShardedArray.open_all() on the main thread before starting workers"
                )
            self._maps[index] = self._map(index)
        if self._verify and index not in self._verified:
            self._check(index)
        return self._maps[index]

    def _map(self, index: int) -> np.ndarray:
        path = self._paths[index]
        expected = (self._rows[index], *self.shape[1:])
        size = path.stat().st_size if path.exists() else -1
        if size < int(np.prod(expected)) * self.dtype.itemsize:
            raise HeadlabError(
                f"cache shard {path} is truncated or missing ({max(size, 0)} bytes for {self.dtype}{list(expected)}); "
                "delete the cache directory and run the cache command again"
            )
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, SyntaxError) as error:
            raise HeadlabError(f"cache shard {path} cannot be read ({error}); the cache is corrupt: delete it and "
                               "run the cache command again") from error
        if array.shape != expected or array.dtype != self.dtype:
            raise HeadlabError(
                f"cache shard {path} holds {array.dtype}{list(array.shape)}, expected {self.dtype}{list(expected)};"
                " the cache is corrupt: delete it and run the cache command again"
            )
        return array

    def _check(self, index: int) -> None:
        if sha256_of_array(self._maps[index]) != self._checksums[index]:
            raise HeadlabError(
                f"cache shard {self._paths[index]} fails its checksum (the file changed after it was written); "
                "delete the shard and run the same cache command again to rewrite it"
            )
        self._verified.add(index)

    def mapped(self, index: int) -> np.ndarray:
        """Shard ``index``'s memory map without checksum work (for readers whose caller verifies separately, e.g.
        on a background thread); :meth:`open_all` must have mapped it."""
        if index not in self._maps:
            return self.shard(index)
        return self._maps[index]

    def open_all(self) -> ShardedArray:
        """Map every shard now, on the calling (main) thread, without hashing: afterwards any thread may read."""
        for index in range(self.n_shards):
            if index not in self._maps:
                self._maps[index] = self._map(index)
        return self

    def shard_bounds(self, index: int) -> tuple[int, int]:
        return int(self._offsets[index]), int(self._offsets[index + 1])

    def verify(self) -> None:
        """Check every shard's checksum now. Only hashing happens here once :meth:`open_all` has run, so this may
        run on a worker thread beside readers."""
        for index in range(self.n_shards):
            if index not in self._verified:
                if index not in self._maps:
                    self.shard(index)  # maps (main thread only) and checks
                else:
                    self._check(index)

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
        problem = manifest_problem(manifest)
        if problem is not None:
            raise HeadlabError(f"head cache {path} is damaged: in {MANIFEST}, {problem}; delete the cache directory "
                               "and run the cache command again")
        if not manifest.get("complete"):
            done = sum(s["rows"] for s in manifest["shards"])
            raise HeadlabError(
                f"head cache {path} is incomplete ({len(manifest['shards'])} shards, {done} rows written); "
                "run the same cache command again to resume it"
            )
        _check_manifest(path, manifest)
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
            names = [*self.manifest.get("label_schema", {}), *self.manifest.get("extra_columns", [])]
            columns = {name: self._row_file("labels", name) for name in names}
            self._labels = pd.DataFrame(columns, index=pd.RangeIndex(self.rows))
        return self._labels

    @property
    def example_index(self) -> np.ndarray:
        """``[rows]``: the dataset example each row was read from."""
        return self._row_file("rows", "example")

    @property
    def token_index(self) -> np.ndarray:
        """``[rows]``: the token position each row was read at (-1 for the ``mean`` rule)."""
        return self._row_file("rows", "token")

    def _row_file(self, folder: str, name: str) -> np.ndarray:
        """One value per row from ``folder/name.npy``; a one-line error when it is missing, damaged or of another
        length than the activations."""
        file = self.path / folder / f"{name}.npy"
        try:
            values = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError, SyntaxError) as error:
            raise HeadlabError(f"head cache {self.path}: {folder}/{name}.npy is missing or damaged "
                               f"({type(error).__name__}); delete the cache directory and run the cache command "
                               "again") from error
        if values.shape[:1] != (self.rows,):
            count = values.shape[0] if values.ndim else 0
            raise HeadlabError(f"head cache {self.path}: {folder}/{name}.npy has {count} values for {self.rows} rows; "
                               "the cache is damaged: delete it and run the cache command again")
        return values

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


MANIFEST_KEYS = ("shards", "rows", "layers", "n_heads", "d_head", "dtype", "label_schema")


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """A complete manifest that agrees with itself and with the files beside it, else a one-line error."""
    damaged = f"head cache {path} is damaged"
    fix = "delete the cache directory and run the cache command again"
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise HeadlabError(f"{damaged}: {MANIFEST} lacks {', '.join(missing)}; {fix}")
    try:
        listed = sum(int(s["rows"]) for s in manifest["shards"])
        files = [path / s["file"] for s in manifest["shards"]]
        np.dtype(manifest["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        raise HeadlabError(f"{damaged}: its shard list or dtype is unreadable ({error}); {fix}") from error
    if listed != manifest["rows"]:
        raise HeadlabError(f"{damaged}: {MANIFEST} says {manifest['rows']} rows but its shards hold {listed}; {fix}")
    for file in files:
        if not file.exists():
            raise HeadlabError(f"head cache {path} is missing shard {file.name}; run the cache command again")


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    return read_json_object(file, "delete the cache directory and rebuild it")
