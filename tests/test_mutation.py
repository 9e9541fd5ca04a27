"""The mutation check in CI: a fixed sample of mutants of the statistical rules (``benchmarks/mutation_check.py``),
each of which some fast test must kill unless the script explains why none can."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_sample_of_mutants_of_the_rules_is_killed(tmp_path):
    report = tmp_path / "mutants.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation_check.py"), "--sample", "16",
                           "--seed", "2026", "--out", str(report)], capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("mutants=16 "), done.stdout + done.stderr
    assert done.returncode == 0, f"surviving mutants:\n{done.stdout}"
    lines = report.read_text().splitlines()
    assert len(lines) == 17 and all(",survived," not in line for line in lines)


@pytest.mark.slow
def test_the_check_reports_mutants_that_no_test_kills(tmp_path):
    # the script itself must be able to fail: against a test that checks nothing, every mutant survives
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation_check.py"), "--sample", "3",
                           "--module", "headlab/statistics.py", "--tests", str(tmp_path / "test_nothing.py")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count("survived ") + done.stdout.count("explained ") == 3
    assert "killed=0 " in done.stdout.splitlines()[-1]
