"""``python train.py cache``: run a Hugging Face model over a labelled dataset and cache every head's output.

:func:`cache` is the command (its options are the CLI). One process runs the steps of :mod:`data.cache_run` itself;
``--devices``/``--num_nodes`` or a torchrun/SLURM launch hand them to the ranks of :mod:`data.cache_ranks`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from data.cache import HeadCache
from data.cache_parts import discard_other_parts
from data.cache_ranks import cache_data_parallel, launched_externally
from data.cache_run import describe_cache, finish, prepare, shard_rows, write_shards
from data.cache_writer import CacheWriter
from data.capture import HeadCapture, Positions
from data.labels import LabelKind
from headlab.errors import at_least, require
from headlab.models import DType
from headlab.runs import run_directory, save_config

StoreDType = Literal["float16", "float32"]


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
    if devices > 1 or num_nodes > 1 or launched_externally():
        return cache_data_parallel(arguments)
    return _cache_one_process(arguments)


def _cache_one_process(arguments: dict) -> Path:
    """The cache run on this process alone: claim the folder, capture what it lacks, finish it."""
    start_time = time.perf_counter()
    run = prepare(arguments, arguments["device"])
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
        result = _capture_rest(run.capture, run.data, writer, arguments["dtype"], arguments["shard_mb"],
                               arguments["batch_size"], run.max_length)
    seconds = time.perf_counter() - start_time
    print(f"cached {describe_cache(result)} in {seconds:.1f} s ({(len(run.data) - start) / seconds:.1f} examples/s) "
          f"-> {out}")
    return Path(out)


def _capture_rest(capture: HeadCapture, data, writer: CacheWriter, dtype: str, shard_mb: float, batch_size: int,
                  effective_max: int | None) -> HeadCache:
    """Capture the examples the writer does not hold yet, in shards of about ``shard_mb``, and finish the cache."""
    write_shards(capture, data, writer, shard_rows(capture, dtype, shard_mb), batch_size)
    return finish(writer, data, capture.truncated, effective_max)


def _check_numbers(batch_size: int, max_length: int | None, shard_mb: float, layers: list[int] | None) -> None:
    at_least("batch_size", batch_size, 1)
    at_least("max_length", max_length, 1, optional=True)
    require(shard_mb > 0, f"--shard_mb {shard_mb} must be positive")
    require(layers is None or len(layers) > 0, "--layers [] selects no layer; pass layer indices or leave it unset")
