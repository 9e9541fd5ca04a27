"""The causal check: does adding the probe direction to the top heads' outputs move the model's output, more than
adding random directions of the same norm to the same heads?

Inference-Time Intervention (Li et al. 2023) shifts each chosen head's output by ``alpha * sigma_h * theta_h``
(``theta_h`` a unit direction, ``sigma_h`` the activations' std along it) at every position, through the same hook
point the cache reads (the attention output projection's input). The readout is a scalar per prompt: the logit
difference between two label continuations (causal LMs) or the final hidden state projected on a fixed direction
(any model). The check reports the mean readout shift for +alpha and -alpha along the probe directions and for
``n_random`` sets of random directions (each head's random direction has the probe direction's norm), and the
share of random sets whose absolute shift reaches the probe's (a Monte Carlo p-value,
:func:`headlab.statistics.monte_carlo_p`). The check passes when that p-value is at most ``significance`` and the
probe's shift moves the readout the way the direction points (positive). With ``n_random`` draws the p-value cannot
go below ``1 / (n_random + 1)``, so a check with too few draws could never pass: it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from headlab.errors import HeadlabError
from headlab.heads import hook_heads
from headlab.interventions import steer
from headlab.statistics import draws_for, min_attainable_p, monte_carlo_p

Readout = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]  # (model outputs, inputs) -> [batch]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch]``: the position of each row's last attended token (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (positions + 1)).argmax(-1)


def logit_difference(token_a: int, token_b: int) -> Readout:
    """Readout: ``logits[last, token_a] - logits[last, token_b]`` per prompt (causal LMs)."""

    def read(outputs, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        last = last_token_index(inputs["attention_mask"])
        logits = outputs.logits[torch.arange(len(last)), last]  # [batch, vocab]
        return logits[:, token_a] - logits[:, token_b]

    return read


def final_hidden(outputs) -> torch.Tensor:
    """``[batch, seq, d_model]``: the model's last hidden state (base models or models with a head)."""
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs.hidden_states[-1]
    return hidden


def hidden_projection(direction: torch.Tensor) -> Readout:
    """Readout: the final hidden state at the last token projected on ``direction [d_model]``."""

    def read(outputs, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = final_hidden(outputs)
        last = last_token_index(inputs["attention_mask"])
        return hidden[torch.arange(len(last)), last] @ direction.to(hidden.dtype)

    return read


@dataclass
class SteeringResult:
    heads: list[tuple[int, int]]
    alpha: float
    baseline: float  # mean readout without steering
    shift: float  # mean readout change with +alpha along the probe directions
    shift_negative: float  # ... with -alpha
    random_shifts: list[float]  # mean readout change with +alpha along each random direction set
    p_value: float  # (1 + #{|random shift| >= |shift|}) / (1 + n_random)
    min_attainable_p: float  # 1 / (1 + n_random): the smallest p-value these draws allow
    significance: float  # the level the p-value is judged at (p <= significance)

    @property
    def passed(self) -> bool:
        """The probe direction moves the readout its own way (shift > 0) more than random directions do."""
        return self.p_value <= self.significance and self.shift > 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["heads"] = [list(h) for h in self.heads]
        out["passed"] = self.passed
        return out


@torch.no_grad()
def _readout(model: nn.Module, inputs: dict[str, torch.Tensor], readout: Readout, fn=None) -> torch.Tensor:
    kwargs = {"output_hidden_states": True}  # Hugging Face models accept it (some only through **kwargs)
    if fn is None:
        return readout(model(**inputs, **kwargs), inputs).float()
    with hook_heads(model, fn):
        return readout(model(**inputs, **kwargs), inputs).float()


def steering_check(model: nn.Module, inputs: dict[str, torch.Tensor], readout: Readout,
                   directions: Mapping[tuple[int, int], torch.Tensor], alpha: float, n_random: int = 39,
                   seed: int = 0, significance: float = 0.05, positions: torch.Tensor | None = None
                   ) -> SteeringResult:
    """Steer ``model`` on ``inputs`` along ``directions`` (``{(layer, head): [d_head]}``, already scaled by each
    head's std) with ``+alpha`` and ``-alpha``, and along ``n_random`` random direction sets of equal per-head
    norms; report the mean readout shifts and the Monte Carlo p-value of the probe's shift among the random ones.
    ``positions`` (bool ``[batch, seq]``) limits every edit to those positions (default: every position); a
    direction may be ``[batch, d_head]`` (one per row), its random counterparts then too.
    Refuses ``n_random`` below :func:`headlab.statistics.draws_for` ``(significance)``: such a check could not pass.
    Hooks are removed afterwards, even on error."""
    if min_attainable_p(n_random) > significance:
        floor = min_attainable_p(n_random)
        raise HeadlabError(f"{n_random} random directions give p-values no smaller than {floor:.3g}, so the steering "
                           f"check could never pass at {significance}; use at least "
                           f"{draws_for(significance)} random directions")
    base = _readout(model, inputs, readout)
    shift = float((_readout(model, inputs, readout, steer(directions, alpha, positions)) - base).mean())
    shift_neg = float((_readout(model, inputs, readout, steer(directions, -alpha, positions)) - base).mean())
    generator = torch.Generator().manual_seed(seed)
    random_shifts = []
    for _ in range(n_random):
        random_dirs = {}
        for head, direction in directions.items():
            r = torch.randn(direction.shape, generator=generator, dtype=torch.float32)
            random_dirs[head] = r / r.norm(dim=-1, keepdim=True) * direction.float().norm(dim=-1, keepdim=True)
        steered = _readout(model, inputs, readout, steer(random_dirs, alpha, positions))
        random_shifts.append(float((steered - base).mean()))
    return SteeringResult([tuple(map(int, h)) for h in directions], alpha, float(base.mean()), shift, shift_neg,
                          random_shifts, monte_carlo_p(shift, random_shifts), min_attainable_p(n_random),
                          significance)


def head_directions(table: dict[str, np.ndarray], heads: list[tuple[int, int]], layers: list[int],
                    kind: str = "mass_mean") -> dict[tuple[int, int], torch.Tensor]:
    """``{(model layer, head): std * unit direction}`` from a directions.safetensors table, for ITI-style steering.

    ``kind``: ``mass_mean`` (the mass-mean unit direction times the std along it) or ``probe`` (the probe weight
    vector of the positive class, scaled to unit norm times the same std).
    """
    index = {layer: i for i, layer in enumerate(layers)}
    out = {}
    for layer, head in heads:
        i = index[layer]
        std = float(table["mass_mean_std"][i, head, 0]) if "mass_mean_std" in table else 1.0
        if kind == "mass_mean":
            unit = table["mass_mean_direction"][i, head, 0]
        else:
            w = table["probe_weight"][i, head, :, -1]
            unit = w / max(float(np.linalg.norm(w)), 1e-30)
        out[(layer, head)] = torch.from_numpy(np.ascontiguousarray(unit * std, np.float32))
    return out
