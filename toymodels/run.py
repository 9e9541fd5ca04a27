"""One seed's toy run, from setup to its run directory: the pieces ``toy`` and ``toy --seeds`` (one after another or
stacked) share, so a seed directory is the same whichever path wrote it.

:func:`setup_seed` builds the seed's model and its fixed measurement inputs (detection and evaluation batches, null
thresholds, the emergence tracker); :func:`make_trainer` the Lightning Trainer; :func:`finish_seed` maps the trained
model's heads and writes the run directory (``model/``, ``roles.csv``, ``scores.csv``, ``ablations.csv``,
``eval_curve.csv``, ``metrics.json``, plots). :func:`train_single` chains them for one seed trained alone.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from torch import nn

from data.tasks import Task, make_task, target_accuracy, target_loss
from headlab.publish import publish_folder
from headlab.runs import atomic_write_json, atomic_write_text, run_directory, save_config, to_plain
from headlab.tracking import LoggerKind, finish, make_logger, quiet_libraries, sweep_callbacks
from roles.mapping import Batches, DetectConfig, TargetSummary, map_heads, write_map
from roles.null import NullStats, null_distribution
from roles.rule import floor_of
from roles.table import RoleTable
from toymodels.circuits import IterationCircuit, task_circuit
from toymodels.emergence import EmergenceTracker, emerged_steps, log_linear_schedule, phase_change_step
from toymodels.ioi_circuit import NameMoverCircuit
from toymodels.mechanisms import MECHANISMS, MechanismTarget
from toymodels.modeling import ToyTransformer
from toymodels.plots import plot_loss, plot_scores_over_steps
from toymodels.training import TaskDataModule, ToyConfig, ToyLitModule, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a toy run: what its ``config.yaml`` holds (``--config`` reruns it)."""

    task: str
    task_options: dict[str, Any]
    out: str
    model: ToyConfig
    train: TrainConfig
    detection: DetectConfig
    logger: LoggerKind
    seed: int
    seeds: int = 1
    stack_seeds: bool | None = None

    def for_seed(self, seed: int) -> RunConfig:
        """The config of one seed's directory ``OUT/seed-S``: exactly a single ``toy --seed S`` run."""
        return dataclasses.replace(self, out=str(Path(self.out) / f"seed-{seed}"), seed=seed, seeds=1,
                                   stack_seeds=None)

    def plain(self) -> dict[str, Any]:
        return to_plain(self)

    def make_task(self) -> Task:
        return make_task(self.task, **self.task_options)


@dataclass
class SeedRun:
    """One seed's model and fixed measurement inputs, set up exactly as a single ``toy --seed`` run."""

    config: RunConfig
    net: ToyTransformer
    null: dict[str, NullStats]  # reported beside the scores, not part of the verdicts
    tracker: EmergenceTracker

    @property
    def out(self) -> Path:
        return Path(self.config.out)


@dataclass
class SeedResult:
    """What a finished seed reports: ``metrics.json``'s content, the role table and the target's summary."""

    out: Path
    metrics: dict[str, Any]
    table: RoleTable
    target: TargetSummary | MechanismTarget
    circuit: IterationCircuit | NameMoverCircuit | None = None

    def lines(self) -> list[str]:
        m = self.metrics
        return [
            f"run: {self.out}",
            self.target.line(),
            *([self.circuit.line()] if self.circuit else []),
            f"phase change at step {m['phase_change_step']}; final eval loss {m['final_eval']['loss']:.3f}, "
            f"accuracy {m['final_eval']['accuracy']:.3f}; {m['total_seconds']:.1f} s",
        ]


def setup_seed(the_task: Task, config: RunConfig) -> SeedRun:
    """The seed's run directory and config file, its initialised model, null statistics and emergence tracker."""
    out, seed, detection, train = Path(config.out), config.seed, config.detection, config.train
    if (out / "config.yaml").exists() and not (out / "metrics.json").exists():
        print(f"{out} holds an unfinished run (killed before it ended); restarting it from step 0: toy runs keep "
              "no checkpoint", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config.plain())
    pl.seed_everything(seed, verbose=False)
    task_record = {"name": the_task.name, "options": to_plain(dataclasses.asdict(the_task))}
    net = ToyTransformer(config.model.hf_config(the_task.vocab_size, the_task.seq_len, headlab_task=task_record))
    detect_batch = the_task.detection_batch(detection.batch_size, seed + 1)
    eval_batch = the_task.batch(train.eval_batch_size, seed + 2, the_task.eval_split)
    null = {}
    if detection.n_null:
        null = null_distribution(net, detect_batch, n_models=detection.n_null, seed=seed + 10_000)
    schedule = log_linear_schedule(train.steps, train.track_every)
    tracker = EmergenceTracker(detect_batch, eval_batch, schedule, detection.alpha, detection.floors)
    return SeedRun(config, net, null, tracker)


def make_trainer(train: TrainConfig, run_logger, callbacks: list[pl.Callback], out: Path) -> pl.Trainer:
    """The Lightning Trainer of a toy run (plus the sweep's pruning callback inside a sweep)."""
    quiet_libraries()
    return pl.Trainer(
        max_steps=train.steps,
        max_epochs=-1,
        accelerator=train.accelerator,
        devices=1,
        logger=run_logger,
        callbacks=[*callbacks, *sweep_callbacks("train/loss", mode="min")],
        enable_checkpointing=False,
        enable_progress_bar=sys.stdout.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=train.log_every,
        default_root_dir=str(out),
    )


@torch.no_grad()
def split_metrics(model: nn.Module, task: Task, seed: int, n: int) -> dict[str, dict[str, float]]:
    """Target loss and accuracy of ``model`` on a fresh batch of every split of ``task``."""
    model.eval()
    out = {}
    for split in task.splits:
        batch = task.batch(n, seed + 4, split)
        logits = model(input_ids=batch["input_ids"]).logits
        out[split] = {"loss": float(target_loss(logits, batch["targets"])),
                      "accuracy": float(target_accuracy(logits, batch["targets"]))}
    return out


def _write_curves(run: SeedRun) -> None:
    history = run.tracker.history
    score_rows = [
        {"step": snap.step, "role": role, "layer": layer, "head": head, "score": float(values[layer, head])}
        for snap in history
        for role, values in snap.scores.items()
        for layer in range(values.shape[0])
        for head in range(values.shape[1])
    ]
    atomic_write_text(run.out / "scores.csv", pd.DataFrame(score_rows).to_csv(index=False))
    curve = pd.DataFrame({"step": [s.step for s in history], "eval_loss": [s.eval_loss for s in history],
                          "eval_accuracy": [s.eval_accuracy for s in history]})
    atomic_write_text(run.out / "eval_curve.csv", curve.to_csv(index=False))


def finish_seed(run: SeedRun, the_task: Task, train_log: list[tuple[int, float]], train_seconds: float,
                started: float, extra: dict[str, Any] | None = None) -> SeedResult:
    """Everything after training: the head map, the files and plots of the run directory, ``metrics.json``."""
    config, net, null = run.config, run.net, run.null
    detection, train, seed = config.detection, config.train, config.seed
    net.eval()
    history = run.tracker.history
    batches = Batches(the_task.detection_batch(detection.batch_size, seed + 1),
                      the_task.batch(detection.eval_size(toy=True), seed + 2, the_task.eval_split),
                      the_task.batch(detection.eval_size(toy=True), seed + 3, the_task.eval_split))
    # the circuit the target also needs (iteration: EoI + diagonal; ioi: selective movers), measured first: its
    # partner heads are no random reference for the functional check
    circuit = task_circuit(net, the_task, batches.detect, detection.floors)
    partners = circuit.partners(config.model.n_layers, config.model.n_heads) if circuit is not None else None
    head_map = map_heads(net, batches, the_task.role, detection, seed, null=null, emerged=emerged_steps(history),
                         all_kinds=True, partners=partners)
    steps, losses = [s.step for s in history], [s.eval_loss for s in history]
    phase = phase_change_step(steps, losses)
    target = TargetSummary.of(head_map, the_task.role, detection.min_effect)
    if target.emerged_step is not None:
        target.emerged_seconds = next(s.seconds for s in history if s.step == target.emerged_step)
    mechanism = {}
    if the_task.name in MECHANISMS:  # a whole-model mechanism (modular addition's Fourier features) is the target
        target, mechanism["mechanism"] = MECHANISMS[the_task.name](net, the_task)
    if circuit is not None:
        mechanism["circuit"] = {**circuit.as_dict(), "head_formed": target.formed}
        target.formed = target.formed and circuit.passed

    publish_folder(run.out / "model", net.save_pretrained)  # complete or absent, never half-written
    write_map(run.out, head_map, f"{the_task.name}: functional heads")
    _write_curves(run)
    floors = {role: floor_of(role, net.config.head_dim, detection.floors) for role in history[-1].scores}
    plot_scores_over_steps(history, floors, run.out / "scores_over_steps.png")
    plot_loss(history, phase, run.out / "loss.png", pd.DataFrame(train_log, columns=["step", "loss"]))
    metrics = {
        "task": the_task.name,
        "seed": seed,
        "target": target.as_dict(),
        "target_formed_fraction": float(target.formed),  # of this one seed (a --seeds N run: over N seeds)
        "phase_change_step": phase,
        "final_eval": {"loss": losses[-1], "accuracy": history[-1].eval_accuracy},
        "splits": split_metrics(net, the_task, seed, train.eval_batch_size),
        "clean_loss": head_map.ablations[detection.ablation].clean_loss,
        "steps": train.steps,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "seconds_per_step": train_seconds / max(train.steps, 1),
        **mechanism,
        **(extra or {}),
    }
    atomic_write_json(run.out / "metrics.json", metrics)
    return SeedResult(run.out, metrics, head_map.table, target, circuit)


def log_to_wandb(run_logger, result: SeedResult) -> None:
    """The plots as images, the role table as a long-form W&B table, the target's summary."""
    if not run_logger or type(run_logger).__name__ != "WandbLogger":
        return
    import wandb

    images = {p.stem: wandb.Image(str(p)) for p in sorted(result.out.glob("*.png"))}
    plain = result.table.frame.astype({"emerged_step": "float", "functional": "float"})
    run_logger.experiment.log({**images, "roles": wandb.Table(dataframe=plain)})
    run_logger.experiment.summary.update(
        {f"target/{k}": v for k, v in result.metrics["target"].items() if isinstance(v, (int, float, bool, str))}
    )


def train_single(the_task: Task, config: RunConfig, report: bool = False) -> SeedResult:
    """Train one seed alone and write its run directory (claimed for the whole run); prints the summary lines.

    With ``report`` (``toy --seeds 1``) the directory also gets the one-seed re-emergence report
    (``reemergence.csv``, ...), so that every ``--seeds N`` run has the same files."""
    with run_directory(config.out, "toy"):
        result = _train_single(the_task, config)
        if report:
            from toymodels.reemergence import reemergence

            reemergence([result.out], result.out, min_runs=1)
        return result


def _train_single(the_task: Task, config: RunConfig) -> SeedResult:
    started = time.perf_counter()
    run = setup_seed(the_task, config)
    run_logger = make_logger(config.logger, run.out, name=f"toy-{config.task}-s{config.seed}",
                             group=f"toy-{config.task}", config=config.plain())
    module = ToyLitModule(run.net, config.train)
    trainer = make_trainer(config.train, run_logger, [run.tracker], run.out)
    train_started = time.perf_counter()
    trainer.fit(module, datamodule=TaskDataModule(the_task, config.train.batch_size, config.seed))
    train_seconds = time.perf_counter() - train_started
    run.net.cpu()
    result = finish_seed(run, the_task, module.train_log, train_seconds, started)
    log_to_wandb(run_logger, result)
    finish(run_logger)
    for line in result.lines():
        print(line, flush=True)
    return result
