"""Toy-training benchmark: Lightning's time per step against a plain PyTorch loop, and the default induction run.

1. ``step_ratio``: the same toy model (default ``ToyConfig``), batch (default induction task, 64 x 64) and optimizer
   (AdamW as configured by ``TrainConfig``) trained for ``--steps`` steps by a plain loop and by the Lightning
   Trainer exactly as ``toy`` configures it (minus the emergence tracker, which is measurement, not training).
   Runs alternate, ``--repeats`` times each; the median time per step of each is compared. Goal: <= 1.15.
2. ``induction_seconds``: wall time of ``toy(task="induction")`` at its default config (training, tracking, null
   thresholds, ablations, plots, saving), which must form an induction head (prefix-matching score above its null
   threshold in a layer >= 1 head whose ablation raises the loss on the repeated part). Goal: < 180 s on 2 cores.

The last line is machine-readable: ``toy_bench step_ratio=<float> induction_seconds=<float>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from data.tasks import make_task, target_loss
from toymodels.command import toy
from toymodels.modeling import ToyTransformer
from toymodels.training import TaskDataModule, ToyConfig, ToyLitModule, TrainConfig


def _fresh_model(task) -> ToyTransformer:
    torch.manual_seed(0)
    return ToyTransformer(ToyConfig().hf_config(task.vocab_size, task.seq_len))


def plain_seconds_per_step(steps: int, warmup: int) -> float:
    task, cfg = make_task("induction"), TrainConfig()
    model = _fresh_model(task).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    stream = task.stream(cfg.batch_size, seed=0)
    torch.set_flush_denormal(True)  # as ToyLitModule does during fit
    try:
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            batch = next(stream)
            loss = target_loss(model(input_ids=batch["input_ids"]).logits, batch["targets"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps
    finally:
        torch.set_flush_denormal(False)


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()


def lightning_seconds_per_step(steps: int, warmup: int) -> float:
    task, cfg = make_task("induction"), TrainConfig()
    timer = _StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(  # the Trainer settings of toymodels.run.make_trainer
            max_steps=warmup + steps,
            max_epochs=-1,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=cfg.log_every,
            default_root_dir=tmp,
        )
        trainer.fit(ToyLitModule(_fresh_model(task), cfg), datamodule=TaskDataModule(task, cfg.batch_size, seed=0))
    return (timer.end - timer.start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop")
    parser.add_argument("--skip_induction", action="store_true", help="only measure the step ratio")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")

    plain, lightning = [], []
    for _ in range(args.repeats):
        plain.append(plain_seconds_per_step(args.steps, args.warmup))
        lightning.append(lightning_seconds_per_step(args.steps, args.warmup))
    plain_s, lightning_s = statistics.median(plain), statistics.median(lightning)
    ratio = lightning_s / plain_s
    print(f"plain loop: {1000 * plain_s:.2f} ms/step (runs: {', '.join(f'{1000 * t:.2f}' for t in plain)})")
    print(f"lightning:  {1000 * lightning_s:.2f} ms/step (runs: {', '.join(f'{1000 * t:.2f}' for t in lightning)})")

    induction_seconds = float("nan")
    if not args.skip_induction:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            out = toy(task="induction", out=Path(tmp) / "induction")
            induction_seconds = time.perf_counter() - start
            metrics = json.loads((out / "metrics.json").read_text())
        target = metrics["target"]
        print(
            f"default induction run: {induction_seconds:.1f} s, formed={target['formed']} "
            f"(head L{target['layer']}H{target['head']}, emerged at step {target['emerged_step']} after "
            f"{target.get('emerged_seconds', float('nan')):.1f} s of training, phase change at step "
            f"{metrics['phase_change_step']})"
        )
        if not target["formed"]:
            induction_seconds = float("nan")
    print(f"toy_bench step_ratio={ratio:.3f} induction_seconds={induction_seconds:.1f}")


if __name__ == "__main__":
    main()
