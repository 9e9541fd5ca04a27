"""The default logger: with WANDB_MODE=offline, probe, toy and sweep runs write offline W&B runs holding the
heads table, the heatmap, the top-head scalars, the directions artifact, the toy plots and role table, and the
sweep's group. The runs are read back from disk: media files from ``files/media`` and every other record from the
run's ``.wandb`` log (LevelDB-style blocks of protobuf ``Record`` messages, parsed with W&B's own schema)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from data import write_cache
from headlab.cli import main

pytestmark = pytest.mark.slow
# W&B's own record schema. A plain import: if a W&B release moves it, these tests fail (they must not skip).
from wandb.proto import wandb_internal_pb2 as wandb_proto  # noqa: E402


def _frames(raw: bytes, block: int = 32768):
    """The records of a W&B log: a 7-byte file header, then 32 KiB blocks of chunks (crc32 u32, length u16, type
    u8: 1 full, 2 first, 3 middle, 4 last)."""
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield data
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            yield pending + data


def read_offline_run(run_dir: Path) -> dict:
    """``{"group", "history": {key: value}, "summary": {key: value}, "artifacts": [(name, type, files)],
    "media": {file name}, "tables": {key: table json}}`` of the single offline run under ``run_dir/wandb``."""
    (run,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    (log,) = run.glob("run-*.wandb")
    out = {"group": None, "history": {}, "summary": {}, "artifacts": []}
    for data in _frames(log.read_bytes()):
        record = wandb_proto.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"] = record.run.run_group
        elif kind == "history":
            for item in record.history.item:
                out["history"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append((record.artifact.name, record.artifact.type,
                                     [entry.path for entry in record.artifact.manifest.contents]))
    media = run / "files" / "media"
    out["media"] = {p.name for p in media.rglob("*") if p.is_file()}
    out["tables"] = {p.name.split("_")[0]: json.loads(p.read_text()) for p in media.rglob("*.table.json")}
    return out


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    x = rng.normal(size=(120, 2, 2, 4)).astype(np.float32)
    x[:, 1, 0, 0] += 2.0 * y
    return write_cache(tmp_path / "cache", x.astype(np.float16), {"label": y}).path


def test_probe_logs_table_heatmap_scalars_and_directions(offline, cache, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--cache", str(cache), "--out", str(out), "--control.permutations", "0",
                 "--control.bootstrap", "0"]) == 0
    run = read_offline_run(out)
    summary = json.loads((out / "summary.json").read_text())
    assert run["group"] == "probe"
    assert run["history"]["max_accuracy"] == pytest.approx(summary["max_accuracy"])
    assert run["history"]["mean_accuracy"] == pytest.approx(summary["mean_accuracy"])
    assert run["history"]["heatmap/_type"] == "image-file" and run["history"]["heads/_type"] == "table-file"
    assert any(name.startswith("heatmap") and name.endswith(".png") for name in run["media"])
    heads = run["tables"]["heads"]
    assert len(heads["data"]) == 4 and {"layer", "head", "accuracy", "selectivity"} <= set(heads["columns"])
    best = max(heads["data"], key=lambda row: row[heads["columns"].index("accuracy")])
    assert best[:2] == [1, 0]  # the planted head
    # the artifact is named after the run directory ("probe") and typed probe-directions
    assert ("probe-directions", "probe-directions", ["directions.safetensors"]) in run["artifacts"]


def test_toy_logs_plots_role_table_and_target(offline, tmp_path):
    out = tmp_path / "toy"
    assert main(["toy", "--out", str(out), "--train.steps", "20", "--train.track_every", "10",
                 "--train.log_every", "5", "--task_options",
                 '{"vocab": 8, "length": 16, "min_segment": 2, "max_segment": 6}', "--model.d_model", "16",
                 "--detection.n_null", "2", "--detection.batch_size", "4", "--detection.eval_batch_size", "8",
                 "--train.eval_batch_size", "8"]) == 0
    run = read_offline_run(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert run["group"] == "toy-induction"
    for plot in ("loss", "role_map", "scores_over_steps"):
        assert run["history"][f"{plot}/_type"] == "image-file"
    roles = run["tables"]["roles"]
    assert len(roles["data"]) == 5 * 2 * 4  # 5 roles x 2 layers x 4 heads
    assert run["summary"]["target/role"] == "induction"
    assert run["summary"]["target/score"] == pytest.approx(metrics["target"]["score"])
    assert "train/loss" in run["history"] and "eval/loss" in run["history"]


def test_sweep_trials_join_the_sweeps_group(offline, cache, tmp_path):
    config = tmp_path / "l2-search.yaml"
    config.write_text(yaml.safe_dump({"command": "probe", "base": {"cache": str(cache), "control": {
        "permutations": 0, "bootstrap": 0}}, "space": {"probe.l2": [0.01, 1.0]},
        "objective": {"metric": "max_accuracy"}, "sampler": "grid", "trials": 2}))
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "sweep")]) == 0
    for trial in ("0000", "0001"):
        assert read_offline_run(tmp_path / "sweep" / "trials" / trial)["group"] == "l2-search"
