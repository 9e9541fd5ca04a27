"""Detecting the Fourier-multiplication mechanism of a model trained on modular addition (Nanda et al. 2023,
"Progress measures for grokking via mechanistic interpretability", arXiv 2301.05217; reference code
``mechanistic-interpretability-grokking/progress-measures-paper``, ``transformers.py``).

A 1-layer transformer that groks ``a + b mod p`` embeds each number as a few waves ``cos(w_k a), sin(w_k a)``,
``w_k = 2 pi k / p`` for a handful of *key frequencies* ``k``, multiplies them in the attention and MLP into
``cos(w_k (a + b))``, ``sin(w_k (a + b))``, and reads the answer ``c`` off ``cos(w_k (a + b - c))``. On three tokens
attention patterns say nothing about this; what does:

* :func:`embedding_spectrum`: the embedding ``W_E`` written in the Fourier basis of ``Z_p`` is sparse, its energy
  concentrated on the key frequencies (:func:`key_frequencies`, :func:`spectrum_sparsity`).
* :func:`restricted_loss`: keeping only the key-frequency components ``cos/sin(w_k (a + b))`` of the logits, the
  loss stays low.
* :func:`excluded_loss`: removing exactly those components, the training loss rises although the full model fits
  the training set.

:func:`fourier_report` computes all of them for a trained toy model and :func:`fourier_formed` applies the
decision rule (thresholds in :class:`FourierThresholds`). Grokking curves (train vs test accuracy over steps) are
read from a run directory by :func:`grokking_curves`.

Conventions: numbers are tokens ``0 .. p - 1`` (``p`` is ``=``); the logits of a pair are those of the ``=``
position, restricted to the ``p`` number tokens; ``p`` is odd (a prime), so the real Fourier basis has the constant
and ``(p - 1) / 2`` cosine/sine pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from headlab.models import input_device


def fourier_basis(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal real Fourier basis of functions on ``Z_p`` and the frequency of each basis vector.

    Rows: ``1 / sqrt(p)``; then for ``k = 1 .. (p - 1) / 2`` the pair ``sqrt(2 / p) cos(2 pi k x / p)``,
    ``sqrt(2 / p) sin(2 pi k x / p)``. Returns ``basis`` ``[p, p]`` (row ``r`` is a function of ``x``, orthonormal:
    ``basis @ basis.T = I``) and ``freq`` ``[p]`` (0 for the constant, ``k`` for both rows of pair ``k``).
    Source: Nanda et al. 2023 (``fourier_basis`` in their ``transformers.py``, same normalisation).
    """
    if p < 3 or p % 2 == 0:
        raise ValueError(f"p must be an odd number >= 3, got {p}")
    x = torch.arange(p, dtype=torch.float64)
    rows, freq = [torch.full((p,), 1.0 / math.sqrt(p), dtype=torch.float64)], [0]
    for k in range(1, (p - 1) // 2 + 1):
        rows.append(math.sqrt(2.0 / p) * torch.cos(2 * math.pi * k * x / p))
        rows.append(math.sqrt(2.0 / p) * torch.sin(2 * math.pi * k * x / p))
        freq += [k, k]
    return torch.stack(rows), torch.tensor(freq)


def embedding_spectrum(w_e: torch.Tensor, p: int) -> torch.Tensor:
    """Share of the embedding's energy at each frequency: ``share [(p - 1) / 2 + 1]`` (index 0 = constant).

    ``w_e`` ``[p, d_model]`` holds the number tokens' embeddings (rows ``0 .. p - 1``). With the Fourier basis
    ``F`` ``[p, p]`` (:func:`fourier_basis`), ``C = F @ w_e`` ``[p, d_model]`` and
    ``share[k] = sum_{r: freq(r) = k} ||C_r||^2 / ||w_e||_F^2`` (cosine and sine of one frequency pooled; the
    shares sum to 1 by Parseval). Source: Nanda et al. 2023, Fig. 2/§4 (the norm of ``W_E`` along each Fourier
    component is sparse; they plot the norms of the rows of ``F W_E``).
    """
    if w_e.shape[0] != p:
        raise ValueError(f"w_e has {w_e.shape[0]} rows, expected p = {p} (the number tokens only)")
    basis, freq = fourier_basis(p)
    coeff = basis @ w_e.detach().double().cpu()  # [p, d_model]
    energy = coeff.pow(2).sum(-1)  # [p]
    share = torch.zeros((p - 1) // 2 + 1, dtype=torch.float64).index_add_(0, freq, energy)  # [n_freq + 1]
    return (share / share.sum().clamp_min(1e-30)).float()


def key_frequencies(share: torch.Tensor, max_k: int = 8, min_ratio: float = 3.0) -> list[int]:
    """The key frequencies: the nonzero frequencies whose energy share is at least ``min_ratio`` times the share
    every frequency would have if the energy were spread evenly, the largest first, at most ``max_k`` of them.

    ``keys = top_{max_k} {k >= 1 : share[k] >= min_ratio / n_freq}``, ``n_freq = len(share) - 1``; ``share`` from
    :func:`embedding_spectrum`. A random embedding spreads its energy evenly (each frequency gets ``1 / n_freq``
    up to a chi-square fluctuation of relative size ``sqrt(1 / d_model)``; the largest of ``n_freq`` such shares
    stays below ~1.8x even at d_model = 16), so it has no key frequency. Nanda et
    al. 2023 find 5 in their main run (14, 35, 41, 42, 52 at p = 113) and pick them from the MLP neurons; here they
    are read off the embedding, as the task's brief asks (an equivalent choice once the circuit has formed: the
    embedding and the neurons use the same frequencies, Nanda et al. §4).
    """
    n_freq = len(share) - 1
    order = torch.argsort(share[1:], descending=True) + 1
    return [int(k) for k in order[:max_k] if float(share[k]) >= min_ratio / n_freq]


def spectrum_sparsity(share: torch.Tensor, keys: list[int]) -> float:
    """Fraction of the embedding's energy at the key frequencies: ``sum_{k in keys} share[k]`` (0 when no keys)."""
    return float(share[keys].sum()) if keys else 0.0


@torch.no_grad()
def mlp_activations(model: nn.Module, p: int, layer: int = -1) -> torch.Tensor:
    """Post-nonlinearity MLP activations at the ``=`` position for every pair: ``[p * p, d_mlp]`` (row
    ``a * p + b``), read from the input of ``blocks[layer].mlp.fc_out`` of a toy model."""
    fc_out = model.blocks[layer].mlp.fc_out
    seen: list[torch.Tensor] = []
    handle = fc_out.register_forward_pre_hook(lambda _module, args: seen.append(args[0][:, -1].float().cpu()))
    try:
        all_pair_logits(model, p)
    finally:
        handle.remove()
    return torch.cat(seen)


def neuron_frequencies(acts: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each neuron's frequency and the fraction of its variance that frequency explains (Nanda et al. 2023).

    ``acts`` ``[p * p, n]`` (row ``a * p + b``). With the 1-D basis ``F`` (:func:`fourier_basis`), the 2-D
    coefficients of neuron ``i`` are ``C_i = F A_i F^T`` (``A_i`` ``[p, p]`` over ``(a, b)``). The terms of frequency
    ``k`` are those whose row and column frequencies both lie in ``{0, k}``, except the constant: ``cos/sin(w_k a)``,
    ``cos/sin(w_k b)`` and their four products. ``frac[i, k] = sum_{those} C_i^2 / sum_{all but constant} C_i^2``.
    Returns ``freq`` ``[n]`` (the argmax ``k``) and ``frac`` ``[n]`` (its fraction). Source: Nanda et al. 2023, §4
    and ``calculate_key_freqs`` in their ``transformers.py`` (neurons are each well explained by one frequency).
    """
    basis, freq = fourier_basis(p)
    a = acts.double().reshape(p, p, -1)  # [a, b, n]
    coeff = torch.einsum("ra,abn,cb->rcn", basis, a, basis)  # [p, p, n]
    energy = coeff.pow(2)
    energy[0, 0] = 0  # the constant carries no frequency
    total = energy.sum((0, 1)).clamp_min(1e-30)  # [n]
    n_freq = (p - 1) // 2
    fracs = torch.stack(
        [
            energy[((freq == 0) | (freq == k))][:, ((freq == 0) | (freq == k))].sum((0, 1)) / total
            for k in range(1, n_freq + 1)
        ]
    )  # [n_freq, n]
    best, where = fracs.max(0)
    return where + 1, best.float()


def neuron_key_frequencies(
    acts: torch.Tensor, p: int, min_frac: float = 0.5, min_neurons: float = 0.02, max_k: int = 8
) -> list[int]:
    """Key frequencies from the MLP neurons: the frequencies that explain ``>= min_frac`` of the variance of at least
    ``min_neurons`` (a fraction) of the neurons, the most common first, at most ``max_k`` (:func:`neuron_frequencies`;
    Nanda et al. 2023 read their key frequencies the same way). A random network's neuron spreads its variance over
    many frequencies (each ``k`` covers 8 of ``p^2 - 1`` components), so none qualifies."""
    freq, frac = neuron_frequencies(acts, p)
    good = freq[frac >= min_frac]
    counts = torch.bincount(good, minlength=(p - 1) // 2 + 1)
    order = torch.argsort(counts, descending=True)
    return [int(k) for k in order[:max_k] if counts[k] >= max(1, min_neurons * acts.shape[1])]


@torch.no_grad()
def all_pair_logits(model: nn.Module, p: int, batch: int = 4096) -> torch.Tensor:
    """Logits of the ``p`` numbers at the ``=`` position for every pair: ``[p * p, p]``, row ``a * p + b``."""
    model.eval()
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    ids = torch.stack((a, b, torch.full_like(a, p)), dim=1)  # [p*p, 3]
    device = input_device(model)
    chunks = [ids[i : i + batch].to(device) for i in range(0, len(ids), batch)]
    return torch.cat([model(input_ids=chunk).logits[:, -1, :p].float().cpu() for chunk in chunks])


def xpy_directions(p: int, freq: int) -> torch.Tensor:
    """Unit vectors ``[2, p * p]`` over pairs ``(a, b)`` (index ``a * p + b``): ``cos(w (a + b))`` and
    ``sin(w (a + b))`` with ``w = 2 pi freq / p``, each normalised to norm 1.

    Equal to Nanda et al.'s ``(cos a cos b - sin a sin b) / sqrt(2)`` and ``(sin a cos b + cos a sin b) / sqrt(2)``
    built from their 2-D Fourier basis (``get_component_cos_xpy`` / ``get_component_sin_xpy``).
    """
    s = (torch.arange(p).repeat_interleave(p) + torch.arange(p).repeat(p)).double()  # a + b, [p*p]
    angle = 2 * math.pi * freq * s / p
    d = torch.stack((torch.cos(angle), torch.sin(angle)))  # [2, p*p]
    return d / d.norm(dim=1, keepdim=True)


def key_component(logits: torch.Tensor, p: int, keys: list[int]) -> torch.Tensor:
    """The part of the logits along ``cos/sin(w_k (a + b))`` for the key frequencies: ``[p * p, p]``.

    ``K = sum_{k in keys} sum_{u in (cos, sin)} u_k u_k^T L`` with ``L`` ``[p * p, p]`` (pairs x output numbers):
    each output's logit map over the pairs is projected onto the span of the key directions
    (:func:`xpy_directions`; the directions of different frequencies are orthogonal). Source: Nanda et al. 2023.
    """
    if not keys:
        return torch.zeros_like(logits)
    dirs = torch.cat([xpy_directions(p, k) for k in keys]).to(logits.dtype)  # [2 * n_keys, p*p]
    return dirs.T @ (dirs @ logits)


def logit_spectrum(logits: torch.Tensor, p: int) -> torch.Tensor:
    """Share of the logits' variance along ``cos/sin(w_k (a + b))`` for each frequency: ``[(p - 1) / 2 + 1]``
    (index 0 unused, 0).

    ``share[k] = ||key_component(L_c, [k])||_F^2 / ||L_c||_F^2`` with ``L_c`` the logits ``[p * p, p]`` centred over
    the pairs. A logit table that depends on the pair only through ``a + b`` puts all of its variance on these
    directions; a random one puts ``~1 / p`` of it there, spread over all frequencies.
    """
    centred = logits.double() - logits.double().mean(0, keepdim=True)
    total = centred.pow(2).sum().clamp_min(1e-30)
    share = [0.0] + [float(key_component(centred, p, [k]).pow(2).sum() / total) for k in range(1, (p - 1) // 2 + 1)]
    return torch.tensor(share)


def logit_key_frequencies(share: torch.Tensor, min_share: float = 0.005, max_k: int = 8) -> list[int]:
    """Frequencies carrying at least ``min_share`` of the logits' variance (:func:`logit_spectrum`), the largest first,
    at most ``max_k``. A random model's logits give each frequency ``~1 / (p (p - 1) / 2)`` (0.0007 at p = 53)."""
    order = torch.argsort(share, descending=True)
    return [int(k) for k in order[:max_k] if k > 0 and float(share[k]) >= min_share]


def _loss(logits: torch.Tensor, p: int, mask: torch.Tensor | None) -> float:
    """Cross-entropy (float64) of ``logits`` ``[p * p, p]`` against ``(a + b) mod p`` on the pairs in ``mask``."""
    labels = (torch.arange(p).repeat_interleave(p) + torch.arange(p).repeat(p)) % p
    if mask is not None:
        logits, labels = logits[mask], labels[mask]
    return float(F.cross_entropy(logits.double(), labels))


def restricted_loss(logits: torch.Tensor, p: int, keys: list[int], mask: torch.Tensor | None = None) -> float:
    """Loss with only the key-frequency components of the logits kept (Nanda et al. 2023, "restricted loss").

    ``L_restricted = CE(K + mean_pairs(L - K), (a + b) mod p)`` with ``K = key_component(L)`` ``[p * p, p]``;
    adding back the per-output mean over pairs of what was removed restores any input-independent bias, as in
    their ``test_logits(..., bias_correction=True)``. ``mask`` ``[p * p]`` (bool) selects the pairs scored
    (``None``: all pairs). Low when the key frequencies alone carry the answer.
    """
    kept = key_component(logits, p, keys)
    kept = kept + (logits - kept).mean(dim=0, keepdim=True)
    return _loss(kept, p, mask)


def excluded_loss(logits: torch.Tensor, p: int, keys: list[int], mask: torch.Tensor | None = None) -> float:
    """Loss with the key-frequency components removed (Nanda et al. 2023, "excluded loss").

    ``L_excluded = CE(L - K, (a + b) mod p)`` with ``K = key_component(L)``; Nanda et al. score it on the training
    pairs (``mask``): it rises during circuit formation while the training loss stays near 0, which shows the
    model relies on the key frequencies rather than on memorisation.
    """
    return _loss(logits - key_component(logits, p, keys), p, mask)


@dataclass(frozen=True)
class FourierThresholds:
    """The decision rule of :func:`fourier_formed`; every condition must hold.

    * ``min_sparsity = 0.5``: at least half of the embedding's energy lies at its key frequencies (a random
      embedding has no key frequency at all, see :func:`key_frequencies`; Nanda et al.'s trained embedding is
      dominated by its 5-6 key frequencies).
    * ``max_restricted_loss = 1.0`` nats on all ``p^2`` pairs: the key frequencies alone give the right answer
      probability ``> e^-1`` on average (a model with no usable signal there scores ``~ln p``, 4.7 at p = 113).
    * ``min_excluded_gap = 1.0`` nats: removing the key frequencies raises the training loss by at least one nat
      over the full model's training loss (a memorising or untrained model loses ``~0``).
    * ``max_keys = 8``, ``min_ratio = 3.0``: how the embedding's key frequencies are picked
      (:func:`key_frequencies`); ``min_neuron_frac = 0.5``, ``min_neurons = 0.02``: how the neurons' are
      (:func:`neuron_key_frequencies`); ``min_logit_share = 0.005``: which logit frequencies join them
      (:func:`logit_key_frequencies`).
    """

    min_sparsity: float = 0.5
    max_restricted_loss: float = 1.0
    min_excluded_gap: float = 1.0
    max_keys: int = 8
    min_ratio: float = 3.0
    min_neuron_frac: float = 0.5
    min_neurons: float = 0.02
    min_logit_share: float = 0.005


@torch.no_grad()
def fourier_report(
    model: nn.Module,
    p: int,
    train_mask: torch.Tensor | None = None,
    thresholds: FourierThresholds = FourierThresholds(),
    key_source: str = "neurons",
) -> dict[str, Any]:
    """Every Fourier measure of a model trained on ``a b = -> (a + b) mod p``, and the verdict.

    The key frequencies come from the MLP neurons (``key_source="neurons"``, Nanda et al.'s way,
    :func:`neuron_key_frequencies`; a model without an MLP falls back to the embedding), joined by the frequencies
    that carry the logits (:func:`logit_key_frequencies`; with GELU neurons harmonics such as ``2k`` of a key
    frequency ``k`` reach the logits; none when the neurons give no key), or from the embedding alone
    (``"embedding"``, :func:`key_frequencies`): the embedding of a trained model can hold most of its energy in one
    or two frequencies while the logits also need frequencies it carries weakly (measured at p = 53: the embedding
    picks {2}, restricted loss 4.6; the neurons {2, 19}, 1.9; with the logits' harmonic 4 as well, 0.11).

    ``train_mask`` ``[p * p]`` bool marks the training pairs (index ``a * p + b``; e.g.
    :func:`train_mask_of` a ``ModularAdditionTask``); without it the losses are taken on all pairs. Keys:
    ``share`` (list, per frequency), ``key_frequencies``, ``embedding_key_frequencies``, ``sparsity`` (the
    embedding's energy share at ``key_frequencies``), ``train_loss``, ``test_loss``,
    ``test_accuracy`` (the full model), ``restricted_loss`` (all pairs), ``excluded_loss`` (training pairs),
    ``excluded_gap`` (excluded minus full training loss), ``formed`` and ``thresholds``.
    """
    w_e = model.get_input_embeddings().weight[:p]  # [p, d_model]: the number tokens
    share = embedding_spectrum(w_e, p)
    embedding_keys = key_frequencies(share, thresholds.max_keys, thresholds.min_ratio)
    mlp = getattr(getattr(model, "blocks", [None])[-1], "mlp", None)
    logits = all_pair_logits(model, p)  # [p*p, p]
    logit_keys = logit_key_frequencies(logit_spectrum(logits, p), thresholds.min_logit_share, thresholds.max_keys)
    if key_source == "neurons" and mlp is not None:
        acts = mlp_activations(model, p)
        neuron_keys = neuron_key_frequencies(
            acts, p, thresholds.min_neuron_frac, thresholds.min_neurons, thresholds.max_keys
        )
        keys = list(dict.fromkeys(neuron_keys + logit_keys))[: thresholds.max_keys] if neuron_keys else []
    else:
        neuron_keys = None
        keys = embedding_keys
    test_mask = None if train_mask is None else ~train_mask
    labels = (torch.arange(p).repeat_interleave(p) + torch.arange(p).repeat(p)) % p
    correct = logits.argmax(-1) == labels
    report = {
        "p": p,
        "share": [round(float(s), 6) for s in share],
        "key_frequencies": keys,
        "embedding_key_frequencies": embedding_keys,
        "neuron_key_frequencies": neuron_keys,
        "logit_key_frequencies": logit_keys,
        "sparsity": spectrum_sparsity(share, keys),
        "train_loss": _loss(logits, p, train_mask),
        "test_loss": _loss(logits, p, test_mask),
        "test_accuracy": float(correct[test_mask].float().mean() if test_mask is not None else correct.float().mean()),
        "restricted_loss": restricted_loss(logits, p, keys),
        "excluded_loss": excluded_loss(logits, p, keys, train_mask),
    }
    report["excluded_gap"] = report["excluded_loss"] - report["train_loss"]
    report["formed"] = fourier_formed(report, thresholds)
    report["thresholds"] = asdict(thresholds)
    return report


def fourier_formed(report: dict[str, Any], thresholds: FourierThresholds = FourierThresholds()) -> bool:
    """The Fourier mechanism has formed: key frequencies exist, hold ``>= min_sparsity`` of the embedding's
    energy, the restricted loss is ``<= max_restricted_loss`` and the excluded loss exceeds the training loss by
    ``>= min_excluded_gap`` (see :class:`FourierThresholds` for why each bound). ``report`` from
    :func:`fourier_report` (keys ``key_frequencies``, ``sparsity``, ``restricted_loss``, ``excluded_gap``).
    """
    return (
        len(report["key_frequencies"]) > 0
        and report["sparsity"] >= thresholds.min_sparsity
        and report["restricted_loss"] <= thresholds.max_restricted_loss
        and report["excluded_gap"] >= thresholds.min_excluded_gap
    )


def train_mask_of(task) -> torch.Tensor:
    """``[p * p]`` bool, true at the training pairs of a ``ModularAdditionTask`` (index ``a * p + b``)."""
    mask = torch.zeros(task.p * task.p, dtype=torch.bool)
    mask[task.pairs["train"]] = True
    return mask


def grokking_curves(run_dir: str | Path) -> pd.DataFrame:
    """Train and test accuracy over steps of a ``toy`` run on modular addition, one row per step.

    Columns ``step``, ``test_accuracy``, ``test_loss`` from ``eval_curve.csv`` (the run's evaluation split, the
    held-out pairs) and, when the run logged with ``--logger csv``, ``train_accuracy`` and ``train_loss`` from the
    logger's ``metrics.csv`` (matched to the nearest logged step at or before each evaluation step). Grokking shows
    as train accuracy near 1 long before test accuracy jumps (Power et al. 2022; Nanda et al. 2023, Fig. 1).
    """
    run_dir = Path(run_dir)
    curve = pd.read_csv(run_dir / "eval_curve.csv").rename(
        columns={"eval_accuracy": "test_accuracy", "eval_loss": "test_loss"}
    )
    logged = sorted(run_dir.glob("**/metrics.csv"))
    if logged:
        train = pd.read_csv(logged[0])
        cols = {"train/accuracy": "train_accuracy", "train/loss": "train_loss"}
        train = train[["step", *[c for c in cols if c in train]]].dropna().rename(columns=cols)
        curve = pd.merge_asof(curve.sort_values("step"), train.sort_values("step"), on="step")
    return curve
