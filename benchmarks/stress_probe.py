"""Stress the probe's worker threads: run ``train.py probe`` many times on a cache of many shards.

The probe solves head blocks on a thread pool while a background thread verifies shard checksums. CPython 3.11
crashes (``SystemError: AST constructor recursion depth mismatch``) when two threads parse at once, and ``np.load``
parses each shard's header, so a probe that mapped shards from worker threads failed about once in a few hundred
runs. Each run here is a fresh interpreter (a subprocess), as a user's run is, with the default number of workers.
``tests/test_threads.py`` checks the cause deterministically; this script checks the symptom.

    python benchmarks/stress_probe.py                 # 30 runs on a 12-shard cache
    python benchmarks/stress_probe.py --runs 200 --shards 16

The last line is machine-readable: ``stress_probe failures=<int> runs=<int>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import write_cache  # noqa: E402


def make_cache(path: Path, shards: int, rows_per_shard: int, seed: int = 0) -> None:
    """A float16 cache ``[rows, 4 layers, 8 heads, 32]`` in ``shards`` shards, with a binary label on one head."""
    rng = np.random.default_rng(seed)
    rows = shards * rows_per_shard
    y = rng.integers(0, 2, rows)
    x = rng.normal(size=(rows, 4, 8, 32)).astype(np.float32)
    x[:, 2, 5, :4] += 0.8 * y[:, None]
    write_cache(path, np.split(x.astype(np.float16), shards), {"label": y})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--shards", type=int, default=12, help="shards in the cache (at least 8)")
    parser.add_argument("--rows_per_shard", type=int, default=100)
    args = parser.parse_args()
    if args.shards < 8:
        parser.error("--shards must be at least 8")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    failures, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        make_cache(cache, args.shards, args.rows_per_shard)
        for run in range(args.runs):
            started = time.perf_counter()
            result = subprocess.run(
                [sys.executable, str(REPO / "train.py"), "probe", "--cache", str(cache), "--out",
                 str(Path(tmp) / f"run{run}"), "--logger", "none", "--control.permutations", "100",
                 "--control.bootstrap", "100"],
                capture_output=True, text=True, env=env, check=False,
            )
            seconds.append(time.perf_counter() - started)
            if result.returncode != 0:
                failures.append((run, result.returncode, (result.stderr.strip().splitlines() or ["?"])[-1]))
                print(f"run {run}: exit {result.returncode}: {failures[-1][2]}", flush=True)
    print(f"{args.runs} probe runs on a {args.shards}-shard cache, default workers: {np.median(seconds):.2f} s median "
          f"per run (subprocess included), {len(failures)} failed")
    print(f"stress_probe failures={len(failures)} runs={args.runs}")


if __name__ == "__main__":
    main()
