"""The truthfulness row of the calibration table (:mod:`roles.calibrate`): the probe verdict of the stage map
(:func:`roles.stages.real.truthfulness_rows`: held-out accuracy >= ``TRUTH_FLOOR`` and BH-adjusted
label-permutation p-value < alpha) on small synthetic head caches.

Each cache has ``GROUPS`` groups of ``PER_GROUP`` rows (one statement's paraphrases, say); a group shares its label
and its ``group`` column, so the probe's split keeps a group on one side. The planted cache adds the label's signal
to 3 dimensions of one head (as ``tests/test_probe.py`` plants it); the null cache permutes the labels over groups
(a grouped shuffle), which leaves no signal in any head.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from data import write_cache
from roles.stages.real import TRUTH_FLOOR

LAYERS, HEADS, D = 2, 8, 8
GROUPS, PER_GROUP = 100, 4
SIGNAL = (1, 2)
STRENGTH = 1.5


def synthetic_cache(path: Path, seed: int, shuffled: bool):
    """A head cache ``[GROUPS * PER_GROUP, LAYERS, HEADS, D]`` with the label planted in head :data:`SIGNAL`, its
    labels permuted over groups when ``shuffled``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, GROUPS)
    group = np.repeat(np.arange(GROUPS), PER_GROUP)
    x = rng.normal(size=(len(group), LAYERS, HEADS, D)).astype(np.float32)
    x[:, SIGNAL[0], SIGNAL[1], :3] += STRENGTH * (2 * labels[group, None] - 1) / np.sqrt(3)
    if shuffled:
        labels = rng.permutation(labels)
    return write_cache(path, [x.astype(np.float16)], {"label": labels[group], "group": group})


def truthfulness_verdicts(seed: int, shuffled: bool, alpha: float = 0.05) -> np.ndarray:
    """Bool ``[LAYERS * HEADS]``: the heads the truthfulness verdict detects on one synthetic cache."""
    from probes import ControlConfig, ProbeConfig, probe

    with tempfile.TemporaryDirectory() as work:
        cache = synthetic_cache(Path(work) / "cache", seed, shuffled)
        with contextlib.redirect_stdout(io.StringIO()):  # the probe's own report
            out = probe(cache.path, Path(work) / "probe", probe=ProbeConfig(label="label"), logger="none",
                        control=ControlConfig(permutations=1000, bootstrap=0), workers=1)
        heads = pd.read_csv(Path(out) / "heads.csv")
    return ((heads["accuracy"] >= TRUTH_FLOOR) & (heads["p_value_bh"] < alpha)).to_numpy()


def truthfulness_counts(caches: int) -> dict[str, int]:
    """False positives over every head of ``caches`` shuffled caches; detections of the planted head over
    ``caches`` planted caches."""
    tests = fp = found = 0
    planted_index = SIGNAL[0] * HEADS + SIGNAL[1]
    for seed in range(caches):
        null = truthfulness_verdicts(seed, shuffled=True)
        tests, fp = tests + null.size, fp + int(null.sum())
        found += int(truthfulness_verdicts(1000 + seed, shuffled=False)[planted_index])
    return {"tests": tests, "fp": fp, "planted": caches, "found": found}
