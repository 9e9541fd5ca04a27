"""Amplification heads (the survey's Expression Preparation stage) localised by activation patching at the final
position, a causal test of the head's total effect (direct and through later layers) that favours no depth, where
direct logit attribution (:mod:`roles.knowledge`) sees only the direct path and so favours the last layers.

On the capital prompts the model answers correctly, for every head ``h`` (:meth:`roles.knockout.PrefixRun.log_probs`
with a source): its output at the final position, ``z_h``, is replaced by its output on the previous prompt ``b - 1``
(another country; resample patching, Chan et al. 2022; Heimersheim & Nanda 2024 on patching), and

* ``ablation_effect = mean_b drop_h(a_b)``, the drop of the correct answer's log-probability
  (``drop_h(x) = log p(x) - log p_h(x)``);
* ``control_h = mean_b drop_h(a_{b-2})``, the same drop for a third prompt's answer (not the source's answer, so
  that neighbouring prompts' differences share no term; see :func:`roles.memory_knockout.scan_heads`);
* ``score_h = mean_b [drop_h(a_b) - drop_h(a_{b-2})]`` with the same sign-flip test, Benjamini-Hochberg correction
  and floor (5% of the all-heads score) as the memory heads' knockout (:func:`roles.memory_knockout.judge`).

A head so detected is an amplification head unless the knockout found it to be a memory head: it carries
the answer at the final position without reading the subject there (the attribution detector's verdict excludes
memory heads the same way). The group check patches the detected heads together against depth-matched random groups.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from roles.memory_knockout import group_entry, judge, knockout_rows, scan_heads


def patching_amplification(model: nn.Module, detect: dict, evaluate: dict, memory: torch.Tensor, alpha: float,
                           min_effect: float, seed: int, check: bool, draws: int = 99
                           ) -> tuple[pd.DataFrame, torch.Tensor, dict | None, dict]:
    """Amplification heads by final-position patching on ``detect`` (``memory`` ``[L, H]``: the knockout memory heads,
    excluded), the group check (``check``) on ``evaluate``; returns the role-table rows (``effect_method``
    ``patching``), the detected mask, the ``groups`` entry and a summary (floor, all-heads and window effects)."""
    scan = scan_heads(model, detect, patch=True)
    verdict = judge(scan, alpha, min_effect, seed)
    excluded = int((verdict.detected & memory).sum())
    verdict.detected &= ~memory
    group = (group_entry(model, evaluate, scan, verdict.detected, alpha, min_effect, seed, patch=True, draws=draws)
             if check else None)
    functional = None if not check else bool(group and group["functional"])
    summary = {"floor": verdict.floor, "total_effect": scan.total, "window": scan.window,
               "window_effects": [round(float(w), 4) for w in scan.windows], "sign_flip_draws": verdict.draws,
               "excluded_memory_heads": excluded}
    rows = knockout_rows(scan, verdict, functional, role="amplification", method="patching")
    return rows, verdict.detected, group, summary
