"""Models larger than one device (headlab/placement.py): a tiny Llama with grouped-query attention, forced by
``--max_memory`` to put its layers on disk, caches what the same model caches on one device; its output weights read
through the offload are the real ones; ablation and steering hooks act on it as on the plain model."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "disabled"

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from data import HeadCache
from headlab.cli import main
from headlab.heads import head_sites, hook_heads, output_weights
from headlab.interventions import steer, zero_ablation
from headlab.models import load_model
from headlab.placement import Placement

OFFLOAD = ["--device_map", "auto", "--max_memory", '{"cpu": "60KB"}']


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model"
    model = tiny_model("llama", 0, causal_lm=True)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    model.save_pretrained(path)
    word_tokenizer(bos=True).save_pretrained(path)
    return path


def _activations(cache_dir) -> np.ndarray:
    cache = HeadCache.open(cache_dir)
    cache.activations.open_all()
    return np.concatenate([cache.activations.mapped(i) for i in range(cache.activations.n_shards)])


def test_an_offloaded_model_caches_what_the_plain_model_caches(llama, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the capital of rome {i}", "label": {i % 2}}}\n' for i in range(12)))
    common = ["cache", "--model", str(llama), "--dataset", str(data), "--batch_size", "4"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "offloaded"), *OFFLOAD,
                 "--offload_folder", str(tmp_path / "offload")]) == 0
    printed = capsys.readouterr().out
    placed = next(line for line in printed.splitlines() if line.startswith("device map:"))
    assert "disk: " in placed and "layers" in placed.split("disk: ")[1]  # the layers went to disk
    plain, offloaded = _activations(tmp_path / "plain"), _activations(tmp_path / "offloaded")
    assert plain.shape == offloaded.shape == (12, 2, 4, 8)
    assert np.array_equal(plain, offloaded)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("plain", "offloaded")]
    assert manifests[0]["model"] == manifests[1]["model"]  # the weights' fingerprint read through the offload


@pytest.mark.parametrize("args, message", [
    (["--max_memory", '{"cpu": "1GB"}'], "need --device_map"),
    (["--device_map", "everywhere"], "is not a placement strategy"),
    (["--device_map", "auto", "--max_memory", '{"cpu": "lots"}'], "is not a size"),
    (["--device_map", "auto", "--max_memory", '{"gpu0": "1GB"}'], "is not a device"),
])
def test_bad_placements_are_one_line_errors(llama, tmp_path, capsys, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b", "label": 0}\n{"text": "b a", "label": 1}\n')
    assert main(["cache", "--model", str(llama), "--dataset", str(data), "--out", str(tmp_path / "c"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_weights_hooks_and_interventions_work_on_the_offloaded_model(llama, tmp_path):
    plain = load_model(str(llama), head="causal_lm")
    placed = load_model(str(llama), head="causal_lm", placement=Placement("auto", {"cpu": "60KB"}, tmp_path / "o"))
    sites = head_sites(placed.model)
    assert sites[1].module.weight.device.type == "meta"  # really offloaded
    for ours, theirs in zip(sites, head_sites(plain.model)):
        assert torch.equal(output_weights(ours)[0], output_weights(theirs)[0])
    ids = torch.randint(3, plain.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    direction = {(1, 2): torch.ones(8)}
    for fn in (zero_ablation([(0, 1), (1, 3)]), steer(direction, 3.0)):
        outputs = []
        for loaded in (plain, placed):
            with torch.no_grad(), hook_heads(loaded.model, fn):
                outputs.append(loaded.model(input_ids=ids).logits)
        with torch.no_grad():
            untouched = plain.model(input_ids=ids).logits
        assert torch.allclose(outputs[0], outputs[1], atol=1e-6) and not torch.allclose(outputs[0], untouched)


def test_detect_maps_the_offloaded_model_as_the_plain_one(llama, tmp_path, capsys):
    """``detect`` takes the same placement flags: scores, controls and verdicts of every head agree."""
    import pandas as pd

    common = ["detect", "--model", str(llama), "--task", "induction", "--length", "24",
              "--detection.batch_size", "4"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "offloaded"), *OFFLOAD,
                 "--offload_folder", str(tmp_path / "offload")]) == 0
    assert "disk: " in capsys.readouterr().out
    plain = pd.read_csv(tmp_path / "plain" / "roles.csv")
    offloaded = pd.read_csv(tmp_path / "offloaded" / "roles.csv")
    assert len(plain) and list(plain.columns) == list(offloaded.columns)
    numeric = plain.select_dtypes("number").columns
    np.testing.assert_allclose(offloaded[numeric].to_numpy(float), plain[numeric].to_numpy(float), atol=1e-5,
                               equal_nan=True)
    assert (plain.select_dtypes(exclude="number").astype(str) == offloaded.select_dtypes(exclude="number")
            .astype(str)).all().all()
