"""Data-parallel caching against one process: ``python benchmarks/scale_bench.py [--examples 384] [--seq 32]``.

The GPT-2-small-shaped random model of ``cache_bench.py`` caches every head at the last token of ``--examples``
examples, twice, each as a fresh ``train.py cache`` command, alternating over ``--repeats``:

* one process with two torch threads (``OMP_NUM_THREADS=2``), the ordinary run;
* ``--devices 2``: two processes from Lightning's spawn launcher, one thread each.

Throughput is examples per second of the capture itself, as each command prints it (``N examples/s``), so the
ranks' start-up (imports, model load, process group) is left out of both; it is reported apart, from the wall
clock of the whole command. Ends with ``scale_bench cache_ratio=<2-process throughput / 1-process throughput>
max_abs_diff=<largest |difference| between the two caches' activations>``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cache_bench import build  # noqa: E402 (the benchmarks folder is not a package)


def run_cache(model_dir: Path, data: Path, out: Path, batch_size: int, devices: int, threads: int
              ) -> tuple[float, float]:
    """Run the cache command; returns (capture throughput in examples/s as printed, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "cache", "--model", str(model_dir), "--dataset",
                             str(data), "--out", str(out), "--positions", "last", "--batch_size", str(batch_size),
                             "--device", "cpu", "--devices", str(devices)],
                            cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"cache --devices {devices} failed:\n{result.stderr[-3000:]}")
    rate = re.search(r"\(([\d.]+) examples/s\)", result.stdout)
    if rate is None:
        raise SystemExit(f"no throughput line in:\n{result.stdout[-2000:]}")
    return float(rate.group(1)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--seq", type=int, default=32, help="words per example")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from data import HeadCache

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build(work, [args.examples], args.seq)
        data = work / f"data-{args.examples}.jsonl"
        one, two = [], []
        for i in range(args.repeats):
            for devices, threads, results in ((1, 2, one), (2, 1, two)):
                out = work / f"cache-{devices}-{i}"
                rate, wall = run_cache(model_dir, data, out, args.batch_size, devices, threads)
                results.append((rate, wall, out))
                print(f"repeat {i}: --devices {devices} x {threads} thread(s): {rate:7.1f} examples/s captured, "
                      f"{wall:5.1f} s wall clock (start-up included)", flush=True)
        best_one, best_two = max(one), max(two)
        a = np.asarray(HeadCache.open(best_one[2]).activations, np.float32)
        b = np.asarray(HeadCache.open(best_two[2]).activations, np.float32)
        diff = float(np.abs(a - b).max())
        print(f"best capture throughput: 1 process {best_one[0]:.1f}, 2 processes {best_two[0]:.1f} examples/s; "
              f"wall clock {min(w for _, w, _ in one):.1f} s against {min(w for _, w, _ in two):.1f} s")
        print(f"scale_bench cache_ratio={best_two[0] / best_one[0]:.3f} max_abs_diff={diff:.3g}")


if __name__ == "__main__":
    main()
