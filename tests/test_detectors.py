"""Detectors give the expected scores on hand-built attention patterns and hand-built OV circuits, run on plain
Hugging Face models, and fail loudly where patterns are missing."""

import os

os.environ["WANDB_MODE"] = "disabled"

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import toymodels
from headlab.errors import HeadlabError
from roles import DETECTORS, score_heads
from roles.null import null_distribution
from roles.ov import copying, name_copy, successor
from roles.patterns import attention_patterns, induction


def _stack(*heads: torch.Tensor) -> torch.Tensor:
    """Patterns [query, key] of several heads -> [batch=1, layer=1, head, query, key]."""
    return torch.stack(heads)[None, None]


def _uniform(seq: int) -> torch.Tensor:
    return torch.ones(seq, seq).tril() / torch.arange(1, seq + 1)[:, None]


def _offset(seq: int, back: int) -> torch.Tensor:
    """Each query attends to ``back`` tokens earlier (to itself where that does not exist)."""
    pattern = torch.zeros(seq, seq)
    for i in range(seq):
        pattern[i, i - back if i >= back else i] = 1
    return pattern


PERIODIC = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8]])  # every token repeats 4 positions later


def _scores(name: str, patterns: torch.Tensor, ids: torch.Tensor = PERIODIC, **extra) -> torch.Tensor:
    return DETECTORS[name](None, {"input_ids": ids, "attentions": patterns, **extra}).score[0]


def test_previous_token_head_scores_one_and_uniform_head_scores_mean_of_one_over_i():
    seq = PERIODIC.shape[1]
    scores = _scores("previous_token", _stack(_offset(seq, 1), _uniform(seq)))
    expected_uniform = sum(1 / (i + 1) for i in range(1, seq)) / (seq - 1)
    assert scores.tolist() == pytest.approx([1.0, expected_uniform])


def test_induction_head_attends_to_the_token_after_the_earlier_occurrence():
    seq = PERIODIC.shape[1]
    # induction head: at position i >= 4 (token x_i = x_{i-4}) it attends to i - 3, the token after x_{i-4};
    # duplicate-token head attends to i - 4 itself; previous-token head to i - 1
    patterns = _stack(_offset(seq, 3), _offset(seq, 4), _offset(seq, 1))
    assert _scores("induction", patterns).tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert _scores("duplicate_token", patterns).tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_induction_score_uses_only_queries_with_an_earlier_occurrence():
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    pattern = torch.zeros(5, 5)
    pattern[:, 0] = 1.0  # everything on the first token
    pattern[3, 0], pattern[3, 1] = 0.25, 0.75  # query "1" at 3: 3/4 on the "2" that followed the earlier "1"
    pattern[4, 0], pattern[4, 2] = 0.5, 0.5  # query "2" at 4: 1/2 on the "3" that followed the earlier "2"
    assert float(_scores("induction", _stack(pattern), ids)[0]) == pytest.approx((0.75 + 0.5) / 2)


def test_attention_sink_scores_attention_to_the_first_token():
    seq = 8
    sink = torch.zeros(seq, seq)
    sink[:, 0] = 1
    scores = _scores("attention_sink", _stack(sink, _offset(seq, 1)))
    assert scores.tolist() == pytest.approx([1.0, 1 / (seq - 1)])  # only query 1 sees position 0 as previous


def test_iteration_score_reads_the_task_mask():
    seq = 6
    mask = torch.zeros(1, seq, seq, dtype=torch.bool)
    mask[0, 3, 0] = mask[0, 4, 1] = mask[0, 5, 2] = True  # queries 3..5 should read keys 0..2
    diagonal = _offset(seq, 3)
    scores = _scores("iteration", _stack(diagonal, _uniform(seq)), torch.zeros(1, seq, dtype=torch.long),
                     iteration_mask=mask)
    assert scores.tolist() == pytest.approx([1.0, (1 / 4 + 1 / 5 + 1 / 6) / 3])


def test_operand_attention_scores_both_operands_above_chance():
    # rows: the attention of '=' (query 2) over [a, b, =]; the score is 2 (min(A_a, A_b) - A_=), worked by hand
    rows = {"even split": ([0.5, 0.5, 0.0], 1.0), "uniform": ([1 / 3, 1 / 3, 1 / 3], 0.0),
            "one operand": ([1.0, 0.0, 0.0], 0.0), "stays on =": ([0.0, 0.0, 1.0], -2.0),
            "mostly both": ([0.4, 0.4, 0.2], 0.4)}
    heads = []
    for row, _ in rows.values():
        pattern = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], row])
        heads.append(pattern)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[:, 2, :2] = True
    batch = {"input_ids": torch.tensor([[4, 5, 9], [6, 7, 9]]), "operand_mask": mask,
             "attentions": _stack(*heads).expand(2, -1, -1, -1, -1)}
    evidence = DETECTORS["operand_attention"](None, batch)
    assert evidence.score[0].tolist() == pytest.approx([want for _, want in rows.values()], abs=1e-6)
    assert evidence.control[0].tolist() == pytest.approx([2 * row[2] for row, _ in rows.values()], abs=1e-6)
    # the rule's floor (0.6) passes the even split only; uniform attention (2/3 on the operands) no longer passes
    from roles.rule import FLOORS
    assert [s >= FLOORS["operand_attention"] for s in evidence.score[0].tolist()] == [True, False, False, False,
                                                                                      False]


def _circuit_model(ov: list[torch.Tensor], vocab: int = 8) -> toymodels.ToyTransformer:
    """A 1-layer toy model with identity embedding and unembedding, whose head h has OV matrix ``ov[h]``."""
    config = toymodels.ToyTransformerConfig(
        vocab_size=vocab, max_position_embeddings=8, hidden_size=vocab, num_hidden_layers=1,
        num_attention_heads=len(ov), head_dim=vocab, layer_norm=False,
    )
    model = toymodels.ToyTransformer(config)
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.copy_(torch.eye(vocab))
        # v = x W_V^h with W_V^h = I; the head writes z W_O^h with W_O^h = ov[h]: out_proj.weight is [d_model, H*d]
        model.blocks[0].attn.v_proj.weight.copy_(torch.eye(vocab).repeat(len(ov), 1))
        model.blocks[0].attn.out_proj.weight.copy_(torch.cat(ov, dim=0).T)
    return model


def test_copying_score_is_one_for_identity_minus_one_for_negated_identity():
    eye = torch.eye(8)
    scores = copying(_circuit_model([eye, -eye]), {}).score[0]
    assert scores.tolist() == pytest.approx([1.0, -1.0], abs=1e-5)


def test_successor_score_is_one_for_a_successor_permutation_and_zero_for_copying():
    succ = torch.roll(torch.eye(8), 1, dims=1)  # row t has its 1 at column t + 1 (mod 8)
    pairs = torch.tensor([[t, (t + 1) % 8] for t in range(8)])
    scores = successor(_circuit_model([succ, torch.eye(8)]), {"successor_pairs": pairs}).score[0]
    assert scores.tolist() == pytest.approx([1.0, 0.0])


def test_name_mover_copy_score_counts_names_in_their_own_top5_logits():
    eye = torch.eye(8)
    names = torch.arange(4)
    scores = name_copy(_circuit_model([eye, -eye]), {"name_tokens": names}).score[0]
    assert scores.tolist() == pytest.approx([1.0, 0.0])


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_detectors_run_on_a_plain_hugging_face_model_switching_it_to_eager():
    model = _tiny_gpt2()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 50, (2, 16))
    patterns = attention_patterns(model, ids)
    assert model.config._attn_implementation == "eager"
    assert patterns.shape == (2, 2, 4, 16, 16)
    assert torch.allclose(patterns.sum(-1), torch.ones(2, 2, 4, 16), atol=1e-5)
    scores = score_heads(model, {"input_ids": ids})
    assert {"previous_token", "induction", "copying"} <= set(scores)
    assert all(s.shape == (2, 4) for s in scores.values())


def test_gpt2_ov_circuit_matches_a_manual_value_slice():
    model = _tiny_gpt2()
    eye = torch.eye(32)
    with torch.no_grad():  # layer 0: W_V = W_O = identity, so head h's slices are blocks of the identity
        model.transformer.h[0].attn.c_attn.weight[:, 64:] = eye
        model.transformer.h[0].attn.c_proj.weight.copy_(eye)
    from roles.ov import ov_circuit

    ov = ov_circuit(model, 0)
    assert torch.allclose(ov.w_v[1], eye[:, 8:16]) and torch.allclose(ov.w_o[2], eye[16:24])


def test_missing_attention_patterns_fail_loudly():
    class NoPatterns(nn.Module):
        config = SimpleNamespace(_attn_implementation=None)

        def __init__(self):
            super().__init__()
            self.w = nn.Linear(1, 1)

        def forward(self, input_ids, output_attentions=False):
            return SimpleNamespace(attentions=())

    with pytest.raises(HeadlabError, match="eager"):
        induction(NoPatterns(), {"input_ids": PERIODIC})


def test_null_distribution_pools_every_head_of_several_random_initialisations():
    config = toymodels.ToyTransformerConfig(vocab_size=16, max_position_embeddings=16, hidden_size=16,
                                            num_hidden_layers=2, num_attention_heads=2)
    model = toymodels.ToyTransformer(config)
    batch = {"input_ids": torch.randint(0, 16, (4, 16))}
    null = null_distribution(model, batch, ["previous_token", "copying"], n_models=3, seed=40)
    assert null["previous_token"].n == 3 * 2 * 2
    # reference: the same random initialisations (seeds 40..42, std hidden_size ** -0.5 so attention logits are
    # of order one), their patterns from the model's own output, A[i, i-1] averaged by hand, every head pooled
    scores = []
    for seed in (40, 41, 42):
        torch.manual_seed(seed)
        fresh = toymodels.ToyTransformer(toymodels.ToyTransformerConfig(
            vocab_size=16, max_position_embeddings=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            initializer_range=16**-0.5)).eval()
        with torch.no_grad():
            attentions = fresh(input_ids=batch["input_ids"], output_attentions=True).attentions
        for pattern in attentions:  # [batch, heads, query, key]
            diagonal = torch.stack([pattern[:, :, i, i - 1] for i in range(1, 16)], -1)  # [batch, heads, 15]
            scores += diagonal.mean((0, 2)).tolist()
    expected = torch.tensor(scores, dtype=torch.float64)
    assert null["previous_token"].mean == pytest.approx(float(expected.mean()), abs=1e-6)
    assert null["previous_token"].std == pytest.approx(float(expected.std()), abs=1e-6)
    assert null["previous_token"].threshold(3) == pytest.approx(float(expected.mean() + 3 * expected.std()), abs=1e-5)
    # at the small training init (std 0.02) random heads attend uniformly and the spread collapses
    small = null_distribution(model, batch, ["previous_token"], n_models=3, seed=40, unit_logits=False)
    assert null["previous_token"].std > 10 * small["previous_token"].std


def test_unknown_detector_is_a_clear_error():
    with pytest.raises(HeadlabError, match="unknown detector"):
        score_heads(_tiny_gpt2(), {"input_ids": PERIODIC}, ["telepathy"])


def test_iteration_circuit_scores_read_eoi_attention_in_layer_0_and_the_diagonal_above():
    from toymodels.circuits import circuit_of, iteration_scores

    # sequence 0: F F x1 x2 x3 EoI s1 s2 s3 (prefix 2, n = 3, EoI at 5); sequence 1: x1 EoI s1 PAD ... (n = 1)
    seq = 9
    p = torch.eye(seq).repeat(2, 2, 2, 1, 1)  # [batch, layer, head, query, key]: every row on itself
    p[:, :, 1] = _uniform(seq)  # head 1 of both layers: uniform over the keys so far

    def put(b, layer, row, key, weight):
        p[b, layer, 0, row] = 0
        p[b, layer, 0, row, key] = weight
        p[b, layer, 0, row, row] += 1 - weight

    for row, weight in ((6, 1.0), (7, 0.5), (8, 0.25)):  # layer 0, CoT positions s1..s3 to EoI
        put(0, 0, row, 5, weight)
    for row, key, weight in ((5, 2, 1.0), (6, 3, 1.0), (7, 4, 0.4)):  # layer 1, EoI, s1, s2 to x1, x2, x3
        put(0, 1, row, key, weight)
    put(1, 0, 2, 1, 0.2)  # sequence 1: s1 (position 2) to EoI (position 1)
    put(1, 1, 1, 0, 0.6)  # EoI to x1 (position 0)
    eoi_attention, diagonal = iteration_scores(p, torch.tensor([5, 1]), torch.tensor([3, 1]))
    uniform_eoi = ((1 / 7 + 1 / 8 + 1 / 9) / 3 + 1 / 3) / 2  # rows 6..8 see 7..9 keys; row 2 sees 3
    uniform_diagonal = ((1 / 6 + 1 / 7 + 1 / 8) / 3 + 1 / 2) / 2
    assert eoi_attention[0].tolist() == pytest.approx([(7 / 12 + 0.2) / 2, uniform_eoi])
    assert diagonal[1].tolist() == pytest.approx([(0.8 + 0.6) / 2, uniform_diagonal])
    assert diagonal[0, 0] == pytest.approx(0.0)  # layer 0 of this pattern holds no diagonal
    circuit = circuit_of(eoi_attention, diagonal, floor=0.3)
    assert (circuit.layer0_head, circuit.diagonal_layer, circuit.diagonal_head) == (0, 1, 0)
    assert circuit.layer0_eoi_attention == pytest.approx(0.39166, abs=1e-4) and circuit.passed
    assert not circuit_of(eoi_attention, diagonal, floor=0.4).passed  # the EoI half, 0.39, falls short
    # a diagonal in layer 0 alone (the positional shortcut) is no iteration circuit
    shortcut = circuit_of(eoi_attention, torch.stack([diagonal[1], torch.zeros(2)]), floor=0.3)
    assert shortcut.layer1_diagonal == 0 and not shortcut.passed


def test_untrained_iteration_models_fail_the_circuit_check():
    from data.tasks import make_task
    from toymodels.circuits import iteration_circuit

    task = make_task("iteration", min_bits=1, max_bits=12, rule="polynomial", prefix_max=8)
    batch = task.batch(64, seed=0)
    for seed in range(5):
        torch.manual_seed(seed)
        model = toymodels.ToyTransformer(toymodels.ToyTransformerConfig(
            vocab_size=task.vocab_size, max_position_embeddings=task.seq_len, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=1))
        circuit = iteration_circuit(model, task, batch, floor=0.3)
        assert circuit.layer0_eoi_attention < 0.3 and circuit.layer1_diagonal < 0.3 and not circuit.passed
