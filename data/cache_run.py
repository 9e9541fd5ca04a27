"""The steps of a cache run that one process and every rank of a data-parallel run share: load the dataset and
the model (:func:`prepare`), describe the cache (:func:`describe`), capture shards on a writer thread
(:func:`write_shards`) and finish it with its labels (:func:`finish`).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.cache import HeadCache
from data.cache_writer import CacheWriter
from data.capture import HeadCapture
from data.datasets import DatasetConfig, LabelledDataset, load_dataset
from data.manifest import CacheSpec, cache_key
from headlab.errors import HeadlabError
from headlab.models import LoadedModel, context_length, load_model, weights_fingerprint
from headlab.placement import Placement
from headlab.progress import progress

log = logging.getLogger("headlab")


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


def slug(text: str) -> str:
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
    effective_max = max_length_of(loaded, a["max_length"])
    store = torch.float16 if a["dtype"] == "float16" else torch.float32
    capture = HeadCapture(loaded.model, loaded.tokenizer, positions=a["positions"], layers=a["layers"],
                          max_length=effective_max, store_dtype=store)
    spec = describe(loaded, capture, data, config, a["dtype"], a["model_dtype"], effective_max)
    out = a["out"]
    if out is None:
        out = Path("runs/cache") / (f"{slug(a['model'])}-{slug(a['dataset'])}-{a['positions']}-"
                                    f"{cache_key(spec.identity())[:10]}")
    return Prepared(data, capture, spec, Path(out), effective_max)


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


def max_length_of(loaded, max_length: int | None) -> int | None:
    """The tokens an input may have: ``max_length`` (checked against the model's context) or the context."""
    limit_tokens = context_length(loaded.model, loaded.tokenizer)
    if max_length is not None and limit_tokens is not None and max_length > limit_tokens:
        raise HeadlabError(f"max_length {max_length} exceeds the model's context of {limit_tokens} tokens")
    return max_length or limit_tokens


def describe_cache(c: HeadCache) -> str:
    m = c.manifest
    size = c.activations.nbytes / 2**20
    return (f"{c.rows} rows x {len(c.layers)} layers x {c.n_heads} heads x {c.d_head} d_head ({m['dtype']}, "
            f"{size:.1f} MiB), positions={m['positions']}, labels={list(c.label_schema)}, model={m['model']['id']}, "
            f"dataset={m['dataset']['spec']}")
