"""Training a toy transformer on a task: the config groups, the data module and the Lightning module.

The LightningModule says what to optimise (cross-entropy on the task's target positions only), the DataModule
where batches come from (the task's seeded infinite stream), the Trainer how to run
(:func:`toymodels.run.make_trainer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from torch.utils.data import DataLoader, IterableDataset

from data.tasks import Batch, Task, target_accuracy, target_loss
from headlab.errors import at_least, require
from toymodels.modeling import ToyTransformer, ToyTransformerConfig


@dataclass(frozen=True)
class ToyConfig:
    """Architecture of the toy transformer (vocabulary size and context length come from the task)."""

    n_layers: int = 2
    """number of transformer blocks"""
    n_heads: int = 4
    """attention heads per block"""
    d_model: int = 64
    """width of the residual stream"""
    d_head: int | None = None
    """width of each head (default d_model / n_heads)"""
    attn_only: bool = True
    """attention-only blocks (no MLPs)"""
    d_mlp: int | None = None
    """MLP hidden width when attn_only is false (default 4 * d_model)"""
    layer_norm: bool = True
    """LayerNorm before attention, MLP and unembedding (false: identity)"""
    positional: Literal["learned", "rotary", "shortformer", "none"] = "learned"
    """positional encoding: learned (residual stream), rotary, shortformer (q and k only) or none"""
    tie_embeddings: bool = False
    """share the embedding and unembedding matrices"""

    def __post_init__(self) -> None:
        at_least("model.n_layers", self.n_layers, 1)
        at_least("model.n_heads", self.n_heads, 1)
        at_least("model.d_model", self.d_model, 1)
        at_least("model.d_head", self.d_head, 1, optional=True)
        at_least("model.d_mlp", self.d_mlp, 1, optional=True)
        require(self.d_head is not None or self.d_model % self.n_heads == 0,
                f"--model.d_model {self.d_model} is not a multiple of --model.n_heads {self.n_heads}; change one "
                "or set --model.d_head")
        d_head = self.d_head or self.d_model // self.n_heads
        require(self.positional != "rotary" or d_head % 2 == 0,
                f"rotary positions need an even head width, got {d_head}; change --model.d_head or --model.d_model")

    def hf_config(self, vocab_size: int, n_positions: int, **extra) -> ToyTransformerConfig:
        return ToyTransformerConfig(
            vocab_size=vocab_size,
            max_position_embeddings=n_positions,
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            head_dim=self.d_head,
            attn_only=self.attn_only,
            intermediate_size=self.d_mlp,
            layer_norm=self.layer_norm,
            positional=self.positional,
            tie_word_embeddings=self.tie_embeddings,
            **extra,
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and emergence-tracking schedule."""

    steps: int = 1000
    """optimizer steps (the default induction run forms its induction head at ~600)"""
    batch_size: int = 64
    """sequences per step"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay (grokking needs ~1.0)"""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas"""
    warmup_steps: int = 0
    """linear learning-rate warmup steps"""
    track_every: int = 50
    """score all heads every this many steps (plus a log-spaced schedule early on)"""
    eval_batch_size: int = 128
    """sequences in the fixed evaluation batch (task metric, ablation)"""
    log_every: int = 50
    """log the training loss every this many steps"""
    accelerator: str = "cpu"
    """where training runs: cpu, gpu, mps or auto (Lightning's names); detection and ablation always run on a CPU
    copy. One toy model is too small to pay for a GPU; stacked seeds (--seeds N) are where one pays"""

    def __post_init__(self) -> None:
        at_least("train.steps", self.steps, 1)
        at_least("train.batch_size", self.batch_size, 1)
        require(self.lr > 0, f"--train.lr {self.lr} must be positive")
        at_least("train.weight_decay", self.weight_decay, 0)
        require(all(0 <= b < 1 for b in self.betas), f"--train.betas {list(self.betas)} must lie in [0, 1)")
        at_least("train.warmup_steps", self.warmup_steps, 0)
        at_least("train.track_every", self.track_every, 1)
        at_least("train.eval_batch_size", self.eval_batch_size, 2)
        at_least("train.log_every", self.log_every, 1)
        names = sorted({"auto", "gpu", *AcceleratorRegistry.available_accelerators()})
        require(self.accelerator in names,
                f"--train.accelerator {self.accelerator!r} is not one of Lightning's accelerators: pass one of "
                f"{', '.join(names)}")
        if self.accelerator not in ("auto", "cpu"):
            require(_available(self.accelerator),
                    f"--train.accelerator {self.accelerator} is not available on this machine: pass cpu or auto")


def _available(accelerator: str) -> bool:
    """Whether Lightning can use ``accelerator`` here (``gpu`` is its alias of ``cuda``); an accelerator whose
    package is missing (``tpu`` without torch_xla) is not available."""
    try:
        return bool(AcceleratorRegistry.get("cuda" if accelerator == "gpu" else accelerator).is_available())
    except (ImportError, RuntimeError):
        return False


class TaskStream(IterableDataset):
    """A task's infinite, seeded batch stream (batches are already collated)."""

    def __init__(self, task: Task, batch_size: int, seed: int) -> None:
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.task.stream(self.batch_size, self.seed):
            yield {"input_ids": batch["input_ids"], "targets": batch["targets"]}


class TaskDataModule(pl.LightningDataModule):
    def __init__(self, task: Task, batch_size: int, seed: int) -> None:
        super().__init__()
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TaskStream(self.task, self.batch_size, self.seed), batch_size=None, num_workers=0)


class ToyLitModule(pl.LightningModule):
    """Trains a :class:`ToyTransformer` with cross-entropy on the task's target positions only."""

    def __init__(self, model: ToyTransformer, train: TrainConfig) -> None:
        super().__init__()
        self.model, self.train_config = model, train
        self.train_log: list[tuple[int, float]] = []  # (step, loss) every log_every steps, for the loss plot

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits  # [B, T, V]

    def on_fit_start(self) -> None:
        # Sharp attention makes tiny gradients that underflow into subnormal floats; on x86 CPUs each subnormal
        # operation is ~100x slower, which turned a 4 s toy run into 100 s. Flush them to zero while training.
        torch.set_flush_denormal(True)

    def on_fit_end(self) -> None:
        torch.set_flush_denormal(False)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"])
        loss = target_loss(logits, batch["targets"])
        if (self.global_step + 1) % self.train_config.log_every == 0:  # the steps the Trainer flushes
            self.train_log.append((self.global_step, float(loss.detach())))
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
            self.log("train/accuracy", target_accuracy(logits.detach(), batch["targets"]), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.model.parameters(), self.train_config)


def make_optimizer(parameters, cfg: TrainConfig):
    """AdamW with an optional linear warmup, as Lightning's ``configure_optimizers`` returns it."""
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    if cfg.warmup_steps <= 0:
        return optimizer
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
