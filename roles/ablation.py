"""Causal validation: ablate a head and measure the change of the task's metric.

The metric is the task's loss: cross-entropy on its target positions (for induction: the repeated part).
``effect[l, h] = loss(model with head (l, h) ablated) - loss(clean model)``, averaged over sequences, with its
standard error over sequences; a positive effect means the head helps the task. Ablations go through headlab's hook
point (never ``head_mask``, which recent transformers releases silently ignore):

* ``zero``: ``z_h := 0``;
* ``mean``: ``z_h :=`` its mean over the batch, per position;
* ``resample``: ``z_h :=`` its value on another batch of the same task (Chan et al. 2022, causal scrubbing);
* ``pattern_preserving=True`` (toy models): every head's attention pattern is frozen to its clean value while
  the head is ablated, so the effect only flows through values and the residual stream.

Exact ablation of a head in layer ``l`` reuses the clean run below it: the blocks before ``l`` return their cached
clean outputs instead of recomputing them, so the cost is that of the layers from ``l`` on (the prefix is exact, not
approximated). Models are run with their fast attention kernel (sdpa) when no pattern is needed.

A head is *functional* when its effect exceeds that of ablating random heads (heads with no detected function)
beyond noise (:func:`is_functional`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.stats import norm as normal
from scipy.stats import t as student_t
from torch import nn

from data.tasks import Batch
from headlab.errors import HeadlabError
from headlab.heads import HeadFn, HeadSite, head_sites, hook_heads
from headlab.interventions import mean_ablation, replace_heads, zero_ablation
from headlab.models import input_device
from roles.task_loss import task_losses

AblationKind = Literal["zero", "mean", "resample"]
Head = tuple[int, int]


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    device = input_device(model)
    return model(input_ids=input_ids.to(device)).logits.cpu()


@torch.no_grad()
def capture_z(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's head outputs ``z`` ``[batch, seq, heads, d_head]`` on ``input_ids``."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        captured[layer] = z.detach().clone()

    with hook_heads(model, keep):
        _logits(model, input_ids)
    return captured


@torch.no_grad()
def capture_run(model: nn.Module, batch: Batch) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward pass: every layer's head outputs ``z`` (as :func:`capture_z`) and the task losses ``[B]``."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        captured[layer] = z.detach().clone()

    with hook_heads(model, keep):
        losses = task_losses(model, batch["input_ids"], batch["targets"])
    return captured, losses


@contextmanager
def freeze_patterns(model: nn.Module, patterns: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Inside the block toy attention layer ``l`` uses ``patterns[l]`` ``[batch, heads, seq, seq]``."""
    modules = model.attention_modules() if hasattr(model, "attention_modules") else None
    if modules is None:
        raise HeadlabError(
            f"pattern-preserving ablation needs a headlab toy model, not {type(model).__name__}; "
            "use --detection.pattern_preserving false"
        )
    try:
        for module, pattern in zip(modules, patterns):
            module.pattern_override = pattern
        yield
    finally:
        for module in modules:
            module.pattern_override = None


@contextmanager
def fast_attention(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model with sdpa attention inside the block (no patterns are needed), then restore it."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switched = False
    if before == "eager" and getattr(type(model), "_supports_sdpa", False):
        try:
            model.set_attn_implementation("sdpa")
            switched = True
        except (ValueError, ImportError):  # an architecture without sdpa support keeps eager
            switched = False
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(before)


def ablation_fn(kind: AblationKind, heads: Iterable[Head], clean: dict, other: dict | None) -> HeadFn:
    """The hook function replacing ``heads``' outputs for ``kind``: ``clean`` and ``other`` hold the captured ``z``
    per layer, or (for ``mean``) ``clean`` may already hold the per-position means (:func:`position_means`)."""
    heads = list(heads)
    if kind == "zero":
        return zero_ablation(heads)
    if kind == "mean":
        means = clean if getattr(clean, "are_means", False) else position_means(clean)
        return mean_ablation(heads, means)
    if kind == "resample":
        return replace_heads(heads, other)
    raise HeadlabError(f"unknown ablation '{kind}'; choose zero, mean or resample")


class _Means(dict):
    are_means = True


def position_means(captured: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each layer's head outputs averaged over the batch, per position: ``[seq, heads, d_head]`` (mean ablation)."""
    return _Means({layer: z.mean(0) for layer, z in captured.items()})


@dataclass(frozen=True)
class AblationResult:
    """Per-head ablation effects ``[layer, head]`` (mean over sequences), their standard errors, the clean loss, and
    how each effect was measured (``exact`` ``[layer, head]``: True for an exact ablation, False for the
    attribution estimate of :mod:`roles.attribution`). ``reference`` ``[layer, head]`` marks the heads measured
    exactly *because they were drawn at random* (None: every head was measured, none selected): the reference a
    functional head is compared with must not hold heads chosen for their large estimated effects."""

    effect: torch.Tensor
    stderr: torch.Tensor
    clean_loss: float
    exact: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def method(self, layer: int, head: int) -> str:
        return "exact" if self.exact is None or bool(self.exact[layer, head]) else "attribution"


def _block_of(model: nn.Module, site: HeadSite) -> nn.Module:
    """The transformer block holding ``site``: its ancestor whose name ends in the layer index
    (``model.layers.3`` for ``model.layers.3.self_attn.o_proj``)."""
    parts = site.name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end - 1] == str(site.layer):
            return model.get_submodule(".".join(parts[:end]))
    raise HeadlabError(f"cannot find the block of {site.name}")


class PrefixCache:
    """The clean outputs of every block on one input, so that a run ablating layer ``l`` can skip blocks ``< l``.

    Inside :meth:`from_layer`, each block before ``l`` returns its cached clean output without computing anything;
    blocks from ``l`` on run as usual. Exact: the skipped blocks' inputs are unchanged by an edit at layer ``l``.
    """

    def __init__(self, model: nn.Module, sites: list[HeadSite]):
        self.model, self.sites = model, sites
        self.blocks = [_block_of(model, site) for site in sites]
        self.outputs: list[object] = [None] * len(self.blocks)

    def record(self) -> ExitStack:
        """Hooks that keep every block's output during the next forward pass (the clean one)."""
        stack = ExitStack()
        for index, block in enumerate(self.blocks):
            def keep(module, args, output, index=index):
                self.outputs[index] = output
            stack.callback(block.register_forward_hook(keep).remove)
        return stack

    @contextmanager
    def from_layer(self, layer: int) -> Iterator[None]:
        skipped = self.blocks[:layer]
        try:
            for block, output in zip(skipped, self.outputs):
                block.forward = lambda *args, output=output, **kwargs: output  # instance attribute shadows the method
            yield
        finally:
            for block in skipped:
                block.__dict__.pop("forward", None)


@torch.no_grad()
def ablation_effects(
    model: nn.Module,
    batch: Batch,
    kind: AblationKind = "mean",
    other_batch: Batch | None = None,
    pattern_preserving: bool = False,
    heads: Iterable[Head] | None = None,
) -> AblationResult:
    """Exact effect of ablating each head alone: ``effect[l, h] = mean_b (loss_b(ablated) - loss_b(clean))`` with
    ``loss_b`` the cross-entropy over sequence ``b``'s target positions, and its standard error over sequences.

    ``heads`` limits the ablations to those heads (the others get NaN); ``other_batch`` supplies the resampled head
    outputs for ``kind="resample"`` (default: the batch rolled by one sequence).
    """
    was_training = model.training
    model.eval()
    try:
        ids, targets = batch["input_ids"], batch["targets"]
        sites = head_sites(model)
        prefix = PrefixCache(model, sites)
        context = fast_attention(model) if not pattern_preserving else nullcontext()
        with context:
            with prefix.record():  # the clean run: head outputs, every block's output and the loss
                captured, clean = capture_run(model, batch)  # clean [B]
            if kind == "mean":
                captured = position_means(captured)
            other = None
            if kind == "resample":
                other = capture_z(model, other_batch["input_ids"] if other_batch is not None else ids.roll(1, dims=0))
            frozen = nullcontext()
            if pattern_preserving:
                frozen = freeze_patterns(model, model(input_ids=ids, output_attentions=True).attentions)
            chosen = [(s.layer, h) for s in sites for h in range(s.n_heads)] if heads is None else list(heads)
            effect = torch.full((len(sites), sites[0].n_heads), float("nan"))
            stderr = effect.clone()
            with frozen:
                for layer, head in sorted(chosen):
                    reuse = prefix.from_layer(layer) if not pattern_preserving else nullcontext()
                    with reuse, hook_heads(model, ablation_fn(kind, [(layer, head)], captured, other), sites=sites):
                        diff = task_losses(model, ids, targets) - clean  # [B]
                    effect[layer, head] = diff.mean()
                    stderr[layer, head] = diff.std() / len(diff) ** 0.5
    finally:
        model.train(was_training)
    return AblationResult(effect, stderr, float(clean.mean()), ~effect.isnan())


def is_functional(
    effect: torch.Tensor,
    stderr: torch.Tensor,
    detected: torch.Tensor,
    reference: float,
    n_sigma: float = 3.0,
    min_effect: float = 0.01,
    spread: tuple[float, int] | None = None,
) -> torch.Tensor:
    """Which detected heads are causally responsible: ``effect - reference > max(n_sigma * stderr, min_effect,
    t_{n-1}(Phi(n_sigma)) * s * sqrt(1 + 1/n))``.

    ``reference`` is the mean effect of ablating a random head, one with no detected function (see
    :func:`random_head_reference`): a detected head is functional when its ablation hurts the task more than that,
    by more than the sampling noise of its own effect and by at least ``min_effect`` nats (a floor for a loss
    near 0, where the noise vanishes too). ``spread = (s, n)``, the standard deviation of those ``n`` reference
    heads' effects (:func:`random_head_spread`), adds the third term: the head must also lie outside the one-sided
    prediction interval of another random head's effect, at the normal tail probability of ``n_sigma``
    (Student's t with ``n - 1`` degrees of freedom; Geisser 1993, "Predictive Inference", ch. 2). Heads of a
    random model differ in how much they matter, and their sampling noise does not show it: without this term 2.5%
    of the heads of random toy models were called functional (``python -m roles.calibrate``). ``effect``,
    ``stderr``, ``detected``: ``[layer, head]``. A head whose effect was not measured exactly (NaN standard error) is
    never functional.
    """
    margin = (n_sigma * stderr).clamp_min(min_effect)
    if spread is not None and spread[1] >= 2 and spread[0] > 0:
        s, n = spread
        quantile = float(student_t.ppf(normal.cdf(n_sigma), n - 1))
        margin = margin.clamp_min(quantile * s * math.sqrt(1 + 1 / n))
    return detected & (effect - reference > margin) & ~stderr.isnan()


@torch.no_grad()
def group_effect(
    model: nn.Module,
    batch: Batch,
    heads: list[Head],
    kind: AblationKind = "mean",
    other_batch: Batch | None = None,
) -> float:
    """Loss change when all ``heads`` are ablated together (redundant heads hide from one-at-a-time ablation)."""
    return group_effects(model, batch, [heads], kind, other_batch)[0]


@torch.no_grad()
def group_effects(model: nn.Module, batch: Batch, groups: list[list[Head]], kind: AblationKind = "mean",
                  other_batch: Batch | None = None) -> list[float]:
    """:func:`group_effect` of each group, sharing one clean pass: ``mean_b (loss_b(group ablated) - loss_b)``."""
    was_training = model.training
    model.eval()
    try:
        ids, targets = batch["input_ids"], batch["targets"]
        with fast_attention(model):
            captured, clean = capture_run(model, batch)
            if kind == "mean":
                captured = position_means(captured)
            other = None
            if kind == "resample":
                other = capture_z(model, other_batch["input_ids"] if other_batch is not None else ids.roll(1, dims=0))
            effects = []
            for heads in groups:
                if not heads:
                    effects.append(0.0)
                    continue
                with hook_heads(model, ablation_fn(kind, heads, captured, other)):
                    effects.append(float((task_losses(model, ids, targets) - clean).mean()))
    finally:
        model.train(was_training)
    return effects


def random_head_reference(effect: torch.Tensor, detected_any: torch.Tensor) -> float:
    """Mean ablation effect of the heads with no detected function (``detected_any`` false) that were measured
    (not NaN), 0 when there is none.

    Heads detected for another role are not random: in an induction circuit the previous-token heads of layer 0
    matter more, one by one, than each of several redundant induction heads, and must not set the bar for them.
    """
    others = effect[~detected_any & ~effect.isnan()]
    return float(others.mean()) if others.numel() else 0.0


def random_head_spread(effect: torch.Tensor, detected_any: torch.Tensor) -> tuple[float, int]:
    """``(s, n)``: the sample standard deviation of the effects :func:`random_head_reference` averages, and their
    number (``s = 0`` below two heads, where :func:`is_functional` leaves the spread out)."""
    others = effect[~detected_any & ~effect.isnan()]
    return (float(others.std()) if others.numel() >= 2 else 0.0), int(others.numel())
