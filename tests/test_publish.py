"""Folders published at once (toy checkpoints, the converted SmolLM2): complete or absent, never half-written."""

from __future__ import annotations

import pytest

from headlab.errors import Interrupted
from headlab.publish import publish_folder


def _write_two(folder, fail_after_first: BaseException | None = None):
    (folder / "config.json").write_text("{}")
    if fail_after_first is not None:
        raise fail_after_first
    (folder / "model.safetensors").write_bytes(b"new weights")


def test_a_new_folder_appears_complete(tmp_path):
    final = publish_folder(tmp_path / "model", _write_two)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left beside it


@pytest.mark.parametrize("stop", [OSError(28, "No space left on device"), Interrupted(15), KeyboardInterrupt()])
def test_a_write_stopped_halfway_leaves_the_old_folder_untouched_and_no_debris(tmp_path, stop):
    old = tmp_path / "model"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(type(stop)):
        publish_folder(old, lambda folder: _write_two(folder, fail_after_first=stop))
    assert [p.name for p in old.iterdir()] == ["model.safetensors"]  # no torn config beside the old weights
    assert (old / "model.safetensors").read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_finished_write_replaces_the_old_folder_whole(tmp_path):
    old = tmp_path / "model"
    old.mkdir()
    (old / "stale.bin").write_bytes(b"from an earlier run")
    publish_folder(old, _write_two)
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors"]  # stale file gone
    assert (old / "model.safetensors").read_bytes() == b"new weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_toy_run_killed_while_saving_its_model_leaves_no_torn_checkpoint(tmp_path, monkeypatch):
    """The toy run's ``model/`` goes through publish_folder: a save that dies after its first file leaves no
    ``model/`` that would load with missing weights, and no temporary folder."""
    import os

    os.environ["WANDB_MODE"] = "disabled"
    from toymodels.command import toy
    from toymodels.modeling import ToyTransformer
    from toymodels.training import ToyConfig, TrainConfig

    def dies_after_the_config(self, folder, **kwargs):
        self.config.save_pretrained(folder)
        raise Interrupted(15)

    monkeypatch.setattr(ToyTransformer, "save_pretrained", dies_after_the_config)
    out = tmp_path / "toy"
    with pytest.raises(Interrupted):
        toy(task="induction", task_options={"vocab": 12, "length": 16, "min_segment": 3, "max_segment": 6}, out=out,
            model=ToyConfig(n_layers=1, n_heads=2, d_model=16),
            train=TrainConfig(steps=4, batch_size=8, track_every=4, eval_batch_size=16, log_every=2),
            logger="none", seed=0)
    assert not (out / "model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".model.")]
