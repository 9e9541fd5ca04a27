"""Memory heads (the survey's Knowledge Recalling stage) localised by attention knockout, a causal test that does
not favour any depth (direct logit attribution at the final position favours the last layers by construction).

On the capital prompts the model answers correctly, for every head ``h`` (:mod:`roles.knockout`):

* ``drop_h(x) = log p(x) - log p_h(x)`` at the final position, ``p_h`` with ``h`` unable to attend from the final
  position to the subject (Geva et al. 2023, attention knockout); ``ablation_effect = mean_b drop_h(a_b)``, the drop
  of the correct answer's log-probability;
* ``control_h = mean_b drop_h(a_{b-1})``: the same drop for a wrong capital, the answer of another prompt: a knockout
  that lowers every capital's probability alike is not recall of *this* subject's attribute;
* ``score_h = mean_b [drop_h(a_b) - drop_h(a_{b-1})]``, the paired difference, with ``p_value`` its one-sided
  sign-flip Monte Carlo test over prompts (:func:`headlab.statistics.sign_flip_p`), Benjamini-Hochberg corrected
  over the heads (``p_adjusted``);
* ``detected``: ``score >= floor`` and ``p_adjusted <= alpha``, with ``floor = max(min_effect, FLOOR_SHARE * total)``
  and ``total`` the same score when every head of every layer is knocked out at once (the whole final-position route
  from the subject through attention).

The group check knocks out the detected heads together against ``draws`` random groups *matched in depth* (as many
heads from each layer as the detected group has there, drawn from that layer's other heads), one-sided Monte Carlo
``p = (1 + #{random >= detected}) / (1 + draws)``. The window scan (:func:`roles.knockout.window_plans`) knocks out
every head of ``k`` consecutive layers and shows where the subject's information is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.heads import head_sites
from headlab.statistics import benjamini_hochberg, draws_for, min_attainable_p, sign_flip_p
from roles.groups import depth_matched_groups, distinct_matched_groups
from roles.knockout import PrefixRun, default_window, head_plans, knockout_log_probs, window_plans
from roles.mapping import GroupCheck

FLOOR_SHARE = 0.05
"""A knockout memory head's effect must be at least this share of the all-heads knockout effect (as amplification
heads must write 5% of the logit margin, :data:`roles.rule.FLOORS`)."""


@dataclass
class KnockoutScan:
    """Per-head and per-window knockout effects on one batch of prompts."""

    drop: torch.Tensor  # [L, H] mean drop of log p(correct answer)
    control: torch.Tensor  # [L, H] mean drop of log p(another prompt's answer)
    differences: torch.Tensor  # [B, L, H] per prompt: drop(correct) - drop(wrong)
    total: float  # mean difference with every head of every layer knocked out
    window: int
    windows: torch.Tensor  # [L - window + 1] mean difference per window of layers (start = index)
    clean_log_prob: float  # mean log p(correct answer) of the clean run

    @property
    def score(self) -> torch.Tensor:
        """``[L, H]``: mean over prompts of ``drop(correct) - drop(wrong)``."""
        return self.drop - self.control


def _drops(run: PrefixRun, plans: torch.Tensor, answers: torch.Tensor, patch: bool
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Drops of log p(correct) and log p(wrong) under each plan, ``[B, P]`` each, and the clean mean log p. With
    ``patch`` the planned heads' final-position outputs come from the previous prompt (``b - 1``) instead of being
    knocked out (:meth:`roles.knockout.PrefixRun.log_probs`), and the wrong answer is that of prompt ``b - 2``, not
    the source's: with the source's answer, prompt ``b``'s difference would share the term "source output, source
    answer" with prompt ``b - 1``'s clean term, the differences of neighbours would correlate and the sign-flip test
    would be anticonservative (15% of sharp random toy models got a detection at alpha 0.05). Knockout: ``b - 1``."""
    tokens = torch.stack([answers, answers.roll(2 if patch else 1)], -1)  # [B, 2]
    clean = torch.zeros(1, *plans.shape[1:], dtype=torch.bool)
    source = {layer: z.roll(1, 0) for layer, z in run.final_outputs().items()} if patch else None
    logp = knockout_log_probs(run, torch.cat([clean, plans]), tokens, source=source)  # [B, 1 + P, 2]
    drop = logp[:, :1] - logp[:, 1:]
    return drop[..., 0], drop[..., 1], float(logp[:, 0, 0].mean())


@torch.no_grad()
def scan_heads(model: nn.Module, batch: dict, window: int | None = None, patch: bool = False) -> KnockoutScan:
    """Knock out every head, every window of ``window`` layers (default :func:`roles.knockout.default_window`) and all
    heads at once, from the final position to ``batch["subject_mask"]``, on ``batch["input_ids"]`` with
    ``batch["answers"]``; with ``patch``, patch their final-position outputs from the previous prompt instead (the
    wrong answer is then a third prompt's, see ``_drops``)."""
    sites = head_sites(model)
    n_layers, n_heads = len(sites), sites[0].n_heads
    window = window or default_window(n_layers)
    run = PrefixRun(model, batch["input_ids"], batch["subject_mask"])
    every = torch.ones(1, n_layers, n_heads, dtype=torch.bool)
    plans = torch.cat([head_plans(n_layers, n_heads), window_plans(n_layers, n_heads, window), every])
    right, wrong, clean = _drops(run, plans, batch["answers"], patch)
    diff = right - wrong  # [B, P]
    n = n_layers * n_heads
    shape = (n_layers, n_heads)
    return KnockoutScan(right[:, :n].mean(0).view(shape), wrong[:, :n].mean(0).view(shape),
                        diff[:, :n].view(-1, *shape), float(diff[:, -1].mean()), window,
                        diff[:, n:-1].mean(0), clean)


@dataclass
class KnockoutVerdict:
    """The per-head test of a :class:`KnockoutScan`."""

    floor: float
    p_value: torch.Tensor  # [L, H]
    p_adjusted: torch.Tensor  # [L, H]
    detected: torch.Tensor  # [L, H] bool
    draws: int

    @property
    def min_attainable_p(self) -> float:
        return min_attainable_p(self.draws)


def judge(scan: KnockoutScan, alpha: float, min_effect: float, seed: int) -> KnockoutVerdict:
    """Each head's verdict (module docstring). The sign-flip test draws enough flips that its smallest p-value sits
    ten times below Benjamini-Hochberg's strictest threshold over every head: ``draws_for(alpha / (10 * heads))``."""
    n_heads = scan.score.numel()
    draws = draws_for(alpha / (10 * n_heads))
    p = sign_flip_p(scan.differences.flatten(1).double().numpy(), draws, seed)
    p_adjusted = benjamini_hochberg(p)
    floor = max(min_effect, FLOOR_SHARE * scan.total)
    shape = scan.score.shape
    detected = (scan.score >= floor) & torch.from_numpy(p_adjusted <= alpha).view(shape)
    return KnockoutVerdict(floor, torch.from_numpy(p).view(shape), torch.from_numpy(p_adjusted).view(shape),
                           detected, draws)


@torch.no_grad()
def group_knockout(model: nn.Module, batch: dict, detected: torch.Tensor, draws: int, seed: int,
                   patch: bool = False) -> GroupCheck | None:
    """The detected heads knocked out (or ``patch``-ed) together against ``draws`` depth-matched random groups (mean
    per-prompt difference, as the per-head score); None with no detected head."""
    if not detected.any():
        return None
    run = PrefixRun(model, batch["input_ids"], batch["subject_mask"])
    plans = torch.cat([detected[None], depth_matched_groups(detected, draws, seed)])
    right, wrong, _ = _drops(run, plans, batch["answers"], patch)
    effects = (right - wrong).mean(0).tolist()
    heads = [(int(a), int(b)) for a, b in detected.nonzero().tolist()]
    return GroupCheck(heads, effects[0], effects[1:])


def knockout_rows(scan: KnockoutScan, verdict: KnockoutVerdict, functional: bool | None, role: str = "memory",
                  method: str = "knockout") -> pd.DataFrame:
    """The ``role`` rows of a role table (:data:`roles.table.COLUMNS`): score, control and ``ablation_effect`` (the
    drop of the correct answer's log-probability, ``effect_method`` ``method``) as above, the score's standard error
    over prompts as ``effect_stderr``, ``functional`` = detected and the group check passed (NA when not run)."""
    n_layers, n_heads = scan.score.shape
    layer, head = np.divmod(np.arange(n_layers * n_heads), n_heads)
    stderr = scan.differences.std(0) / max(1, scan.differences.shape[0]) ** 0.5
    detected = verdict.detected.flatten().numpy()
    return pd.DataFrame({
        "layer": layer, "head": head, "role": role, "score": scan.score.flatten().numpy(),
        "floor": verdict.floor, "control": scan.control.flatten().numpy(),
        "p_value": verdict.p_value.flatten().numpy(), "p_adjusted": verdict.p_adjusted.flatten().numpy(),
        "detected": detected, "ablation_effect": scan.drop.flatten().numpy(),
        "effect_stderr": stderr.flatten().numpy(), "effect_method": method, "effect_reference": float("nan"),
        "functional": pd.array(detected & functional if functional is not None else [pd.NA] * len(detected),
                               dtype="boolean"),
        "null_mean": float("nan"), "null_std": float("nan"), "emerged_step": pd.array([pd.NA] * len(detected),
                                                                                     dtype="Int64"),
    })


def agreement(causal: torch.Tensor, attribution: torch.Tensor, method: str = "knockout") -> dict:
    """Where a causal verdict (``method``: knockout or patching) and the attribution verdict of the same role agree:
    counts, layers and heads."""
    def layers(mask: torch.Tensor) -> list[int]:
        return sorted({int(a) for a, _ in mask.nonzero().tolist()})

    return {method: int(causal.sum()), "attribution": int(attribution.sum()), "both": int((causal & attribution).sum()),
            f"{method}_only": int((causal & ~attribution).sum()),
            "attribution_only": int((attribution & ~causal).sum()),
            f"{method}_layers": layers(causal), "attribution_layers": layers(attribution),
            f"{method}_heads": causal.nonzero().tolist(), "attribution_heads": attribution.nonzero().tolist()}


def _group_passes(check: GroupCheck | None, detected: torch.Tensor, alpha: float, min_effect: float) -> bool | None:
    """The group check passes: ``p <= alpha``, effect above the random groups' mean by ``min_effect``, and at least
    ``1 / alpha`` distinct depth-matched groups (fewer cannot resolve ``p <= alpha``, however many draws)."""
    if check is None:
        return None
    return bool(check.p_value <= alpha and check.effect - check.reference >= min_effect
                and distinct_matched_groups(detected) >= 1 / alpha)


def group_entry(model: nn.Module, batch: dict, scan: KnockoutScan, detected: torch.Tensor, alpha: float,
                min_effect: float, seed: int, patch: bool = False, draws: int = 99) -> dict | None:
    """The ``groups`` entry of the memory role (:func:`roles.stages.controls.check_entries`): the detected heads
    knocked out together against ``max(draws, draws_for(alpha))`` depth-matched random groups (``draws``:
    ``--detection.random_groups``), with a positive control
    (as many heads with the largest single-head knockout effects, which must pass) and a negative control (as many
    heads drawn at random, treated as detected, which must not). None with no detected head."""
    if not detected.any():
        return None
    draws = max(draws, draws_for(alpha))
    size = int(detected.sum())
    known = torch.zeros_like(detected).flatten()
    known[scan.score.flatten().argsort(descending=True)[:size]] = True
    chance = torch.zeros_like(known)
    chance[torch.randperm(known.numel(), generator=torch.Generator().manual_seed(seed + 4242))[:size]] = True
    entry: dict = {"method": "patching" if patch else "knockout", "null": "depth-matched random groups",
                   "min_attainable_p": 1 / (1 + draws)}
    for name, mask in (("", detected), ("positive_control_", known.view_as(detected)),
                       ("negative_control_", chance.view_as(detected))):
        check = group_knockout(model, batch, mask, draws, seed + 1, patch)
        entry[f"{name}passed" if name else "functional"] = _group_passes(check, mask, alpha, min_effect)
        entry[f"{name}p" if name else "p_value"] = check.p_value
        entry[f"{name}heads" if name else "heads"] = [list(h) for h in check.heads]
        if not name:
            entry.update(effect=check.effect, random_mean=check.reference,
                         distinct_groups=distinct_matched_groups(mask))
    return entry


def knockout_memory(model: nn.Module, detect: dict, evaluate: dict, alpha: float, min_effect: float, seed: int,
                    check: bool, draws: int = 99) -> tuple[pd.DataFrame, torch.Tensor, dict | None, dict]:
    """Memory heads by knockout: the scan and per-head verdicts on ``detect``, the group check (``check``) on
    ``evaluate``; returns the role-table rows, the detected mask ``[L, H]``, the ``groups`` entry and a summary
    (floor, all-heads and window effects, draws)."""
    scan = scan_heads(model, detect)
    verdict = judge(scan, alpha, min_effect, seed)
    group = (group_entry(model, evaluate, scan, verdict.detected, alpha, min_effect, seed, draws=draws)
             if check else None)
    functional = None if not check else bool(group and group["functional"])
    summary = {"floor": verdict.floor, "total_effect": scan.total, "clean_log_prob": scan.clean_log_prob,
               "window": scan.window, "window_effects": [round(float(w), 4) for w in scan.windows],
               "sign_flip_draws": verdict.draws, "min_attainable_p": verdict.min_attainable_p,
               "prompts": int(detect["input_ids"].shape[0])}
    return knockout_rows(scan, verdict, functional), verdict.detected, group, summary
