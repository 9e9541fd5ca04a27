"""Several seeds of one toy model trained side by side in one process: stacked parameters, one vmapped forward.

``n`` :class:`~toymodels.modeling.ToyTransformer` s of the same architecture (one per seed, each initialised exactly as
a single ``toy --seed s`` run) have their parameters stacked on a leading seed dimension (``torch.func``'s
``stack_module_state``). The forward is ``vmap(functional_call(template, params_s, input_ids_s))`` over that
dimension, so the model code is the one :class:`ToyTransformer`; the attention folds the seed dimension into its
batch (:class:`CausalAttention`). The loss is the *sum* of the per-seed losses, so each seed's
slice of every stacked parameter receives exactly its own gradient, and AdamW (element-wise) updates each slice
exactly as it would update that seed alone: the stacked run is the ``n`` single runs up to floating-point
reassociation (``tests/test_seeds.py`` checks it).

Each seed keeps its own data stream (``task.stream(batch_size, seed)``), evaluation batches and null thresholds; at
every tracked step and at the end the stacked weights are copied into ``n`` ordinary models
(:meth:`StackedToyModel.write_to`) that every detector, ablation and ``save_pretrained`` use unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, IterableDataset

from data.tasks import Batch, Task, target_accuracy, target_loss
from toymodels.emergence import EmergenceTracker
from toymodels.modeling import ToyTransformer
from toymodels.training import TrainConfig, make_optimizer


def _fused_cpu_kernel(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


class CausalAttention(torch.autograd.Function):
    """Causal scaled-dot-product attention whose ``vmap`` folds the vmapped dimension into the batch.

    ``F.scaled_dot_product_attention`` has no batching rule, so under ``torch.func.vmap`` (several seeds trained as
    one stacked model, :mod:`toymodels.stacked`) PyTorch would loop over the vmapped dimension and, in the backward,
    zero-fill a full-size gradient per slice. Here the ``n`` stacked models' ``[n, B, H, T, dh]`` become one
    ``[n * B, H, T, dh]`` call of the fused kernel. On CPU the forward keeps the fused kernel's log-sum-exp for its
    backward kernel; elsewhere the backward recomputes the forward. Returns ``(z, logsumexp or None)``.
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _fused_cpu_kernel(q):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), q.new_zeros(0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, logsumexp = ctx.saved_tensors
        if logsumexp.numel():
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad.contiguous(), q, k, v, out, logsumexp, 0.0, True
            )
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            recomputed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(recomputed, (q, k, v), grad)

    @staticmethod
    def vmap(info, in_dims, q, k, v) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int | None]]:
        n = info.batch_size
        stacked = [t.movedim(d, 0) if d is not None else t.expand(n, *t.shape) for t, d in zip((q, k, v), in_dims)]
        out, logsumexp = CausalAttention.apply(*(t.reshape(-1, *t.shape[2:]) for t in stacked))
        if not logsumexp.numel():
            return (out.view(n, -1, *out.shape[1:]), logsumexp), (0, None)
        return (out.view(n, -1, *out.shape[1:]), logsumexp.view(n, -1, *logsumexp.shape[1:])), (0, 0)


def vmappable_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`toymodels.modeling.causal_attention` for a stacked model's template (see :class:`CausalAttention`)."""
    return CausalAttention.apply(q, k, v)[0]


def _key(name: str) -> str:  # ParameterDict keys cannot contain dots
    return name.replace(".", "__")


class StackedToyModel(nn.Module):
    """``n`` toy transformers as one module: parameters ``[n, ...]``, ``forward`` ``[n, B, T] -> [n, B, T, V]``."""

    def __init__(self, models: Sequence[ToyTransformer]) -> None:
        super().__init__()
        if not models:
            raise ValueError("need at least one model to stack")
        self.n = len(models)
        template = copy.deepcopy(models[0]).to("meta")  # structure only; its weights come from the stack
        for attention in template.attention_modules():
            attention.attention_kernel = vmappable_causal_attention
        object.__setattr__(self, "template", template)  # not a submodule: its meta parameters are not trained
        params, buffers = stack_module_state(list(models))
        if buffers:  # they would have to be stacked and moved with the module too; the toy model has none
            raise ValueError(f"cannot stack models with buffers ({', '.join(buffers)})")
        self.names = list(params)
        # Tied weights (lm_head = embed with tie_embeddings) appear once in ``params``; name every alias of each.
        first: dict[int, str] = {}
        self.aliases = {
            name: first.setdefault(id(p), name) for name, p in models[0].named_parameters(remove_duplicate=False)
        }
        self.stack = nn.ParameterDict({_key(name): nn.Parameter(value) for name, value in params.items()})

    def stacked(self) -> dict[str, torch.Tensor]:
        return {alias: self.stack[_key(name)] for alias, name in self.aliases.items()}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, B, T, V]`` of ``input_ids`` ``[n, B, T]`` (seed ``s`` reads ``input_ids[s]``)."""

        def one(params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, params, (ids,)).logits

        return vmap(one)(self.stacked(), input_ids)

    @torch.no_grad()
    def write_to(self, models: Sequence[ToyTransformer]) -> None:
        """Copy each seed's slice of the stacked weights into its own ordinary model."""
        for index, model in enumerate(models):
            own = dict(model.named_parameters())
            for name in self.names:
                own[name].copy_(self.stack[_key(name)][index])


class StackedTaskStream(IterableDataset):
    """Each seed's own batch stream, stacked: ``input_ids`` and ``targets`` ``[n, B, T]``."""

    def __init__(self, task: Task, batch_size: int, seeds: Sequence[int]) -> None:
        self.task, self.batch_size, self.seeds = task, batch_size, list(seeds)

    def __iter__(self) -> Iterator[Batch]:
        streams = [self.task.stream(self.batch_size, seed) for seed in self.seeds]
        for batches in zip(*streams):
            yield {key: torch.stack([b[key] for b in batches]) for key in ("input_ids", "targets")}


class StackedTaskDataModule(pl.LightningDataModule):
    def __init__(self, task: Task, batch_size: int, seeds: Sequence[int]) -> None:
        super().__init__()
        self.task, self.batch_size, self.seeds = task, batch_size, list(seeds)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StackedTaskStream(self.task, self.batch_size, self.seeds), batch_size=None, num_workers=0)


class StackedToyLitModule(pl.LightningModule):
    """Trains a :class:`StackedToyModel` on the sum of its seeds' target-position cross-entropies.

    Logs ``train/loss`` (the mean over seeds, what a sweep's pruner watches) and ``seed{s}/train/loss``.
    """

    def __init__(self, model: StackedToyModel, train: TrainConfig, seeds: Sequence[int]) -> None:
        super().__init__()
        self.model, self.train_config, self.seeds = model, train, list(seeds)
        self.train_logs: list[list[tuple[int, float]]] = [[] for _ in self.seeds]  # per seed (step, loss)

    def on_fit_start(self) -> None:
        torch.set_flush_denormal(True)  # see ToyLitModule.on_fit_start

    def on_fit_end(self) -> None:
        torch.set_flush_denormal(False)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["input_ids"])  # [n, B, T, V]
        losses = torch.stack([target_loss(logits[s], batch["targets"][s]) for s in range(len(self.seeds))])
        if (self.global_step + 1) % self.train_config.log_every == 0:
            values = losses.detach()
            for s, seed in enumerate(self.seeds):
                self.train_logs[s].append((self.global_step, float(values[s])))
                self.log(f"seed{seed}/train/loss", values[s], on_step=True, on_epoch=False)
            self.log("train/loss", values.mean(), on_step=True, on_epoch=False)
            accuracy = torch.stack(
                [target_accuracy(logits[s].detach(), batch["targets"][s]) for s in range(len(self.seeds))]
            )
            self.log("train/accuracy", accuracy.mean(), on_step=True, on_epoch=False)
        return losses.sum()  # seeds are independent: each slice gets its own seed's gradient

    def configure_optimizers(self):
        return make_optimizer(self.model.parameters(), self.train_config)


class StackedEmergenceTracker(pl.Callback):
    """Runs each seed's :class:`EmergenceTracker` on that seed's ordinary model, refreshed from the stack."""

    def __init__(
        self,
        stacked: StackedToyModel,
        models: Sequence[ToyTransformer],
        trackers: Sequence[EmergenceTracker],
        seeds: Sequence[int],
    ) -> None:
        self.stacked, self.models, self.trackers, self.seeds = stacked, list(models), list(trackers), list(seeds)
        self.schedule = trackers[0].schedule

    def _measure(self, trainer: pl.Trainer, step: int) -> None:
        self.stacked.write_to(self.models)
        for model, tracker, seed in zip(self.models, self.trackers, self.seeds):
            tracker.measure(model, step, trainer.logger, prefix=f"seed{seed}/")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for tracker in self.trackers:
            tracker.start_clock()
        self._measure(trainer, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last = self.trackers[0].history[-1].step if self.trackers[0].history else None
        if step in self.schedule and last != step:
            self._measure(trainer, step)
