"""The Lightning module that trains one linear probe per (layer, head) at once, and its minibatch training loop.

Weights are ``[fits, heads, d_head, outputs]`` (a fit is the task, the control task or a cross-validation fold);
scores are one batched einsum, and the loss is summed over fits and heads, so every probe gets exactly the gradient
it would get alone (Adam's update is elementwise, so the probes also train independently under Adam).
Inputs are standardised inside the module with training-row statistics; the penalty (see :mod:`probes.config`)
applies to the standardised weights, and :meth:`AllHeadsProbe.raw_weights` maps them back to activation space.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from data import HeadCache
from headlab.tracking import quiet_libraries
from probes.config import ProbeConfig
from probes.data import ProbeDataModule, ProbeProblem
from probes.newton import HeadFits


class AllHeadsProbe(pl.LightningModule):
    """Linear probes for every (fit, head): ``scores [batch, fits, heads, outputs] = x_std . W + b``.

    ``targets [rows, fits]`` and ``weights [rows, fits]`` (class weight on the fit's training rows, else 0) are
    indexed by the row ids each batch carries, so one stream of rows trains every fit.
    """

    def __init__(self, n_heads: int, d_head: int, n_fits: int, kind: str, n_classes: int, l2: float, l1: float,
                 lr: float, mean: torch.Tensor, std: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 val_rows: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["mean", "std", "targets", "weights", "val_rows"])
        self.kind, self.n_classes = kind, n_classes
        outputs = n_classes if kind == "multiclass" else 1
        self.weight = torch.nn.Parameter(torch.zeros(n_fits, n_heads, d_head, outputs))  # [fits, heads, d, out]
        self.bias = torch.nn.Parameter(torch.zeros(n_fits, n_heads, outputs))
        self.register_buffer("mean", mean)  # [heads, d_head]
        self.register_buffer("std", std)  # [heads, d_head]
        self.register_buffer("targets", targets, persistent=False)  # [rows, fits]
        self.register_buffer("row_weights", weights, persistent=False)  # [rows, fits]
        is_val = torch.zeros(targets.shape[0], dtype=torch.bool)
        if val_rows is not None:
            is_val[val_rows] = True
        self.register_buffer("is_val", is_val, persistent=False)
        self.register_buffer("best_loss", torch.full((n_fits, n_heads), float("inf")), persistent=False)
        self.register_buffer("best_weight", self.weight.detach().clone(), persistent=False)
        self.register_buffer("best_bias", self.bias.detach().clone(), persistent=False)
        self._val_sum: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, heads, d_head]`` -> scores ``[batch, fits, heads, outputs]``."""
        x = (x - self.mean) / self.std
        return torch.einsum("bhd,fhdk->bfhk", x, self.weight) + self.bias

    def per_row_loss(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Loss of every row for every probe: ``[batch, fits, heads]``."""
        y = self.targets[rows]  # [batch, fits]
        heads = scores.shape[2]
        if self.kind == "binary":
            target = y[:, :, None].expand(-1, -1, heads).to(scores.dtype)
            return F.binary_cross_entropy_with_logits(scores[..., 0], target, reduction="none")
        if self.kind == "multiclass":
            flat = scores.reshape(-1, scores.shape[-1])
            target = y[:, :, None].expand(-1, -1, heads).reshape(-1).long()
            return F.cross_entropy(flat, target, reduction="none").reshape(scores.shape[:3])
        return 0.5 * (scores[..., 0] - y[:, :, None].to(scores.dtype)) ** 2

    def penalty(self) -> torch.Tensor:
        """``sum over probes of (l2 / 2) |W|^2 + l1 |W|_1`` (standardised space, bias unpenalised)."""
        hp = self.hparams
        out = 0.5 * hp.l2 * (self.weight**2).sum()
        return out + hp.l1 * self.weight.abs().sum() if hp.l1 else out

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, rows = batch
        w = self.row_weights[rows]  # [batch, fits]
        loss = self.per_row_loss(self(x), rows)  # [batch, fits, heads]
        # each probe: weighted mean over its training rows in this batch; summed over probes
        data = (loss * w[:, :, None]).sum(0) / w.sum(0).clamp_min(1e-12)[:, None]
        total = data.sum() + self.penalty()
        self.log("train_loss", total / (loss.shape[1] * loss.shape[2]), on_step=False, on_epoch=True)
        return total

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros_like(self.best_loss)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, rows = batch
        self._val_sum += self.per_row_loss(self(x), rows).sum(0)

    def on_validation_epoch_end(self) -> None:
        val = self._val_sum / max(int(self.is_val.sum()), 1)  # [fits, heads]
        better = val < self.best_loss
        self.best_loss = torch.where(better, val, self.best_loss)
        self.best_weight[better] = self.weight.detach()[better]
        self.best_bias[better] = self.bias.detach()[better]
        self.log("val_loss", val.mean())
        # non-increasing; early stopping on it stops once no probe has improved for `patience` epochs
        self.log("val_best_loss", self.best_loss.mean())
        self.log("val_heads_improved", better.float().mean())

    def use_best(self) -> None:
        """Give every probe the weights of its own lowest validation loss (when validation ran)."""
        seen = torch.isfinite(self.best_loss)
        with torch.no_grad():
            self.weight[seen] = self.best_weight[seen]
            self.bias[seen] = self.best_bias[seen]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def raw_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights and bias in activation space: ``W / std`` and ``b - sum_d mean W / std``."""
        with torch.no_grad():
            w = self.weight / self.std[None, :, :, None]
            b = self.bias - (self.mean[None, :, :, None] * w).sum(2)
        return w.numpy(), b.numpy()


def fit_adam(cache: HeadCache, problem: ProbeProblem, probe: ProbeConfig, logger, seed: int,
             run_dir: str | None = None) -> HeadFits:
    """Train every fit's probes with Adam on minibatches streamed from ``cache`` (early stopping on validation
    rows in holdout mode), then score every row."""
    pl.seed_everything(seed, verbose=False)
    fits = problem.fits
    train_sets = [problem.train_mask(f) for f in fits]
    train_rows = np.flatnonzero(np.any(train_sets, axis=0))
    val_rows = None
    if "val" in problem.part_names and probe.patience > 0:
        val_rows = np.flatnonzero(problem.parts == problem.part_names.index("val"))
    dm = ProbeDataModule(cache, train_rows, val_rows, probe.batch_size, seed)
    if probe.standardize:
        mean, std = dm.moments(train_rows)
    else:
        n_heads = len(cache.layers) * cache.n_heads
        mean, std = torch.zeros(n_heads, cache.d_head), torch.ones(n_heads, cache.d_head)
    targets = torch.from_numpy(np.stack([f.target for f in fits], 1))
    weights = torch.from_numpy(np.stack([m * problem.sample_weight for m in train_sets], 1)).float()
    module = AllHeadsProbe(mean.shape[0], mean.shape[1], len(fits), problem.kind, problem.n_classes, probe.l2,
                           probe.l1, probe.lr, mean, std, targets, weights,
                           None if val_rows is None else torch.from_numpy(val_rows))
    callbacks = []
    if val_rows is not None:
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping("val_best_loss", patience=probe.patience, mode="min", min_delta=0.0))
    quiet_libraries()
    trainer = pl.Trainer(max_epochs=probe.epochs, logger=logger, callbacks=callbacks, accelerator="cpu",
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_progress_bar=sys.stdout.isatty(), log_every_n_steps=1, default_root_dir=run_dir,
                         limit_val_batches=1.0 if val_rows is not None else 0,
                         reload_dataloaders_every_n_epochs=1)  # a new row shuffle every epoch
    trainer.fit(module, datamodule=dm)
    module.use_best()
    module.eval()
    n_rows = cache.rows
    scores = np.zeros((len(fits), n_rows, mean.shape[0], problem.outputs), np.float32)
    with torch.no_grad():
        for x, rows in dm.predict_dataloader():
            scores[:, rows.numpy()] = module(x).permute(1, 0, 2, 3).numpy()
    w, b = module.raw_weights()
    epochs = np.full(mean.shape[0], trainer.current_epoch, np.int64)
    return HeadFits(w, b, scores, epochs, np.ones((len(fits), mean.shape[0]), bool))
