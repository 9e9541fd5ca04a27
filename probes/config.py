"""Options of ``train.py probe``: small frozen dataclasses whose attribute docstrings become ``--help``.

The regularised objective every backend minimises, per (layer, head) probe with weights ``w`` and bias ``b``::

    L(w, b) = (1/n) * sum_i s_i * loss(y_i, x_i . w + b) + (l2 / 2) * sum_j sigma_j^2 w_j^2 + l1 * sum_j sigma_j |w_j|

``loss`` is the logistic / softmax cross-entropy (classifiers) or half the squared error (regression), ``s_i`` the
class weight of row i (1 without class weighting), ``sigma_j`` the training std of feature j when ``standardize``
(else 1; penalising ``sigma_j w_j`` in raw space is the same as penalising ``w`` on standardised inputs) and the
bias is not penalised. In scikit-learn's terms: ``LogisticRegression(C=1/(l2*n))`` on ``StandardScaler`` output,
``Ridge(alpha=l2*n)`` for regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from headlab.errors import at_least, require
from headlab.statistics import draws_for

Backend = Literal["headlab", "sklearn"]
Solver = Literal["auto", "newton", "adam"]
ClassWeight = Literal["none", "balanced"]


@dataclass(frozen=True)
class ProbeConfig:
    """How each head's probe is trained."""

    label: str | None = None
    """Label column of the cache to probe (default: the only one; required when the cache has several)."""
    backend: Backend = "headlab"
    """``headlab``: every head at once (Lightning module); ``sklearn``: a per-head LogisticRegression/Ridge loop
    (the reference, as in the Inference-Time Intervention code)."""
    solver: Solver = "auto"
    """``newton``: full-batch bound-optimisation Newton steps per head block (exact optimum, L2 only);
    ``adam``: minibatch training of the Lightning module streamed from the cache (any penalty, early stopping);
    ``auto``: newton unless l1 > 0."""
    l2: float = 1e-3
    """L2 penalty on the (standardised) weights, per row of the mean loss: sklearn C = 1/(l2 * n_train)."""
    l1: float = 0.0
    """L1 penalty on the (standardised) weights (adam solver / sklearn saga)."""
    standardize: bool = True
    """Scale every feature to zero mean and unit variance on the training rows (done inside the solver)."""
    class_weight: ClassWeight = "none"
    """``balanced``: weight row i by n / (n_classes * n_class(i)) on the training rows."""
    lr: float = 1e-2
    """Adam learning rate (adam solver)."""
    epochs: int = 50
    """Maximum epochs (adam solver)."""
    batch_size: int = 256
    """Rows per minibatch (adam solver)."""
    patience: int = 5
    """Early stopping: epochs without a lower validation loss before training stops (adam solver, holdout split);
    each head keeps its weights from its own best validation epoch. 0: no early stopping, train every epoch and
    keep the last weights (the regularised optimum, comparable with the other backends)."""
    max_iter: int = 50
    """Maximum Newton iterations per head block (newton solver)."""
    tol: float = 1e-4
    """Newton stops when every head's largest gradient entry is below this (scikit-learn's lbfgs default)."""
    device: str = "auto"
    """Where the newton solver's passes over the data run: ``auto`` (the first CUDA device when present, else the
    CPU), ``cpu``, ``cuda`` or ``cuda:N``. Head blocks stream from the cache, so device memory holds one block per
    worker, never the whole cache."""

    def __post_init__(self) -> None:
        at_least("probe.l2", self.l2, 0)
        at_least("probe.l1", self.l1, 0)
        require(self.lr > 0, f"--probe.lr {self.lr} must be positive")
        at_least("probe.epochs", self.epochs, 1)
        at_least("probe.batch_size", self.batch_size, 1)
        at_least("probe.patience", self.patience, 0)
        at_least("probe.max_iter", self.max_iter, 1)
        require(self.tol > 0, f"--probe.tol {self.tol} must be positive")


@dataclass(frozen=True)
class SplitConfig:
    """Which rows train, rank and report. Heads are ranked on validation rows and reported on test rows, never on
    the rows that chose them (the best of 1,000 heads on its own selection data is biased upward)."""

    seed: int = 0
    """Seed of the row (or group) shuffle: the same seed gives the same split."""
    val_fraction: float = 0.2
    """Share of rows (holdout) used to rank heads."""
    test_fraction: float = 0.2
    """Share of rows held out for the reported scores (both modes)."""
    folds: int = 0
    """0: holdout train/val/test. k >= 2: k-fold cross-validation on the non-test rows (heads ranked on the mean
    held-out-fold score, spread reported), the test rows scored by a probe trained on all non-test rows."""
    group_column: str | None = "group"
    """Label column whose equal values stay on one side of every split (e.g. answers to one question); used when
    the cache has it, ignored otherwise. Set to null to split rows independently."""

    def __post_init__(self) -> None:
        for name, value in [("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)]:
            require(0 < value < 1, f"--split.{name} {value} is not between 0 and 1")
        require(self.folds == 0 or self.folds >= 2,
                f"--split.folds {self.folds}: use 0 for holdout or k >= 2 for k-fold")


@dataclass(frozen=True)
class ControlConfig:
    """Controls and uncertainty: a score alone proves little."""

    control_task: bool = True
    """Train the same probe on control labels (Hewitt & Liang 2019) and report selectivity."""
    control_column: str | None = None
    """Input type for the control task: rows sharing a value get the same random label. Default: the group
    column when the cache has one, else the dataset example each row came from, examples with identical
    activations (the same text twice) counting as one type."""
    permutations: int = 1000
    """Label permutations of the test rows for each head's p-value of beating chance (0: skip)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the test rows (of groups, when grouped) for confidence intervals."""
    confidence: float = 0.95
    """Confidence level of every interval."""
    calibration_bins: int = 10
    """Equal-width confidence bins of the expected calibration error."""

    def __post_init__(self) -> None:
        at_least("control.permutations", self.permutations, 0)
        at_least("control.bootstrap", self.bootstrap, 0)
        require(0 < self.confidence < 1, f"--control.confidence {self.confidence} is not between 0 and 1")
        at_least("control.calibration_bins", self.calibration_bins, 1)


@dataclass(frozen=True)
class ReportConfig:
    """What the run directory and W&B receive."""

    top_k: int | None = None
    """Heads listed in summary.json and boxed in the heatmap (chosen on validation, reported on test); default 10,
    or every head when the cache has fewer."""
    metric: str | None = None
    """Heatmap metric (a heads.csv column); default accuracy (classification) or r2 (regression)."""

    def __post_init__(self) -> None:
        at_least("report.top_k", self.top_k, 1, optional=True)


@dataclass(frozen=True)
class SteerConfig:
    """The causal check: add alpha * std * direction to the top heads' outputs and watch the model's output."""

    enabled: bool = False
    """Run the steering check after probing (loads the cache's model and dataset)."""
    top_k: int | None = None
    """Heads steered together (the top heads by validation score); default 5, or every head when fewer."""
    alpha: float = 5.0
    """Shift size in units of the activations' std along each direction (ITI's alpha)."""
    direction: Literal["mass_mean", "probe"] = "mass_mean"
    """Which direction to add: the mass-mean direction (as in ITI) or the probe weight vector."""
    random_directions: int = 39
    """Random directions of equal norm on the same heads, the baseline the probe direction must beat. The p-value
    cannot go below 1 / (random_directions + 1), so at least 1 / significance - 1 are needed."""
    significance: float = 0.05
    """The check passes when its Monte Carlo p-value is at most this and the shift is positive."""
    max_prompts: int = 64
    """Held-out (test) examples to steer on."""
    continuations: tuple[str, str] | None = None
    """Two continuations (e.g. " True", " False") whose logit difference is the readout (causal LMs). Without
    them the readout is the final hidden state projected on its class-mean difference."""
    model: str | None = None
    """Model to steer (default: the cache's model id)."""
    device: str = "cpu"
    """Device for the steering forward passes."""
    device_map: str | None = None
    """Spread the steered model over GPUs, CPU and disk with accelerate (auto, balanced, balanced_low_0,
    sequential) instead of --steer.device; the steering hooks see each layer's values wherever it lives."""
    max_memory: dict[str, str] | None = None
    """Per-device memory for --steer.device_map, e.g. '{"0": "70GiB", "cpu": "200GiB"}'; the rest: disk."""
    offload_folder: str | None = None
    """Folder for the weights --steer.device_map offloads to disk."""

    def __post_init__(self) -> None:
        from headlab.placement import Placement

        Placement(self.device_map, self.max_memory, self.offload_folder)  # checked before anything runs
        at_least("steer.top_k", self.top_k, 1, optional=True)
        require(0 < self.significance < 1, f"--steer.significance {self.significance} must lie in (0, 1)")
        need = draws_for(self.significance)
        require(self.random_directions >= need,
                f"--steer.random_directions {self.random_directions} is too few: the p-value cannot go below "
                f"1/{self.random_directions + 1}, so the check could never pass at --steer.significance "
                f"{self.significance}; use at least {need}")
        at_least("steer.max_prompts", self.max_prompts, 2)
