"""The front door: commands, --print_config, --config round trips, every shipped YAML parses, unknown models."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from headlab.cli import COMMANDS, build_parser, main, resolve
from headlab.errors import HeadlabError
from headlab.heads import head_sites, register_architecture

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["probz"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown command 'probz'; choose one of: " + ", ".join(COMMANDS))


@pytest.mark.parametrize(("value", "says"), [("nan", "is not one of Lightning's accelerators"),
                                           ("tpu", "is not available on this machine")])
def test_an_unknown_or_absent_toy_accelerator_is_a_one_line_error(tmp_path, capsys, value, says):
    """Found by tests/test_hostile_values.py: `--train.accelerator nan` reached Lightning and ended as an unexpected
    error (exit 1). An unknown name, or one this machine lacks (no torch_xla here), is refused before any output."""
    out = tmp_path / "toy"
    assert main(["toy", "--task", "induction", "--train.accelerator", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --train.accelerator") and value in err[0] and says in err[0]
    assert not out.exists()


def test_print_config_shows_resolved_values_with_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "--model", "m", "--dataset", "d.jsonl", "--batch_size", "7", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["batch_size"] == 7 and config["positions"] == "last" and config["dtype"] == "float16"


def test_saved_config_reproduces_the_run(tmp_path, capsys):
    from tiny_models import save_tiny_model

    model = save_tiny_model("bert", tmp_path / "bert")
    assert main(["cache", "--model", str(model), "--dataset", "builtin:capitals", "--limit", "20",
                 "--out", str(tmp_path / "c"), "--positions", "mean"]) == 0
    capsys.readouterr()
    assert main(["cache", "--config", str(tmp_path / "c" / "config.yaml")]) == 0
    assert "reused complete cache" in capsys.readouterr().out


def _required(fn) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items() if p.default is inspect.Parameter.empty]


SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name in COMMANDS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses(path):
    """A renamed option fails here, not in a user's run (configs/<command>/*.yaml)."""
    command = path.parent.name
    parser, fn = build_parser(command)
    placeholders = [arg for name in _required(fn) for arg in (f"--{name}", "placeholder")]
    parser.parse_args([*placeholders, "--config", str(path)])


def test_shipped_configs_exist():
    assert SHIPPED or not (REPO / "configs").exists()


def test_every_command_resolves():
    for name in COMMANDS:
        assert callable(resolve(name))


class _Unknown(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "martian", "num_attention_heads": 2,
                                          "num_hidden_layers": 1})()
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"mix": torch.nn.Linear(4, 4)})])


def test_unknown_architecture_names_how_to_register_it():
    with pytest.raises(HeadlabError, match="register_architecture\\('martian'"):
        head_sites(_Unknown())


def test_registered_architecture_is_hooked():
    register_architecture("martian", r"blocks\.(\d+)\.mix")
    try:
        sites = head_sites(_Unknown())
        assert [(s.layer, s.n_heads, s.d_head) for s in sites] == [(0, 2, 2)]
    finally:
        from headlab.heads import ARCHITECTURES

        ARCHITECTURES.pop("martian")
