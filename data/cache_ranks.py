"""Data-parallel caching: several processes, on one machine or many, each caching a contiguous share of the
examples into the same folder (see :mod:`data.cache_parts` for the layout and the merge).

The processes come from engines users already run, never from headlab itself:

* ``cache --devices N`` on one machine: Lightning Fabric's ``ddp_spawn`` launcher starts N processes (one GPU each
  on CUDA with NCCL; CPU processes splitting the cores, with gloo). Spawn, not Lightning's default script launcher,
  because that one re-runs ``sys.argv`` (under pytest, the whole test session) and the ranks need nothing but the
  command's arguments, which pickle.
* ``torchrun --nnodes M --nproc_per_node N train.py cache ...`` or ``srun train.py cache ...``: every process is
  a rank already; Fabric reads the launcher's environment (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` or SLURM's).

Rank 0 claims the output folder (the lock, the config, the main manifest) and decides who caches what; every rank
then writes its own part; after a barrier rank 0 merges the parts and writes the labels. Every step ends with an
exchange of each rank's outcome, so an error on any rank (bad input, a full disk) ends all of them with the same
one-line message instead of leaving the others waiting at a barrier.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headlab.errors import HeadlabError, require

log = logging.getLogger("headlab")


class _RankFailed(Exception):
    """Another step failed on some rank: ``code`` and ``message`` are that rank's (the lowest failing rank)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def launched_externally() -> bool:
    """Whether this process is one rank of a torchrun or SLURM (srun) launch with more than one process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _launcher_shape() -> tuple[int, int]:
    """``(processes per node, nodes)`` as the external launcher set them."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
                or world)
    return local, max(1, world // local)


def cache_data_parallel(arguments: dict[str, Any]) -> Path:
    """Run the cache command on several ranks (see the module docstring); returns the cache folder."""
    from lightning.fabric import Fabric

    require(arguments["device_map"] is None,
            "--device_map spreads one model over devices and --devices/--num_nodes run one model per process; "
            "use one of the two (for a model larger than one device, leave --devices at 1)")
    device = str(arguments["device"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    require(cuda or device in ("auto", "cpu"), f"--device {device} with --devices: use auto, cpu or cuda")
    external = launched_externally()
    devices, nodes = arguments["devices"], arguments["num_nodes"]
    if external:
        local, launched_nodes = _launcher_shape()
        require(devices in (1, local) and nodes in (1, launched_nodes),
                f"--devices {devices} --num_nodes {nodes} differ from the launcher's {local} processes per node on "
                f"{launched_nodes} nodes; leave them out under torchrun/srun (the launcher sets them)")
        devices, nodes = local, launched_nodes
    else:
        require(nodes == 1, f"--num_nodes {nodes} needs a launcher on every node: start the command with torchrun "
                            "--nnodes or srun (see the README's Scaling out section)")
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    fabric = Fabric(accelerator="cuda" if cuda else "cpu", devices=devices, num_nodes=nodes,
                    strategy="ddp" if external else "ddp_spawn")
    try:
        status, code, message = fabric.launch(_rank_main, arguments, devices)
    except torch.multiprocessing.ProcessExitedException as died:  # a rank killed from outside (OOM, kill -9)
        name = f"signal {died.signal_name}" if died.signal_name else f"exit code {died.exit_code}"
        print(f"error: cache process {died.error_index} of {devices} died ({name}); the shards every process "
              "finished are on disk: run the same command again to resume", file=sys.stderr)
        raise SystemExit(1) from None
    if status == "ok":
        return Path(message)
    if external and fabric.global_rank != 0:
        raise SystemExit(code)  # rank 0 says it once
    if code == 2:
        raise HeadlabError(message)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _rank_main(fabric, arguments: dict[str, Any], local_ranks: int) -> tuple[str, int, str]:
    """One rank's share of the run. Returns ``("ok", 0, folder)`` or ``("error", exit code, message)``."""
    if fabric.device.type == "cpu":  # the ranks of one machine share its cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_ranks))
    if fabric.global_rank:
        logging.getLogger("headlab").setLevel(logging.WARNING)
    try:
        with contextlib.ExitStack() as stack:
            outcome = "ok", 0, str(_cache_share(fabric, arguments, stack))
    except _RankFailed as failed:
        outcome = "error", failed.code, failed.message
    _close_group()  # every rank got here through the same collectives
    return outcome


def _close_group() -> None:
    """Leave the process group together and tear it down: a rank that exits with gloo's threads still running
    aborts ("terminate called without an active exception", SIGABRT), which CI saw once in two runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _agree(fabric, step: Callable[[], Any], share: bool = False) -> Any:
    """Run ``step`` on every rank and exchange the outcomes: this rank's value (with ``share``, every rank's
    values, a list in rank order), or :class:`_RankFailed` with the lowest failing rank's error on all ranks."""
    from headlab.cli import describe_error

    value = None
    try:
        value = step()
        outcome: tuple = ("ok", value if share else None)
    except _RankFailed as failed:
        outcome = ("error", failed.code, failed.message)
    except Exception as error:
        outcome = ("error", *describe_error(error, "cache"))
    gathered: list = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, outcome)
    for item in gathered:
        if item[0] == "error":
            raise _RankFailed(item[1], item[2])
    return [item[1] for item in gathered] if share else value


def _cache_share(fabric, arguments: dict[str, Any], stack: contextlib.ExitStack) -> Path:
    from data.cache_parts import PartWriter, discard_other_parts, merge, plan
    from data.cache_run import describe_cache, finish, prepare, shard_rows, write_shards
    from data.cache_writer import CacheWriter
    from headlab.runs import run_directory, save_config

    start_time = time.perf_counter()
    rank, world = fabric.global_rank, fabric.world_size
    run = _agree(fabric, lambda: prepare(arguments, str(fabric.device)))
    out, key = run.out, None
    writer: CacheWriter | None = None

    def claim():  # rank 0 owns the folder for the whole run and decides who caches which examples
        nonlocal writer
        if rank:
            return None
        stack.enter_context(run_directory(out, "cache", layout=CacheWriter.LAYOUT))
        writer = CacheWriter(out, run.spec.identity(), run.spec.header())
        save_config(out, {**arguments, "out": out})
        if writer.complete:
            return None
        writer.save()
        ranges = plan(writer.examples_done, len(run.data), world)
        restarted = discard_other_parts(writer, ranges)
        if restarted:
            print(f"discarded {restarted} shards of an interrupted run with another number of processes; "
                  "restarting their examples")
        return writer.key, ranges

    decision = _agree(fabric, claim, share=True)[0]
    if decision is None:
        if rank == 0:
            from data.cache import HeadCache

            print(f"reused complete cache {out}: {describe_cache(HeadCache.open(out))}")
        return out
    key, ranges = decision
    lo, hi = ranges[rank]

    def share():
        part = PartWriter(out, key, lo, hi)
        if part.examples_done > lo:
            sys.stdout.write(f"rank {rank}: resuming examples {part.examples_done}..{hi} ({part.examples_done - lo} "
                             "cached by an interrupted run are reused)\n")  # one write: ranks share the terminal
            sys.stdout.flush()
        before = part.examples_done
        if before < hi:
            write_shards(run.capture, run.data, part, shard_rows(run.capture, arguments["dtype"],
                                                                 arguments["shard_mb"]),
                         arguments["batch_size"], stop=hi)
            part.add_truncated(run.capture.truncated)
        return hi - before

    done = sum(_agree(fabric, share, share=True))

    def combine():
        if rank == 0:
            result = finish(writer, run.data, merge(writer, ranges), run.max_length)
            seconds = time.perf_counter() - start_time
            print(f"cached {describe_cache(result)} in {seconds:.1f} s on {world} processes "
                  f"({done / seconds:.1f} examples/s) -> {out}")

    _agree(fabric, combine)
    return out
