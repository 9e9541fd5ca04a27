"""Worker threads only compute: nothing that parses (``np.load``'s header, ``ast``, ``compile``) runs off the main
thread, because CPython 3.11 can crash when two threads parse at once (``SystemError: AST constructor recursion
depth mismatch``). The race is rare, so instead of repeating runs these tests make every parsing call fail
deterministically when a worker thread makes it."""

from __future__ import annotations

import ast
import builtins
import os
import threading
from concurrent.futures import ThreadPoolExecutor

os.environ["WANDB_MODE"] = "disabled"

import numpy as np
import pytest
from tiny_models import save_tiny_model

from data import HeadCache, write_cache
from headlab.cli import main
from probes import probe

try:  # where np.load's header parser lives: numpy >= 2 moved it (pyproject allows numpy >= 1.26)
    from numpy.lib import _format_impl as npy_format
except ImportError:  # numpy 1.x
    from numpy.lib import format as npy_format


class ParsedOffMainThread(AssertionError):
    pass


@pytest.fixture
def parsing_only_on_main_thread(monkeypatch):
    """Every parsing entry point raises when called from a thread other than the main one."""

    def guard(module, name):
        original = getattr(module, name)

        def checked(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                raise ParsedOffMainThread(f"{module.__name__}.{name} called from {threading.current_thread().name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, checked)

    for module, name in [(np, "load"), (npy_format, "_read_array_header"), (ast, "literal_eval"), (ast, "parse"),
                         (builtins, "compile")]:
        guard(module, name)


def test_the_guard_catches_np_load_in_a_worker_thread(parsing_only_on_main_thread, tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    np.load(tmp_path / "a.npy")  # the main thread may
    with ThreadPoolExecutor(1) as pool, pytest.raises(ParsedOffMainThread):
        pool.submit(np.load, tmp_path / "a.npy").result()
    # the header parser itself is guarded (open_memmap parses the header without np.load), so the guard sits on
    # the module numpy really calls, whichever numpy this is
    with ThreadPoolExecutor(1) as pool, pytest.raises(ParsedOffMainThread, match="_read_array_header"):
        pool.submit(np.lib.format.open_memmap, tmp_path / "a.npy", mode="r").result()


def test_shard_mapping_from_a_worker_thread_is_refused(tmp_path):
    cache = write_cache(tmp_path / "c", [np.zeros((4, 1, 2, 3), np.float16)] * 2, {"label": np.arange(8) % 2})
    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match=r"call ShardedArray\.open_all"):
        pool.submit(cache.activations.shard, 1).result()
    cache.activations.open_all()
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(cache.activations.mapped, 1).result().shape == (4, 1, 2, 3)


def test_probe_on_eight_shards_with_workers_parses_only_on_the_main_thread(parsing_only_on_main_thread, tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    x = rng.normal(size=(400, 2, 3, 8)).astype(np.float16)
    x[:, 1, 2, 0] += y  # one head carries the label
    write_cache(tmp_path / "c", np.split(x, 8), {"label": y})
    out = probe(tmp_path / "c", tmp_path / "r", logger="none", workers=2)
    assert (out / "heads.csv").exists()
    assert HeadCache.open(tmp_path / "c").activations.n_shards == 8


def test_cache_command_writes_shards_without_parsing_off_the_main_thread(parsing_only_on_main_thread, tmp_path):
    model = save_tiny_model("gpt2", tmp_path / "gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the capital of rome {i}", "label": {i % 2}}}\n' for i in range(12)))
    assert main(["cache", "--model", str(model), "--dataset", str(data), "--out", str(tmp_path / "c"),
                 "--batch_size", "2", "--shard_mb", "0.0001"]) == 0  # a shard per batch, written by the writer thread
    assert HeadCache.open(tmp_path / "c").activations.n_shards >= 6
