"""Mutation check of the modules holding the statistical rules: does some test fail when the rule is changed?

``python benchmarks/mutation_check.py [--sample N] [--seed S] [--module FILE] [--out report.csv]``

Each mutant changes one operator or constant of one module (``<`` to ``<=``, ``+`` to ``-``, ``and`` to ``or``,
a ``not`` dropped, a number ``n`` to ``n + 1``, ``True`` to ``False``; docstrings are left alone). The modules and
their heavy imports are loaded once; each mutant then runs in a forked child that executes the mutated source
into the loaded module, rebinds every name other modules imported from it, and runs the rule tests
(:data:`TESTS`) with ``pytest -x``. A mutant is **killed** when a test fails, **survived** when all pass, and
**explained** when it survived and :data:`EXPLAINED` says why no test can see it (an equivalent mutant, or one
only slow end-to-end tests see). The script prints one line per mutant and a summary line
``mutants=N killed=K explained=E survived=S score=K/(N-E)``; exit 1 when any unexplained mutant survives.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"roles/rule.py": "roles.rule", "roles/evidence.py": "roles.evidence",
           "headlab/statistics.py": "headlab.statistics", "probes/metrics.py": "probes.metrics"}
TESTS = ["tests/test_statistics.py", "tests/test_detectors.py", "tests/test_group_criterion.py"]
TESTS_OF = {"probes/metrics.py": ["tests/test_statistics.py"],
            "headlab/statistics.py": ["tests/test_statistics.py", "tests/test_group_criterion.py",
                                      "tests/test_memory_knockout.py"]}
"""Test files run against a mutant of a module (the rest: :data:`TESTS`): the probe metrics are used by no
detector, so the detector tests cannot see them."""

EXPLAINED: dict[str, str] = {
    "roles/rule.py:apply_rule:Constant 0->1:1": "torch.zeros(0) -> zeros(1) as the p-values of a call with no "
    "roles: the loop over roles never reads them, so apply_rule({}) returns {} either way (equivalent)",
    "headlab/statistics.py:benjamini_hochberg:Constant 0->1:0": "`p.size == 0` -> `== 1`: a single p-value is "
    "returned as it is, and BH leaves one p-value unchanged (m / k = 1; equivalent)",
    "headlab/statistics.py:benjamini_hochberg:Constant 1->2:0": "the cap at 1 -> 2: after the running minimum from "
    "the largest p (whose factor m / m is 1) no adjusted value exceeds the largest p, so the cap never acts "
    "(equivalent)",
    "headlab/statistics.py:paired_greater_p:Gt->GtE:1": "`d.shape[0] > 1` -> `>= 1` chooses how the spread of a "
    "single sample is computed (NaN or 0); a column with fewer than two samples gets p = 1 either way (equivalent)",
    "headlab/statistics.py:paired_greater_p:Constant 0.0->1.0:1": "the fill of columns with no sample (n = 0), "
    "which get p = 1 whatever their mean (equivalent)",
    "headlab/statistics.py:paired_greater_p:Constant 0->1:6": "`n > 0` -> `n > 1` in the same fill: it also fills "
    "one-sample columns, which get p = 1 anyway (equivalent)",
    "headlab/statistics.py:paired_greater_p:Constant 1->2:4": "d.shape[1:] -> [2:] for the mean of an empty "
    "array: the zeros broadcast to the same p = 1 everywhere (equivalent)",
    "headlab/statistics.py:paired_greater_p:Constant 1->2:5": "d.shape[1:] -> [2:] for the spread of one sample: "
    "broadcast, and p = 1 for fewer than two samples (equivalent)",
    "headlab/statistics.py:paired_greater_p:Constant 1->2:6": "np.maximum(n, 1) -> (n, 2) guards the division "
    "for n < 2 only, where p = 1 regardless (equivalent)",
    "headlab/statistics.py:sign_flip_p:Constant 4096->4097:0": "the chunk size of the sign draws only splits the "
    "same work into other pieces (equivalent for counts; the random stream is cut differently)",
    "probes/metrics.py:auroc_interval:Constant 1->2:0": "the upper clip of the interval's lower end: auc - half "
    "never exceeds 1 (equivalent)",
    "probes/metrics.py:permutation_pvalues:Constant 1->2:3": "the float32 tie tolerance 1e-6 max(1, |obs|) -> "
    "max(2, |obs|): classification counts are integers, and the tolerance only decides ties of the regression "
    "statistic (kept at 1e-6 relative; tested with tied labels)",
    "probes/metrics.py:permutation_pvalues:Mult->Div:0": "the tie tolerance 1e-6 * max(1, |obs|) -> 1e-6 / ...: it "
    "decides only ties that float32 rounding breaks, and whether the float32 sum lands above or below the float64 "
    "one depends on the BLAS build's summation order, so no portable test pins it (not killed; the tied-label test "
    "passes either way on this machine)",
    "headlab/statistics.py:sign_flip_p:Constant 1.0->2.0:1": "a flip by -2 instead of -1: sum s_i d_i >= sum d_i "
    "holds exactly when the flipped d_i sum to at most 0, whatever the negative factor (equivalent)",
    "headlab/statistics.py:sign_flip_p:Constant 1->2:0": "reshape(n, -1) -> reshape(n, -2): numpy treats any "
    "negative size as 'infer this one' (equivalent)",
}
"""Surviving mutants no fast test can see, each with the reason (key: ``file:function:change:occurrence``)."""

COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Pow: ast.Mult}


@dataclass(frozen=True)
class Mutant:
    path: str
    index: int  # which mutation site of the file, in walk order
    line: int
    function: str
    change: str
    occurrence: int  # the how-many-th identical change in that function

    @property
    def key(self) -> str:
        return f"{self.path}:{self.function}:{self.change}:{self.occurrence}"


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            out.add(id(body[0].value))
    return out


def _sites(tree: ast.AST) -> list[tuple[ast.AST, str, object]]:
    """(node, change, how) of every mutation site, in a fixed walk order."""
    skip = _docstrings(tree)
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in COMPARE:
                    sites.append((node, f"{type(op).__name__}->{COMPARE[type(op)].__name__}", ("compare", k)))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            sites.append((node, f"{type(node.op).__name__}->{BINARY[type(node.op)].__name__}", ("binary",)))
        elif isinstance(node, ast.BoolOp):
            other = "Or" if isinstance(node.op, ast.And) else "And"
            sites.append((node, f"{type(node.op).__name__}->{other}", ("bool",)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            sites.append((node, f"drop {type(node.op).__name__}", ("unary",)))
        elif isinstance(node, ast.Constant) and id(node) not in skip and not isinstance(node.value, str):
            if isinstance(node.value, bool):
                sites.append((node, f"Constant {node.value}->{not node.value}", ("constant", not node.value)))
            elif isinstance(node.value, (int, float)):
                new = node.value + 1
                sites.append((node, f"Constant {node.value!r}->{new!r}", ("constant", new)))
    return sites


class _Apply(ast.NodeTransformer):
    def __init__(self, target: ast.AST, how: tuple):
        self.target, self.how = target, how

    def visit(self, node: ast.AST) -> ast.AST:
        if node is not self.target:
            return self.generic_visit(node)
        kind = self.how[0]
        if kind == "compare":
            node.ops[self.how[1]] = COMPARE[type(node.ops[self.how[1]])]()
        elif kind == "binary":
            node.op = BINARY[type(node.op)]()
        elif kind == "bool":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif kind == "unary":
            return node.operand
        elif kind == "constant":
            node.value = self.how[1]
        return node


def _functions(tree: ast.AST) -> dict[int, str]:
    """id(node) -> the name of the innermost function holding it ("<module>" outside any)."""
    owner: dict[int, str] = {}

    def walk(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            owner[id(child)] = inner
            walk(child, inner)
    walk(tree, "<module>")
    return owner


def mutants() -> list[Mutant]:
    out = []
    for path in MODULES:
        tree = ast.parse((ROOT / path).read_text())
        owner = _functions(tree)
        seen: dict[tuple[str, str], int] = {}
        for index, (node, change, _) in enumerate(_sites(tree)):
            function = owner.get(id(node), "<module>")
            occurrence = seen.get((function, change), 0)
            seen[(function, change)] = occurrence + 1
            out.append(Mutant(path, index, getattr(node, "lineno", 0), function, change, occurrence))
    return out


def mutated_source(mutant: Mutant) -> str:
    tree = ast.parse((ROOT / mutant.path).read_text())
    node, _, how = _sites(tree)[mutant.index]
    return ast.unparse(ast.fix_missing_locations(_Apply(node, how).visit(tree)))


def _install(mutant: Mutant) -> None:
    """Execute the mutated source into the loaded module and rebind the names other modules took from it."""
    module = importlib.import_module(MODULES[mutant.path])
    before = dict(vars(module))
    code = compile(mutated_source(mutant), str(ROOT / mutant.path), "exec")
    exec(code, vars(module))
    swaps = {id(old): vars(module)[name] for name, old in before.items()
             if callable(old) and name in vars(module) and vars(module)[name] is not old}
    for other in list(sys.modules.values()):
        space = getattr(other, "__dict__", None)
        if other is module or not isinstance(space, dict):
            continue
        for name, value in list(space.items()):
            if id(value) in swaps and callable(value):
                space[name] = swaps[id(value)]


def run_one(mutant: Mutant, tests: list[str] = TESTS) -> str:
    """``killed`` or ``survived`` (a forked child runs the tests against the mutant)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            import pytest

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            _install(mutant)
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=0, help="mutants drawn at random (0: every mutant)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="CSV report: one row per mutant")
    parser.add_argument("--module", choices=sorted(MODULES), default=None, help="mutate this file only")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="test files run against each mutant (default: the module's own, TESTS_OF or TESTS)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    for name in MODULES.values():  # heavy imports once, in the parent
        importlib.import_module(name)
    import sklearn.metrics  # noqa: F401
    import torch  # noqa: F401

    todo = [m for m in mutants() if args.module in (None, m.path)]
    if args.sample:
        todo = random.Random(args.seed).sample(todo, min(args.sample, len(todo)))
    rows, counts = [], {"killed": 0, "explained": 0, "survived": 0}
    for mutant in todo:
        outcome = run_one(mutant, args.tests or TESTS_OF.get(mutant.path, TESTS))
        if outcome == "survived" and mutant.key in EXPLAINED:
            outcome = "explained"
        counts[outcome] += 1
        rows.append({"key": mutant.key, "line": mutant.line, "outcome": outcome,
                     "reason": EXPLAINED.get(mutant.key, "")})
        print(f"{outcome:9s} {mutant.path}:{mutant.line} {mutant.function} {mutant.change}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["key", "line", "outcome", "reason"])
            writer.writeheader()
            writer.writerows(rows)
    judged = len(todo) - counts["explained"]
    print(f"mutants={len(todo)} killed={counts['killed']} explained={counts['explained']} "
          f"survived={counts['survived']} score={counts['killed']}/{judged}")
    return 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
