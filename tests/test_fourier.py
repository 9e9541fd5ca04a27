"""Fourier-mechanism detector for modular addition (toymodels/fourier.py): hand-built known answers."""

import math
import os

os.environ["WANDB_MODE"] = "disabled"

from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from toymodels.fourier import (
    FourierThresholds,
    all_pair_logits,
    embedding_spectrum,
    excluded_loss,
    fourier_basis,
    fourier_formed,
    fourier_report,
    grokking_curves,
    key_component,
    key_frequencies,
    logit_key_frequencies,
    logit_spectrum,
    neuron_frequencies,
    neuron_key_frequencies,
    restricted_loss,
    spectrum_sparsity,
)

P = 31
KEYS = [3, 7, 11]


def wave_embedding(p: int, freqs: list[int], d_model: int = 16, seed: int = 0) -> torch.Tensor:
    """``[p, d_model]``: cos/sin(2 pi k x / p) of each of ``freqs`` (equal energy), rotated into ``d_model`` dims by
    a random orthonormal map, so every column mixes the frequencies but each frequency keeps 1 / len(freqs) of the
    energy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(p, dtype=torch.float64)
    waves = torch.stack([f(2 * math.pi * k * x / p) for k in freqs for f in (torch.cos, torch.sin)], dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=torch.float64))
    return (waves @ rotation[: waves.shape[1]]).float()


def trig_logits(p: int, freqs: list[int], beta: float = 3.0) -> torch.Tensor:
    """``L[(a, b), c] = beta * sum_k cos(w_k (a + b - c))`` ``[p * p, p]``: Nanda et al.'s output form."""
    a = torch.arange(p).repeat_interleave(p)[:, None].double()
    b = torch.arange(p).repeat(p)[:, None].double()
    c = torch.arange(p)[None, :].double()
    return sum(beta * torch.cos(2 * math.pi * k * (a + b - c) / p) for k in freqs).float()


def test_fourier_basis_is_orthonormal_and_labels_frequencies():
    basis, freq = fourier_basis(7)
    assert torch.allclose(basis @ basis.T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert freq.tolist() == [0, 1, 1, 2, 2, 3, 3]
    # row 3 is sqrt(2/7) cos(2 pi 2 x / 7): at x = 0 it is sqrt(2/7)
    assert float(basis[3, 0]) == pytest.approx(math.sqrt(2 / 7))
    with pytest.raises(ValueError):
        fourier_basis(8)


def test_embedding_of_three_frequencies_has_exactly_those_keys_and_sparsity_one():
    share = embedding_spectrum(wave_embedding(P, KEYS), P)
    assert share.shape == ((P - 1) // 2 + 1,)
    assert float(share.sum()) == pytest.approx(1.0, abs=1e-6)
    keys = key_frequencies(share)
    assert sorted(keys) == KEYS
    assert spectrum_sparsity(share, keys) == pytest.approx(1.0, abs=1e-6)


def test_single_cosine_embedding_puts_all_energy_on_its_frequency():
    x = torch.arange(P, dtype=torch.float64)
    w_e = torch.cos(2 * math.pi * 5 * x / P)[:, None].repeat(1, 4).float()  # [P, 4]
    share = embedding_spectrum(w_e, P)
    assert float(share[5]) == pytest.approx(1.0, abs=1e-6)
    assert key_frequencies(share) == [5]


def test_random_embedding_has_no_key_frequency():
    g = torch.Generator().manual_seed(1)
    for p, d in ((31, 64), (113, 128)):
        share = embedding_spectrum(torch.randn(p, d, generator=g), p)
        assert key_frequencies(share) == []


def test_key_component_of_trig_logits_is_the_whole_logits():
    logits = trig_logits(P, KEYS)
    assert torch.allclose(key_component(logits, P, KEYS), logits, atol=1e-4)
    assert torch.allclose(key_component(logits, P, [5]), torch.zeros_like(logits), atol=1e-4)


def test_restricted_and_excluded_loss_on_trig_logits():
    logits = trig_logits(P, KEYS, beta=3.0)
    labels = (torch.arange(P).repeat_interleave(P) + torch.arange(P).repeat(P)) % P
    full = float(nn.functional.cross_entropy(logits.double(), labels))
    # every bit of the logits is at the key frequencies: keeping them changes nothing ...
    assert restricted_loss(logits, P, KEYS) == pytest.approx(full, abs=1e-4)
    # ... and removing them leaves constant logits, i.e. the uniform loss ln p
    assert excluded_loss(logits, P, KEYS) == pytest.approx(math.log(P), abs=1e-4)
    # the wrong frequencies: restricted keeps only the mean (ln p), excluded keeps everything
    assert restricted_loss(logits, P, [1, 2]) == pytest.approx(math.log(P), abs=1e-4)
    assert excluded_loss(logits, P, [1, 2]) == pytest.approx(full, abs=1e-4)
    mask = torch.zeros(P * P, dtype=torch.bool)
    mask[::3] = True
    assert excluded_loss(logits, P, KEYS, mask) == pytest.approx(math.log(P), abs=1e-4)


class TrigModel(nn.Module):
    """A stand-in model: embedding made of KEYS, logits ``trig_logits`` at the ``=`` position."""

    def __init__(self, p: int, freqs: list[int], embedding: torch.Tensor) -> None:
        super().__init__()
        self.p, self.freqs = p, freqs
        self.embed = nn.Embedding(p + 1, embedding.shape[1])
        self.embed.weight.data[:p] = embedding

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        a, b = input_ids[:, 0].double(), input_ids[:, 1].double()
        c = torch.arange(self.p + 1).double()
        out = sum(3.0 * torch.cos(2 * math.pi * k * (a[:, None] + b[:, None] - c[None]) / self.p) for k in self.freqs)
        logits = torch.zeros(len(input_ids), 3, self.p + 1)
        logits[:, -1] = out.float()
        return SimpleNamespace(logits=logits)


def test_fourier_report_passes_a_built_fourier_model_and_fails_a_random_one():
    model = TrigModel(P, KEYS, wave_embedding(P, KEYS))
    assert torch.allclose(all_pair_logits(model, P), trig_logits(P, KEYS), atol=1e-4)
    train = torch.zeros(P * P, dtype=torch.bool)
    train[torch.randperm(P * P, generator=torch.Generator().manual_seed(0))[: P * P // 3]] = True
    report = fourier_report(model, P, train)
    assert sorted(report["key_frequencies"]) == KEYS
    assert report["sparsity"] == pytest.approx(1.0, abs=1e-6)
    assert report["test_accuracy"] == 1.0
    assert report["excluded_loss"] == pytest.approx(math.log(P), abs=1e-4)
    assert report["formed"]

    random = TrigModel(P, KEYS, torch.randn(P, 16, generator=torch.Generator().manual_seed(3)))
    assert not fourier_report(random, P, train)["formed"]  # the embedding has no key frequency


def test_fourier_formed_needs_every_condition():
    good = {"key_frequencies": [3], "sparsity": 0.9, "restricted_loss": 0.1, "excluded_gap": 4.0}
    assert fourier_formed(good)
    for key, bad in (("key_frequencies", []), ("sparsity", 0.4), ("restricted_loss", 2.0), ("excluded_gap", 0.2)):
        assert not fourier_formed({**good, key: bad})
    assert fourier_formed({**good, "sparsity": 0.4}, FourierThresholds(min_sparsity=0.3))


def test_untrained_toy_models_do_not_pass():
    from toymodels.modeling import ToyTransformer, ToyTransformerConfig

    p = 23
    for seed in range(3):
        torch.manual_seed(seed)
        config = ToyTransformerConfig(
            vocab_size=p + 1,
            max_position_embeddings=3,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            attn_only=False,
            intermediate_size=64,
            layer_norm=False,
        )
        assert not fourier_report(ToyTransformer(config).eval(), p)["formed"]


def test_grokking_curves_merge_train_and_test(tmp_path):
    pd.DataFrame({"step": [0, 10, 20], "eval_loss": [3.0, 2.0, 0.1], "eval_accuracy": [0.0, 0.1, 1.0]}).to_csv(
        tmp_path / "eval_curve.csv", index=False
    )
    (tmp_path / "logs").mkdir()
    pd.DataFrame({"step": [9, 19], "train/loss": [0.5, 0.01], "train/accuracy": [0.9, 1.0]}).to_csv(
        tmp_path / "logs" / "metrics.csv", index=False
    )
    curve = grokking_curves(tmp_path)
    assert curve["test_accuracy"].tolist() == [0.0, 0.1, 1.0]
    assert curve["train_accuracy"].tolist()[1:] == [0.9, 1.0]


def test_neurons_built_from_one_frequency_each_are_assigned_that_frequency():
    a = torch.arange(P).repeat_interleave(P).double()
    b = torch.arange(P).repeat(P).double()
    w = lambda k: 2 * math.pi * k / P  # noqa: E731
    acts = torch.stack(
        [
            torch.cos(w(3) * (a + b)),  # a product term of frequency 3
            torch.cos(w(7) * a) + torch.sin(w(7) * b),  # 1-D terms of frequency 7
            torch.cos(w(7) * a) * torch.cos(w(7) * b) + 0.1 * torch.cos(w(2) * a),  # mostly 7
            torch.cos(w(11) * (a - b)),
        ],
        dim=1,
    ).float()  # [P*P, 4]
    freq, frac = neuron_frequencies(acts, P)
    assert freq.tolist() == [3, 7, 7, 11]
    assert frac[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-5) and 0.95 < float(frac[2]) < 1.0
    assert neuron_key_frequencies(acts, P, min_neurons=0.0) == [7, 3, 11]  # most common first
    noise = torch.randn(P * P, 64, generator=torch.Generator().manual_seed(0))
    assert neuron_key_frequencies(noise, P) == []


def test_logit_spectrum_of_trig_logits_sits_on_their_frequencies():
    share = logit_spectrum(trig_logits(P, KEYS), P)
    assert float(share[KEYS].sum()) == pytest.approx(1.0, abs=1e-4)
    assert sorted(logit_key_frequencies(share)) == KEYS
    noise = torch.randn(P * P, P, generator=torch.Generator().manual_seed(0))
    assert logit_key_frequencies(logit_spectrum(noise, P)) == []
