"""Every command refuses bad input with one ``error:`` line naming the value, exit code 2, no traceback, and
nothing half-written; output folders have one writer at a time and never overwrite another command's run."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"

import numpy as np
import pytest
import transformers
import yaml
from tiny_models import save_tiny_model

from data import write_cache
from headlab.cli import main
from headlab.runs import run_directory


@dataclass
class World:
    """Valid inputs of every command, and damaged copies of them."""

    root: Path
    model: Path  # a tiny GPT-2 with its tokenizer
    data: Path  # a valid JSONL dataset
    cache: Path  # a valid head cache
    toy: Path  # a finished toy run
    probe_run: Path  # a finished probe run


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    model = save_tiny_model("gpt2", root / "gpt2")
    data = _jsonl(root / "data.jsonl", [{"text": f"the capital of {w}", "label": i % 2}
                                         for i, w in enumerate(["paris", "rome", "berlin", "france"] * 4)])
    rng = np.random.default_rng(0)
    cache = write_cache(root / "cache", rng.normal(size=(60, 2, 2, 4)).astype(np.float16),
                        {"label": np.arange(60) % 2}).path
    toy = root / "toy"
    assert main(["toy", "--out", str(toy), "--logger", "none", "--train.steps", "4", "--train.track_every", "2",
                 "--task_options", '{"vocab": 8, "length": 16, "min_segment": 2, "max_segment": 6}',
                 "--model.d_model", "8", "--model.n_heads", "2", "--detection.batch_size", "4",
                 "--detection.n_null", "2", "--detection.eval_batch_size", "4", "--train.eval_batch_size", "4"]) == 0
    probe_run = root / "probe"
    assert main(["probe", "--cache", str(cache), "--out", str(probe_run), "--logger", "none",
                 "--control.permutations", "0", "--control.bootstrap", "0"]) == 0
    return World(root, model, data, cache, toy, probe_run)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncated_model(w: World, tmp: Path) -> Path:
    copy = _copy(w.model, tmp / "truncated")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return copy


def unknown_type_model(w: World, tmp: Path) -> Path:
    copy = _copy(w.model, tmp / "unknown")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "no_such_architecture"}))
    return copy


def t5_model(w: World, tmp: Path) -> Path:
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5Model(config).save_pretrained(tmp / "t5")
    return tmp / "t5"


def damaged_copy(source: str, name: str, edit: Callable[[Path], None]) -> Callable[[World, Path], Path]:
    """A case's input: a copy of the world's ``source`` folder (``cache`` or ``toy``) under ``name``, then ``edit``."""
    def make(w: World, tmp: Path) -> Path:
        copy = _copy(getattr(w, source), tmp / name)
        edit(copy)
        return copy

    return make


def damaged_cache(edit: Callable[[Path], None]) -> Callable[[World, Path], Path]:
    return damaged_copy("cache", "damaged", edit)


def _edit_rows(cache: Path) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "rows": manifest["rows"] + 7}))


def _truncate_shard(cache: Path) -> None:
    shard = cache / "shards" / "00000.npy"
    shard.write_bytes(shard.read_bytes()[:200])


def toy_copy(edit: Callable[[Path], None]) -> Callable[[World, Path], Path]:
    return damaged_copy("toy", "toyrun", edit)


def _sweep_file(tmp: Path, **overrides) -> Path:
    spec = {"command": "probe", "base": {"logger": "none"}, "space": {"probe.l2": [0.1, 1.0]},
            "objective": {"metric": "max_accuracy"}, "trials": 2, **overrides}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


OUT = "{out}"  # replaced by a fresh output folder of each case
TOY_SMALL = ["--task_options", '{"vocab": 8, "length": 16, "min_segment": 2, "max_segment": 6}']

# (case id, argv built from (world, tmp folder, prepared input), what the error line must contain, preparation)
CASES: list[tuple[str, Callable, str, Callable | None]] = [
    # cache
    ("cache-missing-dataset", lambda w, t, p: ["cache", "--model", w.model, "--dataset", "missing.jsonl"],
     "does not exist", None),
    ("cache-missing-model", lambda w, t, p: ["cache", "--model", "./no/such/model", "--dataset", w.data],
     "does not exist", None),
    ("cache-no-layers", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data, "--layers", "[]"],
     "--layers [] selects no layer", None),
    ("cache-negative-max-length", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data,
                                                   "--max_length", "-4"], "--max_length -4", None),
    ("cache-negative-limit", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data, "--limit", "-5"],
     "--limit -5", None),
    ("cache-zero-batch", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data, "--batch_size", "0"],
     "--batch_size 0", None),
    ("cache-zero-shard-size", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data, "--shard_mb", "0"],
     "--shard_mb 0", None),
    ("cache-blank-text", lambda w, t, p: ["cache", "--model", w.model, "--dataset", p],
     "example 1 has no text", lambda w, t: _jsonl(t / "blank.jsonl", [{"text": "rome", "label": 0},
                                                                       {"text": "   ", "label": 1}])),
    ("cache-infinite-label", lambda w, t, p: ["cache", "--model", w.model, "--dataset", p],
     "is inf at row 1", lambda w, t: _jsonl(t / "inf.jsonl", [{"text": "rome", "label": 0.5},
                                                              {"text": "paris", "label": float("inf")}])),
    ("cache-unmarked", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data, "--positions", "marked"],
     "needs marked tokens", None),
    ("cache-bad-dtype", lambda w, t, p: ["cache", "--model", w.model, "--dataset", w.data, "--dtype", "float8"],
     "dtype", None),
    ("cache-truncated-weights", lambda w, t, p: ["cache", "--model", p, "--dataset", w.data],
     "cannot load model", truncated_model),
    ("cache-unknown-model-type", lambda w, t, p: ["cache", "--model", p, "--dataset", w.data],
     "cannot load model", unknown_type_model),
    ("cache-t5", lambda w, t, p: ["cache", "--model", p, "--dataset", w.data], "model_type 't5'", t5_model),
    # probe
    ("probe-not-a-cache", lambda w, t, p: ["probe", "--cache", t / "nothing"], "is not a head cache", None),
    ("probe-negative-l2", lambda w, t, p: ["probe", "--cache", w.cache, "--probe.l2", "-1"], "--probe.l2 -1", None),
    ("probe-zero-workers", lambda w, t, p: ["probe", "--cache", w.cache, "--workers", "0"], "--workers 0", None),
    ("probe-adam-zero-batch", lambda w, t, p: ["probe", "--cache", w.cache, "--probe.solver", "adam",
                                               "--probe.batch_size", "0"], "--probe.batch_size 0", None),
    ("probe-adam-zero-epochs", lambda w, t, p: ["probe", "--cache", w.cache, "--probe.solver", "adam",
                                                "--probe.epochs", "0"], "--probe.epochs 0", None),
    ("probe-negative-permutations", lambda w, t, p: ["probe", "--cache", w.cache, "--control.permutations", "-1"],
     "--control.permutations -1", None),
    ("probe-val-fraction", lambda w, t, p: ["probe", "--cache", w.cache, "--split.val_fraction", "1.5"],
     "--split.val_fraction 1.5", None),
    ("probe-one-fold", lambda w, t, p: ["probe", "--cache", w.cache, "--split.folds", "1"], "--split.folds 1", None),
    ("probe-too-many-top-heads", lambda w, t, p: ["probe", "--cache", w.cache, "--report.top_k", "99"],
     "--report.top_k 99", None),
    ("probe-unknown-label", lambda w, t, p: ["probe", "--cache", w.cache, "--probe.label", "nope"],
     "no label column 'nope'", None),
    ("probe-l2-not-a-number", lambda w, t, p: ["probe", "--cache", w.cache, "--probe.l2", "abc"], "abc", None),
    ("probe-edited-rows", lambda w, t, p: ["probe", "--cache", p], "says 67 rows but its shards hold 60",
     damaged_cache(_edit_rows)),
    ("probe-truncated-shard", lambda w, t, p: ["probe", "--cache", p], "is truncated", damaged_cache(_truncate_shard)),
    ("probe-missing-labels", lambda w, t, p: ["probe", "--cache", p], "labels/label.npy is missing",
     damaged_cache(lambda c: (c / "labels" / "label.npy").unlink())),
    # toy
    ("toy-zero-steps", lambda w, t, p: ["toy", "--train.steps", "0"], "--train.steps 0", None),
    ("toy-zero-batch", lambda w, t, p: ["toy", "--train.batch_size", "0"], "--train.batch_size 0", None),
    ("toy-zero-heads", lambda w, t, p: ["toy", "--model.n_heads", "0"], "--model.n_heads 0", None),
    ("toy-indivisible-width", lambda w, t, p: ["toy", "--model.d_model", "30"], "not a multiple", None),
    ("toy-negative-vocab", lambda w, t, p: ["toy", "--task_options", '{"vocab": -3}'], "vocab=-3", None),
    ("toy-zero-eval-batch", lambda w, t, p: ["toy", "--train.eval_batch_size", "0"], "--train.eval_batch_size 0",
     None),
    ("toy-unknown-task", lambda w, t, p: ["toy", "--task", "nope"], "unknown task 'nope'", None),
    ("toy-zero-seeds", lambda w, t, p: ["toy", "--seeds", "0", *TOY_SMALL], "--seeds must be at least 1", None),
    ("toy-unknown-option", lambda w, t, p: ["toy", "--task_options", '{"colour": 3}'], "has no option colour", None),
    # detect
    ("detect-zero-batch", lambda w, t, p: ["detect", "--model", w.model, "--detection.batch_size", "0"],
     "--detection.batch_size 0", None),
    ("detect-one-null-model", lambda w, t, p: ["detect", "--model", w.model, "--detection.n_null", "1"],
     "--detection.n_null 1", None),
    ("detect-missing-model", lambda w, t, p: ["detect", "--model", t / "missing"], "cannot load model", None),
    ("detect-truncated-weights", lambda w, t, p: ["detect", "--model", p], "cannot load model", truncated_model),
    ("detect-unknown-model-type", lambda w, t, p: ["detect", "--model", p], "cannot load model",
     unknown_type_model),
    ("detect-t5", lambda w, t, p: ["detect", "--model", p], "t5", t5_model),
    # reemergence
    ("reemergence-missing-run", lambda w, t, p: ["reemergence", "--runs", f"[{t / 'missing'}]"], "does not exist",
     None),
    ("reemergence-one-run", lambda w, t, p: ["reemergence", "--runs", f"[{w.toy}]"], "at least 2 runs", None),
    ("reemergence-empty-roles", lambda w, t, p: ["reemergence", "--runs", f"[{w.toy}, {p}]"],
     "is not a role table", toy_copy(lambda r: (r / "roles.csv").write_text(""))),
    ("reemergence-garbage-roles", lambda w, t, p: ["reemergence", "--runs", f"[{w.toy}, {p}]"],
     "lacks column(s)", toy_copy(lambda r: (r / "roles.csv").write_text("a,b\n1,2\n"))),
    ("reemergence-broken-metrics", lambda w, t, p: ["reemergence", "--runs", f"[{w.toy}, {p}]"],
     "is not valid JSON", toy_copy(lambda r: (r / "metrics.json").write_text("{nope"))),
    # stages
    ("stages-nothing", lambda w, t, p: ["stages"], "nothing to compare", None),
    ("stages-missing-run", lambda w, t, p: ["stages", "--toy_runs", f"[{t / 'missing'}]"], "does not exist", None),
    ("stages-unknown-role", lambda w, t, p: ["stages", "--toy_runs", f"[{w.toy}]", "--stage_map", '{"nope": "LR"}'],
     "unknown role 'nope'", None),
    ("stages-garbage-roles", lambda w, t, p: ["stages", "--toy_runs", f"[{p}]"], "lacks column(s)",
     toy_copy(lambda r: (r / "roles.csv").write_text("a,b\n1,2\n"))),
    ("stages-short-length", lambda w, t, p: ["stages", "--toy_runs", f"[{w.toy}]", "--length", "2"], "--length 2",
     None),
    # sweep
    ("sweep-trials-not-a-number", lambda w, t, p: ["sweep", "--config", p], "`trials: abc` must be a whole number",
     lambda w, t: _sweep_file(t, trials="abc")),
    ("sweep-zero-trials", lambda w, t, p: ["sweep", "--config", p, "--trials", "0"], "--trials must be at least 1",
     lambda w, t: _sweep_file(t, base={"cache": str(w.cache), "logger": "none"})),
    ("sweep-missing-file", lambda w, t, p: ["sweep", "--config", t / "missing.yaml"], "does not exist", None),
    ("sweep-unknown-command", lambda w, t, p: ["sweep", "--config", p], "`command` must be one of",
     lambda w, t: _sweep_file(t, command="nope")),
    ("sweep-unknown-key", lambda w, t, p: ["sweep", "--config", p], "does not parse",
     lambda w, t: _sweep_file(t, base={"cache": str(w.cache)}, space={"probe.nope": [1, 2]})),
]


def _argv(build, world: World, tmp: Path, prepared, out: Path) -> list[str]:
    args = [str(a) for a in build(world, tmp, prepared)]
    return [*args, "--out", str(out)]


@pytest.mark.parametrize(("build", "message", "prepare"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(world, tmp_path, capsys, build, message, prepare):
    prepared = prepare(world, tmp_path) if prepare else None
    out = tmp_path / "out"
    assert main(_argv(build, world, tmp_path, prepared, out)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_the_battery_covers_every_command_with_40_cases():
    from headlab.cli import COMMANDS

    commands = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 40 and commands >= set(COMMANDS) - {"demo"}


@pytest.mark.parametrize("command", ["cache", "probe", "toy", "detect", "stages", "reemergence", "sweep"])
def test_an_out_that_is_a_file_or_lies_under_one_is_refused(world, tmp_path, capsys, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = {"cache": ["--model", world.model, "--dataset", world.data], "probe": ["--cache", world.cache],
            "toy": [], "detect": ["--model", world.model], "stages": ["--toy_runs", f"[{world.toy}]"],
            "reemergence": ["--runs", f"[{world.toy}, {world.toy}]"],
            "sweep": ["--config", _sweep_file(tmp_path, base={"cache": str(world.cache), "logger": "none"})]}[command]
    for out, message in [(blocker, "is a file"), (blocker / "below", "lies under the file")]:
        assert main([command, *map(str, argv), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_a_run_never_overwrites_another_commands_run(world, tmp_path, capsys):
    before = sorted(p.name for p in world.cache.iterdir())
    assert main(["probe", "--cache", str(world.cache), "--out", str(world.cache), "--logger", "none"]) == 2
    assert "holds a `cache` run" in capsys.readouterr().err
    assert sorted(p.name for p in world.cache.iterdir()) == before
    assert main(["toy", "--out", str(world.probe_run), *TOY_SMALL]) == 2
    assert "holds a `probe` run" in capsys.readouterr().err


def test_a_second_run_into_a_locked_folder_fails_at_once(world, tmp_path, capsys):
    out = tmp_path / "busy"
    with run_directory(out, "probe"):  # another run holds the folder
        assert main(["probe", "--cache", str(world.cache), "--out", str(out), "--logger", "none"]) == 2
        assert "another headlab run is writing to" in capsys.readouterr().err
        assert not (out / "heads.csv").exists()
    assert main(["probe", "--cache", str(world.cache), "--out", str(out), "--logger", "none",
                 "--control.permutations", "0", "--control.bootstrap", "0"]) == 0  # free again


def test_debug_shows_the_traceback(world, tmp_path):
    with pytest.raises(Exception, match=r"--probe\.l2 -1"):
        main(["probe", "--cache", str(world.cache), "--probe.l2", "-1", "--debug"])
