"""A cache written by several processes at once: one part per rank, merged into one ordinary cache.

Data-parallel caching (``cache --devices N``, or ranks started by torchrun / SLURM) splits the examples a cache
still needs into contiguous ranges, one per rank (:func:`plan`). Each rank writes its own shards
(``shards/p<start>-<index>.npy``, rows in example order) and its own part manifest ``parts/<start>-<end>.json``,
rewritten atomically after each shard, so a killed rank resumes from its last complete shard and never touches
another rank's files. After a barrier, rank 0 appends the parts' shards to ``manifest.json`` in example order
(:func:`merge`) and :meth:`data.cache_writer.CacheWriter.finish` writes the labels: the result is the cache one
process would have written (same rows in the same order), only cut into shards at other places.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np

from data.cache_writer import PARTS, CacheWriter, part_manifest
from headlab.errors import HeadlabError
from headlab.runs import atomic_write_json


def plan(start: int, end: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous example ranges ``[lo, hi)`` covering ``start..end``, one per rank, sizes differing by at most 1."""
    bounds = np.linspace(start, end, ranks + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in pairwise(bounds)]


def _part_file(path: Path, lo: int, hi: int) -> Path:
    return path / PARTS / f"{lo:09d}-{hi:09d}.json"


def discard_other_parts(writer: CacheWriter, ranges: list[tuple[int, int]]) -> int:
    """Remove the parts (and their shards) that are not in ``ranges`` or belong to another cache key: an
    interrupted run with another number of ranks, or a single-process run after a parallel one. Shards that
    ``writer``'s manifest lists (a merge killed before it removed its parts) stay. Returns the number of shards
    removed, for the run to say what it restarted."""
    path, key = writer.path, writer.key
    listed = {s["file"] for s in writer.manifest["shards"]}
    folder = path / PARTS
    if not folder.is_dir():
        return 0
    keep = {_part_file(path, lo, hi).name for lo, hi in ranges}
    removed = 0
    for file in sorted(folder.glob("*.json")):
        if file.name in keep and part_manifest(file).get("key") == key:
            continue
        for shard in part_manifest(file).get("shards", []):
            if shard["file"] in listed:
                continue
            for name in (shard["file"], shard["file"].replace(".npy", ".rows.npy")):
                (path / name).unlink(missing_ok=True)
            removed += 1
        file.unlink()
    return removed


class PartWriter(CacheWriter):
    """The writer of one rank's examples ``[lo, hi)``: its own shards and part manifest, resumed when present."""

    def __init__(self, path: str | Path, key: str, lo: int, hi: int):  # no super(): a part has no header
        self.path, self.key, self.lo, self.hi = Path(path), key, lo, hi
        self.file = _part_file(self.path, lo, hi)
        self.manifest = part_manifest(self.file) if self.file.exists() else {"key": key, "start": lo, "end": hi,
                                                                      "shards": [], "truncated": 0}
        for shard in self.manifest["shards"]:
            if not (self.path / shard["file"]).exists():
                raise HeadlabError(f"part {self.file} lists shard {shard['file']} but the file is gone; delete "
                                   f"{self.file} and run the cache command again")

    @property
    def examples_done(self) -> int:
        shards = self.manifest["shards"]
        return shards[-1]["end_example"] if shards else self.lo

    def shard_name(self, index: int) -> str:
        return f"shards/p{self.lo:09d}-{index:05d}.npy"

    def save(self) -> None:
        atomic_write_json(self.file, self.manifest)

    def add_truncated(self, count: int) -> None:
        """Record how many of this part's examples were truncated (kept across a resume)."""
        self.manifest["truncated"] += int(count)
        self.save()


def merge(writer: CacheWriter, ranges: list[tuple[int, int]]) -> int:
    """Append every part's shards to ``writer``'s manifest in example order and remove the part manifests.
    Returns the number of truncated examples the parts recorded."""
    truncated, shards = 0, []
    for lo, hi in ranges:
        part = part_manifest(_part_file(writer.path, lo, hi))
        done = part["shards"][-1]["end_example"] if part["shards"] else lo
        if done != hi:
            raise HeadlabError(f"part {lo}-{hi} of {writer.path} stopped at example {done}; run the cache command "
                               "again to finish it")
        shards += part["shards"]
        truncated += part.get("truncated", 0)
    writer.append_listed(shards)  # one atomic manifest write; the parts go after it
    for lo, hi in ranges:
        _part_file(writer.path, lo, hi).unlink()
    if not any((writer.path / PARTS).iterdir()):
        (writer.path / PARTS).rmdir()
    return truncated
