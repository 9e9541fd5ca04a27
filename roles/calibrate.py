"""Calibration of the detection rule (:func:`roles.rule.apply_rule`) at the defaults: how often it calls a head of
a randomly initialised model (which has no head functions) a role, and how often it finds a planted one.

``python -m roles.calibrate [--quick] --out DIR`` writes ``DIR/calibration.csv``, one row per (role, path):

* ``tests``: (head, role) pairs judged on random models (models x layers x heads), ``false_positives`` those
  detected, ``rate = false_positives / tests``;
* ``upper95``: the one-sided 95% Clopper-Pearson upper bound of the rate, ``B^-1(0.95; k + 1, n - k)`` (1 when
  ``k = n``), the Beta quantile of Clopper & Pearson (1934);
* ``power``: planted heads detected / planted heads (one planted head per random model, see
  :mod:`roles.calibration_cases`); empty where the role has no planted control (printed as a note).

Paths: ``toy``, ``gpt2``, ``gpt_neox``, ``llama`` (grouped-query) and ``bert`` score the task batches of the toy
tasks; ``llama_text`` scores the real-text batches ``detect`` and ``stages`` build from a tokenizer
(:mod:`roles.calibrate_text`); ``probe`` is the truthfulness probe on shuffled-label caches; the ``functional`` and
``group`` rows are the causal criteria (:mod:`roles.calibrate_causal`). Cases are in :mod:`roles.calibration_cases`.
The bound the rule claims (:mod:`roles.rule`): at most 1% of
(head, role) pairs of random models detected.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from scipy.stats import beta

from headlab.errors import HeadlabError
from headlab.runs import atomic_write_text
from roles import calibrate_text as text
from roles import calibration_cases as cases
from roles.calibrate_causal import causal_counts, plant_self_copy
from roles.calibrate_probe import truthfulness_counts
from roles.patterns import attention_patterns
from roles.registry import DETECTORS, PATTERN_DETECTORS
from roles.rule import ALSO_REQUIRES, apply_rule

COLUMNS = ("role", "path", "tests", "false_positives", "rate", "upper95", "power")
D_HEAD = cases.HIDDEN // 4


def upper95(k: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a binomial rate with ``k`` successes in ``n`` trials."""
    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


def roles_on(path: str, group: str) -> tuple[list[str], list[str]]:
    """The registered roles of ``group`` that apply on ``path``, and a note for each that does not."""
    roles, notes = [], []
    for role in cases.GROUPS[group]:
        if role not in DETECTORS:
            notes.append(f"{role}: not a registered detector")
        elif path == "bert" and role in cases.OV_ROLES:
            notes.append(f"{role} on bert: an encoder has no map to next-token logits (OV/logit detectors)")
        else:
            roles.append(role)
    return roles, notes


@torch.no_grad()
def measure_group(path: str, group: str, roles: list[str], models: int, tokenizer: Any = None
                  ) -> dict[str, dict[str, int]]:
    """False positives and planted detections of ``roles`` on ``models`` random models of ``path`` (the real-text
    path, :mod:`roles.calibrate_text`, needs the ``tokenizer``)."""
    if path == text.PATH:
        def make(seed: int) -> torch.nn.Module:
            return text.text_model(seed, tokenizer)
        batch = text.text_batch(group, tokenizer, make(0), cases.batch_size())
    else:
        batch = cases.group_batch(group, cases.batch_size())
        vocab = cases.vocab_of(batch)

        def make(seed: int) -> torch.nn.Module:
            return cases.random_model(path, seed, vocab)
    counts = {role: {"tests": 0, "fp": 0, "planted": 0, "found": 0} for role in roles}
    for seed in range(models):
        model = make(seed)
        work = dict(batch)
        if any(role in PATTERN_DETECTORS for role in roles):
            work["attentions"] = attention_patterns(model, batch["input_ids"])
        evidence = {role: DETECTORS[role](model, work) for role in roles}
        verdicts = apply_rule(evidence, d_head=D_HEAD)
        for role in roles:
            counts[role]["tests"] += verdicts[role].detected.numel()
            counts[role]["fp"] += int(verdicts[role].detected.sum())
            found = planted_detection(path, model, role, roles, work, evidence, seed)
            if found is not None:
                counts[role]["planted"] += 1
                counts[role]["found"] += int(found)
    return counts


def _knowledge_plant(path: str, model: torch.nn.Module, role: str, roles: list[str], work: dict,
                     evidence: dict, seed: int) -> bool | None:
    """Memory and amplification (toy path): head (0, 0) made self-copying and the final token set to the answer
    (for memory the subject's tokens too, and the position embeddings zeroed, so the head reads the subject and
    writes the answer)."""
    if path != "toy":
        return None
    planted_model = plant_self_copy(model)
    planted = {k: v for k, v in work.items() if k != "attentions"}
    planted["input_ids"] = planted["input_ids"].clone()
    planted["input_ids"][:, -1] = planted["answers"]
    if role == "memory":  # positions zeroed: the head attends equally to every copy of the answer
        with torch.no_grad():
            planted_model.pos_embed.weight.zero_()
        planted["input_ids"][planted["subject_mask"]] = planted["answers"].repeat_interleave(
            planted["subject_mask"].sum(-1))
    judged = apply_rule({**evidence, **{r: DETECTORS[r](planted_model, planted) for r in roles}}, d_head=D_HEAD)
    return bool(judged[role].detected[0, 0])


def _successor_plant(path: str, model: torch.nn.Module, role: str, roles: list[str], work: dict,
                     evidence: dict, seed: int) -> bool | None:
    """Successor (toy path): a wider 1-head toy model whose layer-1 head maps each ordinal to its successor
    (:func:`roles.calibration_cases.plant_successor`)."""
    if path != "toy":
        return None
    planted_model = cases.plant_successor(seed, cases.vocab_of(work), work["successor_pairs"])
    judged = apply_rule({"successor": DETECTORS["successor"](planted_model, work)}, d_head=D_HEAD)
    return bool(judged[role].detected[cases.PLANTED[0]].any())


def _attention_plant(path: str, model: torch.nn.Module, role: str, roles: list[str], work: dict,
                     evidence: dict, seed: int) -> bool | None:
    """Attention roles: head :data:`cases.PLANTED` with its attention mixed towards the role's targets (share
    :data:`cases.PLANT_BY_ROLE`) and, for the OV roles on the toy path, a copying OV circuit."""
    target = cases.target_mask(role, work)
    weights = role in cases.WEIGHT_PLANTS
    if (weights and path != "toy") or (target is None and not weights):
        return None
    planted_model = cases.plant_copying(model) if weights else model
    share = cases.PLANT_BY_ROLE.get(role, cases.PLANT)
    planted = {**work, "attentions": cases.plant(work["attentions"], target, share)} if target is not None else work
    needed = [role, *(r for r in roles if r != role and ALSO_REQUIRES.get(role) == r)]
    judged = apply_rule({**evidence, **{r: DETECTORS[r](planted_model, planted) for r in needed}}, d_head=D_HEAD)
    return bool(judged[role].detected[cases.PLANTED])


PLANTS = {"memory": _knowledge_plant, "amplification": _knowledge_plant, "successor": _successor_plant}
"""Roles whose planted head is not an attention mix (every other role: :func:`_attention_plant`)."""
TOY_ONLY_PLANTS = cases.WEIGHT_PLANTS | set(PLANTS)
"""Roles whose plant exists for the toy layout only (their power is empty on the Hugging Face paths)."""


def planted_detection(path: str, model: torch.nn.Module, role: str, roles: list[str], work: dict,
                      evidence: dict, seed: int = 0) -> bool | None:
    """Whether the rule detects the planted head for ``role`` (None: no plant on this path), by the role's plant
    in :data:`PLANTS` or, by default, :func:`_attention_plant`."""
    return PLANTS.get(role, _attention_plant)(path, model, role, roles, work, evidence, seed)


def row(role: str, path: str, c: dict[str, int]) -> dict:
    """A table row from counts ``tests``, ``fp``, ``planted``, ``found``."""
    power = f"{c['found'] / c['planted']:.3f}" if c["planted"] else ""
    return {"role": role, "path": path, "tests": c["tests"], "false_positives": c["fp"],
            "rate": f"{c['fp'] / c['tests']:.4f}", "upper95": f"{upper95(c['fp'], c['tests']):.4f}", "power": power}


def calibrate(models: int, caches: int = 0, causal: int = 0, text_models: int = 0,
              paths: Sequence[str] = cases.PATHS) -> tuple[list[dict], list[str]]:
    """Rows of the calibration table and the notes on what is not measured: ``models`` random models per path for
    the detectors, ``text_models`` for the real-text path (0: none), ``caches`` shuffled and planted head caches for
    the truthfulness probe (0: no probe row), ``causal`` random and planted toy models for the functional and group
    criteria (0: no rows)."""
    rows, notes = [], []
    for path in paths:
        for group in cases.GROUPS:
            roles, skipped = roles_on(path, group)
            notes += skipped
            rows += [row(role, path, c) for role, c in measure_group(path, group, roles, models).items()]
    if text_models:
        tokenizer, why = text.text_tokenizer()
        notes += [why] if why else []
        for group in text.GROUPS if tokenizer is not None else ():
            roles, skipped = roles_on(text.PATH, group)
            notes += skipped
            rows += [row(role, text.PATH, c)
                     for role, c in measure_group(text.PATH, group, roles, text_models, tokenizer).items()]
    if caches:
        rows.append(row("truthfulness", "probe", truthfulness_counts(caches)))
    if causal:
        rows += [row(criterion, "toy", c) for criterion, c in causal_counts(causal).items()]
        notes.append("functional, group: measured on the toy path only (a self-copying head planted in a toy model)")
    unplanted: dict[str, list[str]] = {}
    for r in rows:
        if not r["power"]:
            unplanted.setdefault(r["role"], []).append(r["path"])
    for role, where in unplanted.items():
        why = ("the planted weights are built for the toy layout only" if role in TOY_ONLY_PLANTS
               else "no planted head for this role yet")
        notes.append(f"{role}: power empty on {', '.join(where)} ({why})")
    return rows, notes


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one error: line, exit 2 (headlab's CLI convention)
        raise HeadlabError(f"{message}; usage: python -m roles.calibrate [--quick] [--models N] --out DIR")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m roles.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for calibration.csv")
    parser.add_argument("--quick", action="store_true", help="40 random models per architecture instead of 100")
    parser.add_argument("--models", type=int, default=None, help="random models per architecture (overrides)")
    args = parser.parse_args(argv)
    args.models = args.models if args.models is not None else (40 if args.quick else 100)
    if args.models < 1:
        raise HeadlabError(f"--models {args.models} must be at least 1 (10 or more for the power rows)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(argv)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise HeadlabError(f"--out {out} is a file; pass a folder")
    except HeadlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rows, notes = calibrate(args.models, caches=10 if args.quick else 25, causal=20 if args.quick else 60,
                            text_models=20 if args.quick else 50)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "calibration.csv", to_csv(rows))
    print(to_table(rows))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"wrote {out / 'calibration.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
