"""``--probe.device``: the newton solver's data passes run through torch on any device (CUDA when present) and give
the probes scikit-learn gives. Without a GPU here, the torch path is forced on CPU tensors (the same kernels a CUDA
device runs, minus the transfer) and checked against scikit-learn, computed independently; a device the machine
does not have is one error line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import probes.device as probe_device
import probes.newton as newton
from data import write_cache
from headlab.cli import main
from headlab.errors import HeadlabError
from probes import ControlConfig, ProbeConfig, SplitConfig
from probes.data import HeadMajor, build_problem


def planted(tmp_path, kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, d = 400, 16
    y = rng.integers(0, 3 if kind == "multiclass" else 2, rows)
    x = rng.normal(size=(rows, 2, 3, d))
    x[:, 1, 2, :3] += 0.8 * (y[:, None] - y.mean())  # one head carries the label
    return write_cache(tmp_path / kind, x.astype(np.float32), {"label": y})


def fit(cache, cfg: ProbeConfig):
    problem = build_problem(cache, cfg, SplitConfig(), ControlConfig(control_task=True))
    hm = HeadMajor(cache.activations, problem.parts, 4)
    fits, _ = newton.fit_newton(hm, problem, cfg, cache.layers, cache.n_heads, workers=2)
    return problem, fits


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_the_torch_path_gives_scikit_learns_probes(tmp_path, monkeypatch, kind):
    cache = planted(tmp_path, kind)
    cfg = ProbeConfig(l2=1e-2, tol=1e-7, max_iter=300, device="cpu")
    monkeypatch.setattr(probe_device, "_numpy_path", lambda t: False)  # every product through torch.bmm
    problem, fits = fit(cache, cfg)
    assert fits.converged.all()
    train = problem.parts == 0
    x = cache.activations[:].reshape(cache.rows, -1, cache.d_head)
    n = int(train.sum())
    for h in range(x.shape[1]):  # task fit: scikit-learn on standardised inputs, C = 1 / (l2 n)
        scaler = StandardScaler().fit(x[train, h])
        model = LogisticRegression(C=1 / (cfg.l2 * n), max_iter=10000, tol=1e-10)
        model.fit(scaler.transform(x[train, h]), problem.y[train])
        expected = model.decision_function(scaler.transform(x[:, h])).reshape(len(x), -1)
        ours = fits.scores[0, :, h]
        if kind == "multiclass":  # softmax logits are defined up to a constant per row
            ours, expected = ours - ours.mean(1, keepdims=True), expected - expected.mean(1, keepdims=True)
        np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_both_paths_agree_on_every_fit(tmp_path, monkeypatch):
    cache = planted(tmp_path, "binary", seed=1)
    cfg = ProbeConfig(l2=1e-3, tol=1e-6, max_iter=300, device="cpu")
    _, host = fit(cache, cfg)
    monkeypatch.setattr(probe_device, "_numpy_path", lambda t: False)
    _, forced = fit(cache, cfg)
    assert host.converged.all() and forced.converged.all()
    np.testing.assert_allclose(forced.scores, host.scores, atol=2e-4)


def test_a_device_the_machine_lacks_is_one_error_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-device error cannot happen here")
    with pytest.raises(HeadlabError, match="does not have"):
        probe_device.solver_device("cuda")
    assert probe_device.solver_device("auto") == torch.device("cpu")
    cache = planted(tmp_path, "binary")
    for name, message in [("cuda:1", "does not have"), ("warp9", "is not a device")]:
        code = main(["probe", "--cache", str(cache.path), "--out", str(tmp_path / name), "--logger", "none",
                     "--probe.device", name])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0] and name in err[0], err
        assert not (tmp_path / name).exists()
