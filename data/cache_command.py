"""``python train.py cache``: run a Hugging Face model over a labelled dataset and cache every head's output.

:func:`cache` is the command (its options are the CLI); :func:`describe` builds the cache's typed description
(:class:`data.manifest.CacheSpec`) from the model, the capture settings and the dataset, and :func:`write_shards`
is the shard-writing loop, which overlaps forward passes with disk writes and resumes where a killed run stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data.cache import HeadCache
from data.cache_parts import discard_other_parts
from data.cache_writer import CacheWriter
from data.capture import HeadCapture, Positions
from data.datasets import DatasetConfig, LabelledDataset, load_dataset
from data.labels import LabelKind
from data.manifest import CacheSpec, cache_key
from headlab.errors import HeadlabError, at_least, require
from headlab.models import DType, LoadedModel, context_length, load_model, weights_fingerprint
from headlab.placement import Placement
from headlab.progress import progress
from headlab.runs import run_directory, save_config

log = logging.getLogger("headlab")

StoreDType = Literal["float16", "float32"]


class _ShardWriterThread:
    """Writes shards on a background thread so the next forward passes overlap the disk writes and hashing."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.add_shard(*item)
                except BaseException as error:  # re-raised on the main thread
                    self.error = error

    def put(self, *item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(text.rstrip("/")).name or text)
    return keep.strip("-")[:40] or "x"


def describe(loaded: LoadedModel, capture: HeadCapture, data: LabelledDataset, dataset: DatasetConfig,
             dtype: str, model_dtype: str, max_length: int | None) -> CacheSpec:
    """The cache's typed description (what ``manifest.json`` records and what its key hashes)."""
    net = loaded.model
    return CacheSpec(
        model_id=loaded.model_id, model_source=loaded.source, model_class=type(net).__name__,
        model_type=net.config.model_type, revision=getattr(net.config, "_commit_hash", None),
        weights=weights_fingerprint(net), model_dtype=model_dtype, n_layers=int(net.config.num_hidden_layers),
        layers=capture.layers, n_heads=capture.n_heads, d_head=capture.d_head, positions=capture.positions,
        dtype=dtype, max_length=max_length, padding_side=getattr(loaded.tokenizer, "padding_side", "right"),
        dataset=dataset, dataset_fingerprint=data.fingerprint(), examples=len(data), label_schema=data.schema,
    )


def write_shards(capture: HeadCapture, data: LabelledDataset, writer: CacheWriter, shard_rows: int,
                 batch_size: int, stop: int | None = None) -> None:
    """Capture examples ``writer.examples_done .. stop`` (default: all) batch by batch and hand ``shard_rows``-row
    shards to a writer thread; a killed run leaves only complete shards, and the next run starts after the last
    of them."""
    start = writer.examples_done
    stop = len(data) if stop is None else stop
    if start and start < stop:
        log.info("resuming %s from example %d of %d", writer.path, start, stop)
    background = _ShardWriterThread(writer)
    buffers: list = []
    buffered, done = 0, start
    try:
        with progress(stop - start, f"caching {len(capture.layers)}x{capture.n_heads} heads",
                      unit="examples") as advance:
            for end, batch in capture.iterate(data.texts, data.marks, batch_size=batch_size, start=start,
                                               stop=stop):
                buffers.append(batch)
                buffered += len(batch.example)
                advance(end - done)
                done = end
                if buffered >= shard_rows or end == stop:
                    background.put(
                        np.concatenate([b.activations for b in buffers]),  # [rows, layers, heads, d_head]
                        np.concatenate([b.example for b in buffers]),
                        np.concatenate([b.token for b in buffers]),
                        end,
                    )
                    buffers, buffered = [], 0
    finally:
        background.close()


def cache(
    model: str,
    dataset: str,
    out: Path | None = None,
    positions: Positions = "last",
    layers: list[int] | None = None,
    batch_size: int = 32,
    dtype: StoreDType = "float16",
    model_dtype: DType = "float32",
    device: str = "auto",
    text_field: str = "text",
    label_field: str | list[str] = "label",
    mark_field: str = "mark",
    group_field: str | None = "group",
    label_kind: LabelKind = "auto",
    split: str = "train",
    limit: int | None = None,
    max_length: int | None = None,
    shard_mb: float = 64.0,
    device_map: str | None = None,
    max_memory: dict[str, str] | None = None,
    offload_folder: Path | None = None,
    devices: int = 1,
    num_nodes: int = 1,
) -> Path:
    """Cache every head's output (the attention output projection's input, per head) over a labelled dataset.

    Re-running with the same inputs reuses the cache; an interrupted run resumes from its last complete shard.

    Args:
        model: Hugging Face hub id, local save_pretrained directory, or ``minilm`` (the offline built-in encoder).
        dataset: a .jsonl/.json/.csv/.tsv file, ``hf:NAME[:CONFIG]``, a save_to_disk directory, or a built-in set
            (``capitals``, ``sentiment``, ``ioi``).
        out: cache directory (default: runs/cache/<model>-<dataset>-<positions>-<key>).
        positions: which tokens to read: ``last`` token, ``all`` tokens (one row each), ``mean`` over tokens, or
            the ``marked`` token(s) of each example.
        layers: model layers to cache (default all; negative counts from the end).
        batch_size: examples per forward pass.
        dtype: storage dtype of the cache (float16 halves the disk and memory of float32).
        model_dtype: dtype the model runs in.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        text_field: dataset field holding the text.
        label_field: dataset field(s) holding labels; the first is the primary label.
        mark_field: dataset field holding the character offset(s) of marked tokens.
        group_field: dataset field grouping examples for grouped splits (used when present).
        label_kind: ``auto`` infers binary / multiclass / regression from the label values.
        split: split to read for Hugging Face datasets.
        limit: read only the first ``limit`` examples.
        max_length: truncate inputs to this many tokens (default: the model's context length).
        shard_mb: target size of one shard in MiB (bounds memory while writing).
        device_map: spread the model over GPUs, CPU and disk with accelerate (auto, balanced, balanced_low_0,
            sequential) and print where each part went; default: the whole model on --device.
        max_memory: per-device memory for --device_map, e.g. '{"0": "70GiB", "cpu": "200GiB"}'; the rest: disk.
        offload_folder: folder for the weights --device_map offloads to disk.
        devices: processes on this machine, each caching its own share of the examples (data parallel, started
            by Lightning; one GPU each on CUDA, else CPU processes splitting the cores). Under torchrun or SLURM
            the ranks come from the launcher and this must match its processes per node.
        num_nodes: machines taking part (with torchrun --nnodes or SLURM); the output folder must be shared.
    """
    arguments = dict(locals())  # the resolved config, saved in the cache directory
    _check_numbers(batch_size, max_length, shard_mb, layers)
    at_least("devices", devices, 1)
    at_least("num_nodes", num_nodes, 1)
    from data.cache_ranks import cache_data_parallel, launched_externally

    if devices > 1 or num_nodes > 1 or launched_externally():
        return cache_data_parallel(arguments)
    start_time = time.perf_counter()
    run = prepare(arguments, device)
    out = run.out
    with run_directory(out, "cache", layout=CacheWriter.LAYOUT):
        writer = CacheWriter(out, run.spec.identity(), run.spec.header())
        save_config(out, {**arguments, "out": out})
        if writer.complete:
            print(f"reused complete cache {out}: {describe_cache(HeadCache.open(out))}")
            return Path(out)
        restarted = discard_other_parts(writer, [])
        if restarted:
            print(f"discarded {restarted} shards of an interrupted data-parallel run; restarting their examples")
        start = writer.examples_done
        result = _capture_rest(run.capture, run.data, writer, dtype, shard_mb, batch_size, run.max_length)
    seconds = time.perf_counter() - start_time
    print(f"cached {describe_cache(result)} in {seconds:.1f} s ({(len(run.data) - start) / seconds:.1f} examples/s) "
          f"-> {out}")
    return Path(out)


@dataclass
class Prepared:
    """What every process of a cache run builds first: the dataset, the capture on the loaded model, the cache's
    description and its folder."""

    data: LabelledDataset
    capture: HeadCapture
    spec: CacheSpec
    out: Path
    max_length: int | None


def prepare(arguments: dict, device: str) -> Prepared:
    """Load the dataset and the model (on ``device``) named by the cache command's ``arguments``."""
    a = arguments
    config = DatasetConfig(a["dataset"], a["text_field"], a["label_field"], a["mark_field"], a["group_field"],
                           a["label_kind"], a["split"], a["limit"])
    data = load_dataset(config)
    if a["positions"] == "marked" and data.marks is None:
        raise HeadlabError(f"--positions marked needs marked tokens, but dataset {a['dataset']} has no "
                           f"'{a['mark_field']}' field")
    loaded = load_model(a["model"], dtype=a["model_dtype"], device=device,
                        placement=Placement(a["device_map"], a["max_memory"], a["offload_folder"]))
    effective_max = _max_length(loaded, a["max_length"])
    store = torch.float16 if a["dtype"] == "float16" else torch.float32
    capture = HeadCapture(loaded.model, loaded.tokenizer, positions=a["positions"], layers=a["layers"],
                          max_length=effective_max, store_dtype=store)
    spec = describe(loaded, capture, data, config, a["dtype"], a["model_dtype"], effective_max)
    out = a["out"]
    if out is None:
        out = Path("runs/cache") / (f"{_slug(a['model'])}-{_slug(a['dataset'])}-{a['positions']}-"
                                    f"{cache_key(spec.identity())[:10]}")
    return Prepared(data, capture, spec, Path(out), effective_max)


def _capture_rest(capture: HeadCapture, data, writer: CacheWriter, dtype: str, shard_mb: float, batch_size: int,
                  effective_max: int | None) -> HeadCache:
    """Capture the examples the writer does not hold yet, in shards of about ``shard_mb``, and finish the cache."""
    write_shards(capture, data, writer, shard_rows(capture, dtype, shard_mb), batch_size)
    return finish(writer, data, capture.truncated, effective_max)


def shard_rows(capture: HeadCapture, dtype: str, shard_mb: float) -> int:
    """Rows per shard of about ``shard_mb`` MiB."""
    row_bytes = len(capture.layers) * capture.n_heads * capture.d_head * (2 if dtype == "float16" else 4)
    return max(1, int(shard_mb * 2**20 / row_bytes))


def finish(writer: CacheWriter, data: LabelledDataset, truncated: int, effective_max: int | None) -> HeadCache:
    """Write the labels and mark the cache complete, saying how many examples were truncated."""
    if truncated:
        log.warning("%d examples were longer than %d tokens and were truncated to their first %d",
                    truncated, effective_max, effective_max)
    extra = {"group": data.groups} if data.groups is not None else None
    return writer.finish(data.labels, extra, truncated_examples=truncated)


def _max_length(loaded, max_length: int | None) -> int | None:
    """The tokens an input may have: ``max_length`` (checked against the model's context) or the context."""
    limit_tokens = context_length(loaded.model, loaded.tokenizer)
    if max_length is not None and limit_tokens is not None and max_length > limit_tokens:
        raise HeadlabError(f"max_length {max_length} exceeds the model's context of {limit_tokens} tokens")
    return max_length or limit_tokens


def _check_numbers(batch_size: int, max_length: int | None, shard_mb: float, layers: list[int] | None) -> None:
    at_least("batch_size", batch_size, 1)
    at_least("max_length", max_length, 1, optional=True)
    require(shard_mb > 0, f"--shard_mb {shard_mb} must be positive")
    require(layers is None or len(layers) > 0, "--layers [] selects no layer; pass layer indices or leave it unset")


def describe_cache(c: HeadCache) -> str:
    m = c.manifest
    size = c.activations.nbytes / 2**20
    return (f"{c.rows} rows x {len(c.layers)} layers x {c.n_heads} heads x {c.d_head} d_head ({m['dtype']}, "
            f"{size:.1f} MiB), positions={m['positions']}, labels={list(c.label_schema)}, model={m['model']['id']}, "
            f"dataset={m['dataset']['spec']}")
