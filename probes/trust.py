"""When a probe's held-out numbers cannot be trusted, say so instead of printing confident numbers.

Floors on the test part (the rows every reported score comes from):

* ``MIN_TEST_ROWS = 30`` rows: below it one row moves accuracy by more than 3 points, and the percentile bootstrap
  is known to undercover (Efron & Tibshirani 1993 suggest n of a few dozen at least for percentile intervals).
* ``MIN_PER_CLASS = 5`` test rows of every class (classification): a class seen fewer times is scored on luck, and
  macro-F1 swings by 1/k per row.
* ``MIN_UNITS = 10`` bootstrap units (groups with a group column, else rows): a cluster bootstrap over fewer
  resamples so few distinct sets that its interval is meaningless; with one group every resample is the same set
  and the "interval" has zero width. Intervals are then not reported (NaN), and the summary says why.
* **Selectivity** (accuracy minus the control task's, Hewitt & Liang 2019) needs a control task that can be
  scored: when the control labels of the test part take a single value (e.g. the test part is one group, so one
  type with one control label) the control score is 0 or 1 by construction and selectivity is not reported.

Each failed floor becomes one line in ``summary.json``'s ``warnings`` (and ``trusted: false``), printed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from probes.data import ProbeProblem

MIN_TEST_ROWS = 30
MIN_PER_CLASS = 5
MIN_UNITS = 10


@dataclass
class Trust:
    warnings: list[str] = field(default_factory=list)
    intervals: bool = True  # bootstrap intervals are reported
    selectivity: bool = True  # selectivity is reported

    @property
    def trusted(self) -> bool:
        return not self.warnings


def assess(problem: ProbeProblem) -> Trust:
    """The floors above, checked on ``problem``'s test part."""
    trust = Trust()
    test = problem.parts == problem.test_part
    rows = int(test.sum())
    if rows < MIN_TEST_ROWS:
        trust.warnings.append(f"the test part has {rows} rows (floor {MIN_TEST_ROWS}): its scores are coarse; use "
                              "more data or a larger --split.test_fraction")
    if problem.kind != "regression":
        counts = np.bincount(problem.y[test].astype(int), minlength=problem.n_classes)
        if counts.min() < MIN_PER_CLASS:
            trust.warnings.append(f"a class has {int(counts.min())} test rows (floor {MIN_PER_CLASS}): per-class "
                                  "scores rest on a handful of rows")
    units = len(np.unique(problem.groups[test])) if problem.groups is not None else rows
    if units < MIN_UNITS:
        trust.intervals = False
        what = "groups" if problem.groups is not None else "rows"
        trust.warnings.append(f"the test part has {units} bootstrap {what} (floor {MIN_UNITS}): confidence "
                              "intervals are not reported")
    if problem.control_fit is not None:
        control = problem.fits[problem.control_fit].target[test]
        if len(np.unique(control)) < 2:
            trust.selectivity = False
            trust.warnings.append("the control task's test labels take one value, so its score is 0 or 1 by "
                                  "construction: selectivity is not reported")
    return trust
