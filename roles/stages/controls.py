"""Positive and negative controls of the stage map's causal checks, and the ``checks`` list of ``summary.json``.

A check is evidence only when it can pass and can fail. Each causal check is therefore run twice more through the
same code and the same statistics:

* **group check** (a role's detected heads ablated together against random groups of the same size,
  :func:`roles.mapping.group_check`): the positive control is the same number of heads with the largest single-head
  ablation effects (heads known to matter), which must pass; the negative control is a random group of that size
  treated as if it were detected, which must not (it passes with probability about alpha by design).
* **steering checks** (readout R1, :mod:`roles.stages.truth_steering`; readout R2,
  :mod:`roles.stages.truth_judgement`): the positive control steers as many heads of the last layers along their
  direct-path directions (R1: ``W_O[h]^T diag(g) (W_U[true] - mean_i W_U[false_i])`` per prompt at the edited answer
  positions; R2: ``W_O[h]^T diag(g) (W_U[TRUE] - W_U[FALSE])`` at the final position), the negative control the
  probe's heads along random directions in place of the probe's; both run there, through the same statistic.
  :func:`logit_direction` is the one-pair form of that direction.

Each entry of ``checks``: ``name, p_value, min_attainable_p, passed, positive_control_passed,
negative_control_passed`` (None where a control could not be run, with the reason in ``note``); the steering entries
(``steering:truthfulness`` for readout R1, ``steering:truthfulness:r2`` for R2, :mod:`roles.stages.truth_judgement`)
add their ``readout``, ``shift``, ``shift_negative``, where the probe was trained and the edit applied, the readout's
own verdict and the truthfulness heads' ``verdict`` with the readouts that ``decided_by`` it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import nn

from headlab.heads import head_sites, output_weights
from headlab.placement import real_tensor
from roles.mapping import Batches, DetectConfig, GroupCheck, group_check


def _mask(heads: list[tuple[int, int]], shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def group_controls(model: nn.Module, batches: Batches, check: GroupCheck, rows: pd.DataFrame, shape: tuple[int, int],
                   cfg: DetectConfig, seed: int) -> dict[str, Any]:
    """The two controls of one role's group check. ``rows``: the model's (layer, head, ablation_effect) rows (one
    per head) from which the known-to-matter heads are taken."""
    size = len(check.heads)
    per_head = rows.drop_duplicates(["layer", "head"]).dropna(subset=["ablation_effect"])
    top = per_head.sort_values("ablation_effect", ascending=False).head(size)
    known = [(int(r.layer), int(r.head)) for r in top.itertuples()]
    generator = torch.Generator().manual_seed(seed + 4242)
    everyone = [(a, b) for a in range(shape[0]) for b in range(shape[1])]
    chosen = [everyone[i] for i in torch.randperm(len(everyone), generator=generator)[:size].tolist()]
    out: dict[str, Any] = {"positive_control_heads": [list(h) for h in known],
                           "negative_control_heads": [list(h) for h in chosen]}
    for name, heads in (("positive", known), ("negative", chosen)):
        control = group_check(model, batches, _mask(heads, shape), cfg, seed + 1) if len(heads) >= 2 else None
        out[f"{name}_control_passed"] = None if control is None else control.functional(cfg.min_effect, cfg.alpha)
        out[f"{name}_control_p"] = None if control is None else control.p_value
    return out


def logit_direction(model: nn.Module, heads: list[tuple[int, int]], token_a: int, token_b: int
                    ) -> dict[tuple[int, int], torch.Tensor]:
    """``{(layer, head): W_O[h] (W_U[a] - W_U[b])}`` ``[d_head]``: the head-output direction that raises
    ``logit(a) - logit(b)`` most through the direct path (the final norm's per-token scale aside)."""
    w_u = real_tensor(model.get_output_embeddings(), "weight").detach().float()  # [vocab, d_model]
    target = w_u[token_a] - w_u[token_b]
    sites = head_sites(model)
    out = {}
    for layer, head in heads:
        w_o, _ = output_weights(sites[layer])
        out[(layer, head)] = w_o[head].detach().float() @ target
    return out


def check_entries(groups: dict[str, dict], steering: dict | None, alpha: float) -> list[dict[str, Any]]:
    """The ``checks`` list: one entry per group check and for the steering check."""
    entries = []
    for role, group in groups.items():
        entries.append({"name": f"group:{role}", "p_value": group["p_value"],
                        "min_attainable_p": group.get("min_attainable_p"), "passed": group["functional"],
                        "positive_control_passed": group.get("positive_control_passed"),
                        "negative_control_passed": group.get("negative_control_passed"), "alpha": alpha})
    if steering is not None:
        entries.append(_steering_entry("steering:truthfulness", steering, steering.get("r1_verdict"), steering))
        if steering.get("r2") is not None:
            entries.append(_steering_entry("steering:truthfulness:r2", steering["r2"], steering["r2"].get("verdict"),
                                           steering))
    return entries


def _steering_entry(name: str, readout: dict, own_verdict: str | None, heads: dict) -> dict[str, Any]:
    """One readout's entry: its statistics and controls, where its probe was trained and its edit applied, its own
    verdict (``readout_verdict``) and the truthfulness heads' verdict from every readout (``verdict``,
    ``decided_by``)."""
    return {"name": name, "p_value": readout["p_value"], "min_attainable_p": readout["min_attainable_p"],
            "passed": readout["passed"], "positive_control_passed": readout.get("positive_control_passed"),
            "negative_control_passed": readout.get("negative_control_passed"), "alpha": readout["significance"],
            "readout": readout.get("readout"), "shift": readout.get("shift"),
            "shift_negative": readout.get("shift_negative"), "probe_trained_at": readout.get("probe_trained_at"),
            "edit_applied_at": readout.get("edit_applied_at"), "readout_verdict": own_verdict or heads.get("verdict"),
            "verdict": heads.get("verdict"), "decided_by": heads.get("decided_by"), "note": readout.get("note")}
