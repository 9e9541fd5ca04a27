"""Data-parallel caching: ``cache --devices 2`` (Lightning's spawn launcher, gloo on CPU) and two torchrun ranks
write the cache one process writes: the same rows in the same order, the same labels and manifest fields, and
activations equal within float32 rounding. A run killed mid-way resumes from every rank's finished shards, and bad
input or a dead rank ends the run with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from tiny_models import save_tiny_model

from data import HeadCache
from data.cache_parts import plan
from headlab.cli import main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled"}
WORDS = ["paris", "berlin", "rome", "france", "germany", "italy", "good", "bad"]


def write_records(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"text": "the capital of " + " ".join(rng.choice(WORDS, size=1 + i % 5)),
                                        "label": int(i % 3), "group": f"g{i // 4}"}) + "\n" for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("models") / "gpt2", padding_side="left")


def cache_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["cache", "--model", str(model), "--dataset", str(data), "--out", str(out), "--dtype", "float32",
            "--positions", "all", *extra]


def assert_same_cache(ours: Path, reference: Path) -> None:
    """Rows, labels, manifest fields and activations of two caches agree (shards may be cut differently)."""
    a, b = HeadCache.open(ours), HeadCache.open(reference)
    for name in ("example", "token"):
        np.testing.assert_array_equal(np.load(ours / "rows" / f"{name}.npy"),
                                      np.load(reference / "rows" / f"{name}.npy"))
    assert sorted(a.labels) == sorted(b.labels)
    for column in b.labels:
        np.testing.assert_array_equal(a.labels[column], b.labels[column])
    np.testing.assert_allclose(np.asarray(a.activations), np.asarray(b.activations), rtol=1e-5, atol=1e-6)
    differ = {k for k in b.manifest if a.manifest.get(k) != b.manifest[k]}
    assert differ <= {"shards", "created"}, differ
    assert not (ours / "parts").exists()


def test_the_plan_covers_every_example_once_in_order():
    for start, end, ranks in [(0, 10, 3), (4, 5, 2), (0, 0, 2), (7, 1007, 8)]:
        ranges = plan(start, end, ranks)
        assert len(ranges) == ranks and ranges[0][0] == start and ranges[-1][1] == end
        assert all(hi == lo2 for (_, hi), (lo2, _) in pairwise(ranges))
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(tiny_gpt2, tmp_path, capfd):
    data = write_records(tmp_path / "data.jsonl", 41)  # an odd count: the ranks get 20 and 21 examples
    assert main(cache_args(tiny_gpt2, data, tmp_path / "one", "--batch_size", "4")) == 0
    assert main(cache_args(tiny_gpt2, data, tmp_path / "two", "--batch_size", "3", "--devices", "2")) == 0
    assert "on 2 processes" in capfd.readouterr().out  # the ranks are processes: their output is on the fds
    assert_same_cache(tmp_path / "two", tmp_path / "one")
    assert len(HeadCache.open(tmp_path / "two").manifest["shards"]) >= 2
    # the parallel cache is an ordinary one: a rerun on one process reuses it
    assert main(cache_args(tiny_gpt2, data, tmp_path / "two", "--batch_size", "3")) == 0
    assert "reused complete cache" in capfd.readouterr().out


@pytest.mark.slow
def test_torchrun_ranks_write_the_same_cache(tiny_gpt2, tmp_path):
    data = write_records(tmp_path / "data.jsonl", 30)
    assert main(cache_args(tiny_gpt2, data, tmp_path / "one")) == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train.py"), *cache_args(tiny_gpt2, data, tmp_path / "two")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cached ") == 1 and "on 2 processes" in result.stdout  # rank 0 reports, once
    assert_same_cache(tmp_path / "two", tmp_path / "one")


def _parts_progress(out: Path) -> list[int]:
    """Shards each part manifest lists (a file mid-rename may be missing: read again on the next poll)."""
    counts = []
    for file in sorted((out / "parts").glob("*.json")) if (out / "parts").is_dir() else []:
        try:
            counts.append(len(json.loads(file.read_text())["shards"]))
        except (OSError, ValueError):
            counts.append(0)
    return counts


@pytest.mark.slow
def test_a_killed_run_resumes_from_every_ranks_finished_shards(tiny_gpt2, tmp_path):
    data = write_records(tmp_path / "data.jsonl", 400)
    assert main(cache_args(tiny_gpt2, data, tmp_path / "one", "--positions", "last", "--batch_size", "8")) == 0
    one_row_shards = ["--positions", "last", "--batch_size", "1", "--shard_mb", "0.000001"]
    out = tmp_path / "two"
    args = [sys.executable, str(REPO / "train.py"), *cache_args(tiny_gpt2, data, out, *one_row_shards),
            "--devices", "2"]
    process = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    # kill the whole job (every rank, as a pre-empted node) once both ranks have finished shards of their own
    while not (len(counts := _parts_progress(out)) == 2 and min(counts) >= 2):
        assert process.poll() is None, f"ended before the kill: {process.communicate()}"
        assert time.monotonic() < deadline, "the ranks never wrote a shard"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    killed_at = _parts_progress(out)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    if max(killed_at) >= 200:
        pytest.fail(f"a rank finished before the kill ({killed_at} shards); the run was too fast to interrupt")
    again = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming examples") == 2, again.stdout  # both ranks reuse what they had finished
    assert_same_cache(out, tmp_path / "one")


def test_bad_input_with_several_processes_is_one_line_and_writes_nothing(tiny_gpt2, tmp_path, capsys):
    data = write_records(tmp_path / "data.jsonl", 8)
    out = tmp_path / "c"
    assert main(cache_args(tiny_gpt2, data, out, "--num_nodes", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --num_nodes 2 needs a launcher") and "torchrun" in err[0]
    assert main(cache_args(tiny_gpt2, data, out, "--devices", "2", "--device_map", "auto")) == 2
    assert "use one of the two" in capsys.readouterr().err
    assert main(cache_args(tiny_gpt2, data, out, "--devices", "0")) == 2
    assert not out.exists()


@pytest.mark.slow
def test_an_error_on_the_ranks_is_one_line_and_leaves_no_folder(tiny_gpt2, tmp_path, capfd):
    data = write_records(tmp_path / "data.jsonl", 8)  # no marks: every rank refuses --positions marked
    out = tmp_path / "c"
    assert main([*cache_args(tiny_gpt2, data, out, "--devices", "2"), "--positions", "marked"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1 and "needs marked tokens" in err
    assert not out.exists()
