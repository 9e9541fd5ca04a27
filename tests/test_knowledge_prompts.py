"""Knowledge-recall prompts keep only what the model knows: a head cannot recall a capital the model gets wrong."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from headlab.models import minilm_path
from roles.knowledge import capitals_batch

pytestmark = pytest.mark.realmodel  # the offline MiniLM tokenizer (any tokenizer would do; this one is on disk)


class Oracle(torch.nn.Module):
    """Answers a prompt right exactly when its ids are in ``known`` (top-1 logit on the answer), else wrong."""

    def __init__(self, answers: dict[tuple[int, ...], int], known: set[tuple[int, ...]], vocab: int):
        super().__init__()
        self.answers, self.known, self.vocab = answers, known, vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            answer = self.answers[tuple(ids)]
            logits[row, -1, answer if tuple(ids) in self.known else (answer + 1) % self.vocab] = 1.0
        return SimpleNamespace(logits=logits)


def test_only_prompts_the_model_answers_are_kept():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    every = capitals_batch(tokenizer, 10_000, seed=0)
    prompts = [tuple(ids) for ids in every["input_ids"].tolist()]
    answers = dict(zip(prompts, every["answers"].tolist()))
    known = set(prompts[::3])  # the model knows every third capital
    kept = capitals_batch(tokenizer, 10_000, seed=0, model=Oracle(answers, known, tokenizer.vocab_size))
    assert {tuple(ids) for ids in kept["input_ids"].tolist()} == known
    assert int(kept["n_correct"]) == len(known) and int(kept["n_candidates"]) == len(prompts)
    # a model that knows fewer than 4 keeps every prompt, and says how many it knew
    few = capitals_batch(tokenizer, 10_000, seed=0, model=Oracle(answers, set(prompts[:2]), tokenizer.vocab_size))
    assert len(few["input_ids"]) == len(prompts) and int(few["n_correct"]) == 2
