"""Probe data from a head cache: checked labels, seeded (grouped) splits, the fits to run, and two readers.

* :class:`HeadMajor` reads blocks of heads ``[block, rows, d_head]`` straight from the memory-mapped shards, rows
  sorted by split part, so every head's training rows are one contiguous range: what the per-head-block Newton
  solver and the mass-mean probe need.
* :class:`ProbeDataModule` streams minibatches of rows ``[batch, heads, d_head]`` from the cache (memory-mapped,
  bounded memory) for the Lightning module.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from data import HeadCache, encode_labels
from headlab.errors import HeadlabError
from probes.config import ControlConfig, ProbeConfig, SplitConfig

Kind = Literal["binary", "multiclass", "regression"]


@dataclass
class Fit:
    """One probe per head to train: its targets and the split parts it trains on."""

    name: str  # "task", "control", "fold0", ...
    target: np.ndarray  # [rows] class ids (int64) or float targets
    train_parts: tuple[int, ...]


@dataclass
class ProbeProblem:
    """Everything a backend needs besides the activations."""

    kind: Kind
    classes: list[Any]  # class names ([] for regression)
    label: str
    y: np.ndarray  # [rows] encoded task labels
    parts: np.ndarray  # [rows] split part of each row
    part_names: list[str]  # e.g. ["train", "val", "test"] or ["fold0", ..., "test"]
    fits: list[Fit]
    sample_weight: np.ndarray  # [rows] class weights (ones without class weighting)
    groups: np.ndarray | None  # [rows] group ids, for grouped bootstrap
    test_part: int
    rank_on: list[tuple[int, int]]  # (fit, part) pairs whose scores rank the heads: (task, val) or (fold f, fold f)
    report_fit: int  # the fit scored on the test part
    control_fit: int | None
    mass_mean_parts: tuple[int, ...]  # rows the mass-mean directions are computed on

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.kind != "regression" else 1

    @property
    def outputs(self) -> int:
        """Score columns per probe: 1 for binary (a logit) and regression, n_classes for multiclass."""
        return self.n_classes if self.kind == "multiclass" else 1

    def train_mask(self, fit: Fit) -> np.ndarray:
        return np.isin(self.parts, fit.train_parts)


def check_label(cache: HeadCache, label: str | None) -> str:
    """The label column to probe; one-line errors for a cache without labels or a missing column."""
    schema = cache.label_schema
    if not schema:
        raise HeadlabError(f"head cache {cache.path} has no label columns; rebuild it from a labelled dataset")
    if label is None:
        if len(schema) > 1:
            raise HeadlabError(f"head cache {cache.path} has labels {sorted(schema)}; choose one with --probe.label")
        return next(iter(schema))
    if label not in schema:
        raise HeadlabError(f"head cache {cache.path} has no label column '{label}'; use one of: {sorted(schema)}")
    return label


def _units(n: int, groups: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled split units (groups or rows): ``unit_of_row [rows]`` and the units in shuffled order."""
    if groups is None:
        unit_of_row = np.arange(n)
    else:
        _, unit_of_row = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(int(unit_of_row.max()) + 1)
    return unit_of_row, order


def assign_parts(n: int, groups: np.ndarray | None, split: SplitConfig) -> tuple[np.ndarray, list[str]]:
    """``parts [rows]`` and part names. Units (groups, or rows) are shuffled by ``split.seed`` and cut by
    cumulative row count: test first, then validation (holdout) or k folds, the rest train."""
    unit_of_row, order = _units(n, groups, split.seed)
    sizes = np.bincount(unit_of_row)[order]
    before = (np.cumsum(sizes) - sizes) / n  # share of rows before each unit, in shuffled order
    if split.folds:
        rest = np.clip((before - split.test_fraction) / (1 - split.test_fraction), 0, 1 - 1e-12)
        part_of_unit = np.where(before < split.test_fraction, split.folds, (rest * split.folds).astype(int))
        names = [f"fold{f}" for f in range(split.folds)] + ["test"]
    else:
        if split.val_fraction + split.test_fraction >= 1:
            raise HeadlabError("--split.val_fraction + --split.test_fraction must leave rows to train on")
        part_of_unit = np.select([before < split.test_fraction,
                                  before < split.test_fraction + split.val_fraction], [2, 1], 0)
        names = ["train", "val", "test"]
    parts = np.empty(len(order), np.int64)
    parts[order] = part_of_unit
    parts = parts[unit_of_row]
    for p, name in enumerate(names):
        if not (parts == p).any():
            raise HeadlabError(
                f"split part '{name}' is empty ({n} rows{'' if groups is None else ', grouped'}); "
                "use more rows or groups, or other fractions"
            )
    return parts, names


def control_labels(y: np.ndarray, types: np.ndarray, train: np.ndarray, seed: int) -> np.ndarray:
    """Control task (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks"): every input type
    gets one label drawn at random from the empirical training label distribution, so a probe can only score
    above chance on it by memorising types. ``types [rows]`` identifies each row's input type."""
    _, type_of_row = np.unique(types, return_inverse=True)
    rng = np.random.default_rng(seed + 7919)
    draw = rng.choice(y[train], size=int(type_of_row.max()) + 1, replace=True)
    return draw[type_of_row]


def input_types(cache: HeadCache) -> np.ndarray:
    """``[rows]``: the control task's input type of each row when the cache has no group column. An example is a
    type, and examples whose rows no probe can tell apart (equal activations in every head of the last cached
    layer, in the same order: the same text twice) are one type, so repeated inputs share a control label as
    Hewitt & Liang's repeated words do."""
    import hashlib

    last = np.ascontiguousarray(cache.activations[:, -1])  # [rows, heads, d_head]
    digests = [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in last]
    example = cache.example_index
    frame = pd.DataFrame({"example": example, "digest": digests})
    signature = frame.groupby("example", sort=False)["digest"].agg("|".join)  # an example's rows, in row order
    _, type_of_example = np.unique(signature.to_numpy(), return_inverse=True)
    return pd.Series(type_of_example, index=signature.index).loc[example].to_numpy()


def build_problem(cache: HeadCache, probe: ProbeConfig, split: SplitConfig, control: ControlConfig) -> ProbeProblem:
    """Check the labels of ``cache`` and lay out the splits and fits. One-line errors for every bad input."""
    label = check_label(cache, probe.label)
    schema = cache.label_schema[label]
    kind: Kind = schema["kind"]
    frame = cache.labels
    y = encode_labels(frame[label].to_numpy(), schema)
    classes = list(schema.get("classes", []))
    if kind == "regression":
        if not np.isfinite(y).all():
            raise HeadlabError(f"label '{label}' has non-finite values; fix the dataset's targets")
    else:
        present = np.unique(y)
        if len(present) < 2:
            raise HeadlabError(
                f"label '{label}' has one class only ({classes[int(present[0])]!r} in all {len(y)} rows); "
                "a probe needs at least two classes"
            )
    groups = None
    if split.group_column is not None and split.group_column in frame.columns:
        groups = frame[split.group_column].to_numpy()
    parts, names = assign_parts(len(y), groups, split)
    test = len(names) - 1
    fits: list[Fit] = []
    if split.folds:
        folds = tuple(range(split.folds))
        fits += [Fit(f"fold{f}", y, tuple(p for p in folds if p != f)) for f in folds]
        fits.append(Fit("task", y, folds))
        rank_on, report_fit, train_parts = [(f, f) for f in folds], split.folds, folds
    else:
        fits.append(Fit("task", y, (0,)))
        rank_on, report_fit, train_parts = [(0, 1)], 0, (0,)
    train = np.isin(parts, train_parts)
    if kind != "regression":
        for fit in fits:
            seen = np.unique(y[np.isin(parts, fit.train_parts)])
            if len(seen) < 2:
                raise HeadlabError(
                    f"the training rows of fit '{fit.name}' hold one class only ({classes[int(seen[0])]!r}); "
                    "use another --split.seed, fewer folds or more data"
                )
    control_fit = None
    if control.control_task:
        column = control.control_column
        if column is not None and column not in frame.columns:
            raise HeadlabError(f"--control.control_column '{column}' is not in the cache; use one of: "
                               f"{sorted(frame.columns)}")
        if column is None:
            types = groups if groups is not None else input_types(cache)
        else:
            types = frame[column].to_numpy()
        fits.append(Fit("control", control_labels(y, types, train, split.seed), train_parts))
        control_fit = len(fits) - 1
    weight = np.ones(len(y), np.float64)
    if probe.class_weight == "balanced":
        if kind == "regression":
            raise HeadlabError("--probe.class_weight balanced needs a classification label, not regression")
        counts = np.bincount(y[train], minlength=len(classes)).astype(np.float64)
        weight = train.sum() / (len(classes) * np.maximum(counts, 1))[y]
    return ProbeProblem(kind, classes, label, y, parts, names, fits, weight, groups, test, rank_on, report_fit,
                        control_fit, train_parts)


@contextmanager
def no_hugepage_advice() -> Iterator[None]:
    """Turn off numpy's ``madvise(MADV_HUGEPAGE)`` for new arrays inside the block (restored on exit).

    On the 2-core VMs we measured, first-touching 1.5 GB of fresh huge pages took ~5 s against ~1 s for normal
    pages, so the probe keeps its large buffers few, reused, and on normal pages.
    """
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _set_madvise_hugepage
    previous = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(previous)


class HeadMajor:
    """Blocks of heads, head-major, read from the cache's memory-mapped shards.

    ``block(h0, h1)`` returns heads ``h0:h1`` as ``[h1 - h0, rows, d_head]`` float32 with rows sorted by split part
    (``order[i]`` is the cache row at sorted position i), so part p is the contiguous row range ``bounds[p]``. Each
    call reads only those heads' bytes of every shard (rows are row-major, so a block is one strided pass), into
    buffers reused between calls. Blocks of consecutive heads over the whole cache read every byte once.
    """

    def __init__(self, activations, parts: np.ndarray, block_size: int):
        self.activations = activations.open_all()  # ShardedArray [rows, layers, heads, d_head], mapped here
        n, n_layers, n_heads, d = activations.shape
        self.n_heads, self.d_head, self.rows, self.block_size = n_layers * n_heads, d, n, block_size
        self.order = np.argsort(parts, kind="stable")  # [rows]
        position = np.empty(n, np.int64)
        position[self.order] = np.arange(n)
        self._position = position
        counts = np.bincount(parts)
        starts = np.concatenate([[0], np.cumsum(counts)])
        self.bounds = [(int(starts[p]), int(starts[p + 1])) for p in range(len(counts))]
        self._position = torch.from_numpy(position)
        self._buffers = threading.local()  # reused per thread: blocks may be read by several workers

    def block(self, h0: int, h1: int) -> np.ndarray:
        """``[h1 - h0, rows, d_head]`` float32 (a view of a reused buffer: copy it to keep it).

        The float16 -> float32 conversion and the row scatter run in torch (vectorised, multi-threaded), an order
        of magnitude faster than numpy's half-precision casts on the CPUs we measured.
        """
        acts, b = self.activations, h1 - h0
        if not hasattr(self._buffers, "rows"):
            dtype = torch.from_numpy(np.empty(0, acts.dtype)).dtype
            self._buffers.rows = torch.empty((self.rows, self.block_size, self.d_head), dtype=dtype)
            self._buffers.out = torch.empty((self.block_size, self.rows, self.d_head))  # [block, rows, d_head]
        rows = self._buffers.rows[:, :b]  # [rows, b, d_head] in the cache dtype, sorted rows
        for index in range(acts.n_shards):
            lo, hi = acts.shard_bounds(index)
            shard = acts.mapped(index).reshape(hi - lo, -1, self.d_head)[:, h0:h1]  # [shard_rows, b, d]
            with warnings.catch_warnings():  # read-only memmap: torch warns that it is not writable; we only read
                warnings.simplefilter("ignore", UserWarning)
                rows.index_copy_(0, self._position[lo:hi], torch.from_numpy(shard))
        out = self._buffers.out[:b]
        out.copy_(rows.permute(1, 0, 2))  # one vectorised pass: transpose and convert to float32
        return out.numpy()


STD_FLOOR = 1e-2
"""Standardisation floor, relative: a feature's scale is at least ``STD_FLOOR`` times the median scale of its
head's features, and at least :data:`STD_FLOOR_ABSOLUTE`."""
STD_FLOOR_ABSOLUTE = 1e-5


def standardisation_scale(std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``std [..., d_head]`` -> ``(scale [..., d_head], degenerate [..., d_head] bool)``.

    ``scale = max(std, floor)`` with ``floor = max(STD_FLOOR * median_j std_j, STD_FLOOR_ABSOLUTE)`` per head.
    A near-constant dimension (float16 quantisation of a tiny output, a dead unit, a constant) would otherwise be
    divided by its tiny std: standardised, it becomes huge, its L2 penalty vanishes, the probe can spend any
    weight on quantisation noise and the Newton system turns singular. Floored, using it costs what using a
    typical dimension costs. ``degenerate`` marks the dimensions the floor lifted.
    """
    std = np.asarray(std, dtype=np.float64)
    floor = np.maximum(STD_FLOOR * np.median(std, axis=-1, keepdims=True), STD_FLOOR_ABSOLUTE)
    return np.maximum(std, floor), std < floor


def check_finite(sums: np.ndarray, layers: list[int], n_heads: int, first_head: int = 0) -> None:
    """Raise for the first head whose column sums (any reduction that NaN/inf propagates through) are not finite."""
    bad = np.flatnonzero(~np.isfinite(sums.reshape(sums.shape[0], -1)).all(axis=1))
    if bad.size:
        flat = first_head + int(bad[0])
        layer, head = divmod(flat, n_heads)
        raise HeadlabError(
            f"the cache holds NaN or inf activations (first at layer {layers[layer]}, head {head}); "
            "recapture in float32 or drop the examples that overflow"
        )


class _RowBatches(Dataset):
    """Minibatches of cache rows: item i is ``(x [batch, heads, d_head] float32, row ids [batch])``."""

    def __init__(self, cache: HeadCache, rows: np.ndarray, batch_size: int, shuffle: bool, seed: int):
        self.cache, self.rows, self.batch_size, self.shuffle, self.seed = cache, rows, batch_size, shuffle, seed
        self.epoch = 0

    def __len__(self) -> int:
        return max(1, -(-len(self.rows) // self.batch_size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows
        if self.shuffle:
            rows = rows[np.random.default_rng((self.seed, self.epoch)).permutation(len(rows))]
        chosen = np.sort(rows[index * self.batch_size:(index + 1) * self.batch_size])
        x = self.cache.activations[chosen]  # [batch, layers, heads, d_head]
        x = torch.from_numpy(np.ascontiguousarray(x.reshape(len(chosen), -1, x.shape[-1]), np.float32))
        return x, torch.from_numpy(chosen)


class ProbeDataModule(pl.LightningDataModule):
    """Streams rows of a head cache: ``train`` rows for fitting, ``val`` rows for early stopping, and every row
    for prediction. Batches are ``(x [batch, heads, d_head], row ids [batch])``; targets and masks live in the
    module, indexed by row id, so one pass serves every fit."""

    def __init__(self, cache: HeadCache, train_rows: np.ndarray, val_rows: np.ndarray | None, batch_size: int,
                 seed: int = 0):
        super().__init__()
        self.cache = cache
        self.train_set = _RowBatches(cache, np.asarray(train_rows), batch_size, True, seed)
        self.val_set = None if val_rows is None or not len(val_rows) else _RowBatches(
            cache, np.asarray(val_rows), batch_size, False, seed)
        self.all_set = _RowBatches(cache, np.arange(cache.rows), batch_size, False, seed)

    def train_dataloader(self) -> DataLoader:
        self.train_set.epoch += 1
        return DataLoader(self.train_set, batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else DataLoader(self.val_set, batch_size=None, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.all_set, batch_size=None, shuffle=False)

    def moments(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head feature mean and std over ``rows`` in one streaming pass: two ``[heads, d_head]`` tensors."""
        total = total_sq = None
        for start in range(0, len(rows), 1024):
            x = self.cache.activations[np.sort(rows[start:start + 1024])].astype(np.float64)
            x = x.reshape(len(x), -1, x.shape[-1])
            total = x.sum(0) if total is None else total + x.sum(0)
            total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        mean = total / len(rows)
        std = np.sqrt(np.maximum(total_sq / len(rows) - mean * mean, 0))
        scale, _ = standardisation_scale(std)
        return torch.from_numpy(mean).float(), torch.from_numpy(scale).float()


def describe(problem: ProbeProblem) -> dict[str, Any]:
    """Row counts per part and the fits, for summary.json."""
    return {
        "kind": problem.kind,
        "label": problem.label,
        "classes": problem.classes,
        "rows": {name: int((problem.parts == p).sum()) for p, name in enumerate(problem.part_names)},
        "grouped": problem.groups is not None,
        "fits": [f.name for f in problem.fits],
    }
