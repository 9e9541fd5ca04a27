"""Seeds benchmark: N seeds of the default induction toy run, stacked in one process vs one after another.

Both arms run ``toy(task="induction", seeds=N)`` at the default config in this process, the first with
``stack_seeds=True`` (one vmapped model, :mod:`toymodels.stacked`), the second with ``stack_seeds=False`` (the same
single-seed runs in a loop), and each writes its re-emergence report. Timed: everything from the call to the report
(training, emergence tracking, null thresholds, ablations, plots, saving). The two arms train the same seeds on the
same data, so their per-seed results must agree up to float rounding; the bench prints the largest difference of
final eval loss and whether the induction head formed in the same seeds. Goal (issue 5): speedup >= 4. On a small
CPU the training step is compute-bound already at one seed and stacking does not pay (measured 0.82 on 2 cores);
``--accelerator gpu`` runs both arms on a GPU, where one toy model leaves the device mostly idle.

The last line is machine-readable: ``seeds_bench speedup=<float>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from toymodels.command import toy
from toymodels.training import TrainConfig


def run(out: Path, seeds: int, train: TrainConfig, stacked: bool) -> float:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        toy(task="induction", out=out, seeds=seeds, stack_seeds=stacked, train=train, logger="none")
    return time.perf_counter() - started


def per_seed(out: Path, seeds: int) -> list[dict]:
    return [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in range(seeds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps, help="training steps (default: toy's)")
    parser.add_argument("--accelerator", default="cpu", help="where both arms train: cpu, gpu, mps (Lightning's names)")
    args = parser.parse_args()
    train = TrainConfig(steps=args.steps, accelerator=args.accelerator)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        stacked_dir, sequential_dir = Path(tmp) / "stacked", Path(tmp) / "sequential"
        stacked = run(stacked_dir, args.seeds, train, stacked=True)
        sequential = run(sequential_dir, args.seeds, train, stacked=False)
        a, b = per_seed(stacked_dir, args.seeds), per_seed(sequential_dir, args.seeds)
        loss_diff = max(abs(x["final_eval"]["loss"] - y["final_eval"]["loss"]) for x, y in zip(a, b))
        formed_a = [bool(x["target"]["formed"]) for x in a]
        formed_b = [bool(y["target"]["formed"]) for y in b]
        train_a = a[0]["train_seconds"]
        train_b = sum(y["train_seconds"] for y in b)
        print(f"accelerator={args.accelerator} threads={torch.get_num_threads()} seeds={args.seeds} steps={args.steps}")
        print(f"stacked:    {stacked:7.1f} s in all ({train_a:.1f} s training)")
        print(f"sequential: {sequential:7.1f} s in all ({train_b:.1f} s training)")
        print(f"training-only speedup {train_b / train_a:.3f}")
        print(
            f"max |final eval loss difference| between the arms {loss_diff:.2e}; formed in stacked "
            f"{sum(formed_a)}/{args.seeds}, sequential {sum(formed_b)}/{args.seeds}, same seeds: {formed_a == formed_b}"
        )
        print((stacked_dir / "reemergence.md").read_text())
    print(f"seeds_bench speedup={sequential / stacked:.3f}")


if __name__ == "__main__":
    main()
