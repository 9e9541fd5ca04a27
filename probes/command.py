"""``train.py probe``: a linear probe for every (layer, head) of a head cache, with controls and a report."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data import HeadCache
from headlab.errors import HeadlabError, at_least
from headlab.runs import run_directory, save_config
from headlab.tracking import LoggerKind, finish, make_logger
from probes.config import ControlConfig, ProbeConfig, ReportConfig, SplitConfig, SteerConfig
from probes.data import HeadMajor, ProbeProblem, build_problem, no_hugepage_advice
from probes.evaluate import evaluate, top_heads
from probes.metrics import primary_metric
from probes.report import (
    default_metric,
    log_to_tracker,
    plot_heatmap,
    save_directions,
    summary,
    write_heads,
    write_summary,
)
from probes.trust import assess

log = logging.getLogger("headlab.probe")
BLOCK_HEADS = 4  # heads per block: 4 x 6000 rows x 128 dims x 4 bytes = 12 MB; two workers fit a 32 MB L3


def probe_heads(
    cache: Path,
    out: Path = Path("runs/probe"),
    probe: ProbeConfig = ProbeConfig(),  # noqa: B008 (frozen dataclass: jsonargparse builds --probe.* from it)
    split: SplitConfig = SplitConfig(),  # noqa: B008
    control: ControlConfig = ControlConfig(),  # noqa: B008
    report: ReportConfig = ReportConfig(),  # noqa: B008
    steer: SteerConfig = SteerConfig(),  # noqa: B008
    logger: LoggerKind = "wandb",
    workers: int | None = None,
) -> Path:
    """Train a linear probe on every (layer, head) of a head cache; rank heads on validation, report on test.

    Writes into ``out``: heads.csv (one row per head: layer, head, test metrics with intervals, validation
    score, control score and selectivity, permutation p-value, mass-mean score), summary.json (top heads,
    settings), heatmap.png, directions.safetensors (probe weights and mass-mean directions), config.yaml
    (re-run with ``--config out/config.yaml``) and the W&B run (offline without an account).

    Args:
        cache: head cache directory written by ``train.py cache`` (or ``data.write_cache``).
        out: run directory to write.
        probe: how each probe is trained (backend, solver, penalties, standardisation, class weights).
        split: seeded (grouped) holdout or k-fold splits.
        control: control task, permutations, bootstrap and calibration settings.
        report: number of top heads and the heatmap metric.
        steer: the steering check on the top heads (off by default: it loads the cache's model).
        logger: wandb (offline unless an account is configured), csv or none.
        workers: threads solving head blocks (default: the CPU cores available, at most 8).

    Returns:
        The run directory.
    """
    start = time.perf_counter()
    cache, out = Path(cache), Path(out)
    settings: dict[str, Any] = {"cache": str(cache), "out": str(out), "probe": probe, "split": split,
                                "control": control, "report": report, "steer": steer, "logger": logger,
                                "workers": workers}
    at_least("workers", workers, 1, optional=True)
    heads_cache = HeadCache.open(cache)
    heads_cache.activations.open_all()  # map every shard on this thread: the workers below only compute
    report, steer = _default_top_k(report, steer, len(heads_cache.layers), heads_cache.n_heads)
    problem = build_problem(heads_cache, probe, split, control)
    solver = probe.solver if probe.solver != "auto" else ("adam" if probe.l1 > 0 else "newton")
    run = _ProbeRun(out, heads_cache, problem, probe, split, control, report, steer, solver, workers,
                    {**settings, "solver": solver})
    with run_directory(out, "probe"):
        save_config(out, settings)
        # summary.json is written last and marks a finished run: an earlier run's must not vouch for the files this
        # one is about to replace, if it stops half-way
        (out / "summary.json").unlink(missing_ok=True)
        track = make_logger(logger, out, name=out.name, group="probe", config=settings)
        try:
            frame, top, heads_csv, heatmap = run.execute(track, start)
        finally:
            finish(track)
    _print_report(frame, top, problem, heads_csv, heatmap, time.perf_counter() - start)
    return out


# ``train.py probe`` resolves ``probes.command:probe``. The function itself has another name because jsonargparse
# names the command's option group after the function, which would collide with the nested ``--probe.*`` group.
probe = probe_heads


def _default_top_k(report: ReportConfig, steer: SteerConfig, n_layers: int, n_heads: int):
    """``report.top_k`` (default 10) and ``steer.top_k`` (default 5), checked against the heads the cache has."""
    total = n_layers * n_heads
    for name, k in [("report.top_k", report.top_k), ("steer.top_k", steer.top_k)]:
        if k is not None and not 1 <= k <= total:
            raise HeadlabError(f"--{name} {k} asks for more heads than the cache has ({n_layers} layers x "
                               f"{n_heads} heads = {total}); use a number from 1 to {total}")
    return (replace(report, top_k=min(10, total) if report.top_k is None else report.top_k),
            replace(steer, top_k=min(5, total) if steer.top_k is None else steer.top_k))


@dataclass
class _ProbeRun:
    """One probe run's inputs, checked; :meth:`execute` fits, evaluates and writes every output."""

    out: Path
    cache: HeadCache
    problem: ProbeProblem
    probe: ProbeConfig
    split: SplitConfig
    control: ControlConfig
    report: ReportConfig
    steer: SteerConfig
    solver: str
    workers: int | None
    settings: dict[str, Any]

    def execute(self, track, start: float):
        """Returns ``(frame, top heads, heads.csv, heatmap.png)``; writes summary.json and the W&B run."""
        cache, problem, split = self.cache, self.problem, self.split
        with no_hugepage_advice(), ThreadPoolExecutor(1) as pool:
            checked = pool.submit(cache.verify)  # hashing only: the shards are already mapped
            fits, mass = _fit(cache, problem, self.probe, self.solver, track, split.seed, self.workers, self.out)
            timings = {"fit": time.perf_counter() - start}
            checked.result()  # a damaged shard raises here, before anything is reported
            timings["checksums_waited"] = time.perf_counter() - start - timings["fit"]
        frame = evaluate(problem, fits, mass, self.control, cache.layers, cache.n_heads, split.seed)
        timings["metrics"] = time.perf_counter() - start - sum(timings.values())
        top, heads_csv, heatmap, directions, data = self._write(frame, fits, mass, start)
        timings["outputs"] = time.perf_counter() - start - sum(timings.values())
        if self.steer.enabled:
            from probes.steer_run import steer_top_heads

            data["steering"] = steer_top_heads(cache, problem, frame, directions, self.steer, split.seed)
            timings["steering"] = time.perf_counter() - start - sum(timings.values())
        data["timings"] = {k: round(v, 3) for k, v in timings.items()}
        write_summary(self.out, data)
        scalars = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        log_to_tracker(track, frame, scalars, heatmap, directions, self.out.name)
        return frame, top, heads_csv, heatmap

    def _write(self, frame: pd.DataFrame, fits, mass, start: float):
        """heads.csv, heatmap.png, directions.safetensors and the summary's content (written later, with timings)."""
        problem, cache, report = self.problem, self.cache, self.report
        metric = default_metric(problem, report.metric, frame)
        heads_csv = write_heads(self.out, frame)
        top = top_heads(frame, report.top_k)
        model_id = cache.manifest.get("model", {}).get("id", "?")
        title = (f"{model_id}: test {metric} of a probe per head for '{problem.label}' "
                 f"(boxes: top {report.top_k} by {'validation' if not self.split.folds else 'cross-validation'})")
        heatmap = plot_heatmap(self.out / "heatmap.png", frame, len(cache.layers), cache.n_heads, cache.layers,
                               metric, top, title)
        directions = save_directions(self.out / "directions.safetensors", fits, mass, problem, cache.layers,
                                     cache.n_heads)
        data = summary(frame, problem, report.top_k, primary_metric(problem.kind),
                       {**self.settings, "backend": self.probe.backend}, time.perf_counter() - start)
        return top, heads_csv, heatmap, directions, data


def _fit(reader: HeadCache, problem, probe: ProbeConfig, solver: str, track, seed: int, workers: int | None,
         out: Path):
    """Train every fit with the chosen backend; returns ``(HeadFits, MassMean | None)``."""
    from probes.newton import fit_mass_mean, fit_newton

    hm = HeadMajor(reader.activations, problem.parts, BLOCK_HEADS)
    if probe.backend == "sklearn":
        from probes.sklearn_backend import fit_sklearn

        fits = fit_sklearn(hm, problem, probe, reader.layers, reader.n_heads)
    elif solver == "newton":
        return fit_newton(hm, problem, probe, reader.layers, reader.n_heads, workers)
    else:
        from probes.module import fit_adam

        fits = fit_adam(reader, problem, probe, track, seed, str(out))
        finite = np.isfinite(fits.scores).all(axis=(0, 1, 3))
        if not finite.all():
            layer, head = divmod(int(np.flatnonzero(~finite)[0]), reader.n_heads)
            raise HeadlabError(f"the cache holds NaN or inf activations (first at layer {reader.layers[layer]}, "
                               f"head {head}); recapture in float32 or drop the examples that overflow")
    mass = fit_mass_mean(hm, problem, workers) if problem.kind != "regression" else None
    return fits, mass


def _print_report(frame, top, problem: ProbeProblem, heads_csv: Path, heatmap: Path, seconds: float) -> None:
    metric = primary_metric(problem.kind)
    print(f"probed {len(frame)} heads in {seconds:.1f} s; top {len(top)} by validation (test {metric}):")
    for _, row in top.iterrows():
        ci = ""
        if f"{metric}_ci_low" in row:
            ci = f" [{row[f'{metric}_ci_low']:.3f}, {row[f'{metric}_ci_high']:.3f}]"
        extra = f", selectivity {row['selectivity']:+.3f}" if np.isfinite(row.get("selectivity", np.nan)) else ""
        print(f"  layer {int(row['layer'])} head {int(row['head'])}: {metric} {row[metric]:.3f}{ci}{extra}")
    if "degenerate_dims" in frame and (frame["degenerate_dims"] > 0).any():
        flat = frame[frame["degenerate_dims"] > 0]
        names = ", ".join(f"L{r.layer}H{r.head} ({r.degenerate_dims})" for r in flat.head(8).itertuples())
        more = f" and {len(flat) - 8} more" if len(flat) > 8 else ""
        print(f"note: {len(flat)} heads have near-constant output dimensions, standardised with a floored scale "
              f"(dims per head): {names}{more}; see degenerate_dims in heads.csv")
    for warning in assess(problem).warnings:
        print(f"warning: {warning}")
    print(f"heads: {heads_csv}")
    print(f"heatmap: {heatmap}")
