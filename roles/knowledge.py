"""Knowledge recall and expression, measured on factual prompts ("The capital of France is" -> " Paris"): memory
heads (the survey's Knowledge Recalling stage) and amplification heads (Expression Preparation).

**Direct logit attribution** (DLA) of head ``h`` at the final position: the head's write into the residual stream,
``c_h = z_h W_O[h]``, through the final norm linearised at the clean run (``c_h / rms(x)`` times the norm's weight;
LayerNorm also centres ``c_h``), projected on the unembedding difference between the correct answer and the mean
of the other answers. It is the head's direct share of the answer's logit margin (Elhage et al. 2021; Wang et al.
2022 use the same "logit difference" attribution). The score is that share relative to the model's mean margin:
``score = mean_prompts DLA_h / mean_prompts (logit(correct) - mean logit(others))``.

* ``amplification``: a large positive share (:data:`roles.rule.FLOORS`), against the control of the same head's
  share for a wrong answer (the answer of another prompt), paired over prompts. Its verdict excludes memory heads:
  amplification heads need not look at the subject.
* ``memory``: attention from the final position to the subject's tokens (the country), against the token before the
  subject, *and* an amplification share above the floor: the head reads the subject and writes its attribute.

DLA favours late heads: an early head's contribution reaches the logits through every later layer, which the direct
path ignores. The stage map reports its ordering test with and without attribution-based roles for that reason.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from data.builtin import countries
from data.tasks import IGNORE, Batch
from headlab.errors import HeadlabError
from headlab.heads import head_sites, hook_heads, output_weights
from headlab.models import input_device
from headlab.placement import real_tensor
from roles.batches import text_frame
from roles.evidence import Evidence, masked_attention
from roles.patterns import patterns_of
from roles.registry import register

FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "ln_f", "model.final_layernorm")
TEMPLATE = "The capital of {country} is"


def capitals_batch(tokenizer, batch_size: int, seed: int, model: nn.Module | None = None) -> Batch:
    """Factual prompts of one token length (the most common): ``input_ids``, ``targets`` (the capital's first token at
    the final position), ``answers`` ``[B]``, ``distractors`` ``[K]`` (every capital's first token), ``subject_mask``
    ``[B, T]`` (the country's tokens). ``batch_size`` prompts drawn with ``seed``.

    With ``model``, only prompts it answers correctly (the capital's first token is its top-1 prediction at the final
    position) are kept: a head cannot recall knowledge the model does not have. ``n_candidates`` and ``n_correct``
    (0-d tensors) say how many prompts there were and how many it answers; with fewer than 4 correct (a random or
    tiny model) every prompt is kept, and the caller's note says so."""
    prefix, suffix = text_frame(tokenizer)
    prompts = []
    for country, capital in countries():
        text = TEMPLATE.format(country=country)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.index(country)
        subject = [a < start + len(country) and b > start for a, b in encoded["offset_mapping"]]
        answer = tokenizer(" " + capital, add_special_tokens=False)["input_ids"][0]
        prompts.append((prefix + encoded["input_ids"] + suffix, [False] * len(prefix) + subject + [False] * len(suffix),
                        answer))
    distractors = sorted({p[2] for p in prompts})
    lengths = [len(p[0]) for p in prompts]
    common = max(set(lengths), key=lengths.count)
    chosen = [p for p in prompts if len(p[0]) == common]
    candidates = len(chosen)
    if len(chosen) < 4:
        raise HeadlabError("fewer than 4 capital prompts share a token length; the knowledge detectors need more")
    correct = chosen if model is None else [p for p, right in zip(chosen, _answered(model, chosen)) if right]
    if len(correct) >= 4:
        chosen = correct
    order = torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
    ids = torch.tensor([chosen[i][0] for i in order])
    answers = torch.tensor([chosen[i][2] for i in order])
    targets = torch.full_like(ids, IGNORE)
    targets[:, -1] = answers
    return {"input_ids": ids, "targets": targets, "answers": answers, "distractors": torch.tensor(distractors),
            "subject_mask": torch.tensor([chosen[i][1] for i in order]), "n_candidates": torch.tensor(candidates),
            "n_correct": torch.tensor(len(correct))}


_KNOWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {prompt ids: answered right}


@torch.no_grad()
def _answered(model: nn.Module, prompts: list[tuple[list[int], list[bool], int]], chunk: int = 32) -> list[bool]:
    """Whether the model's top-1 next token after each prompt (ids, subject mask, answer) is the answer; each
    prompt is run once per model (the detection, evaluation and resampling batches draw from the same prompts)."""
    known = _KNOWN.setdefault(model, {})
    new = [p for p in prompts if tuple(p[0]) not in known]
    device = input_device(model)
    for start in range(0, len(new), chunk):
        part = new[start:start + chunk]
        logits = model(input_ids=torch.tensor([p[0] for p in part], device=device)).logits[:, -1]
        right = (logits.argmax(-1).cpu() == torch.tensor([p[2] for p in part])).tolist()
        known.update((tuple(p[0]), r) for p, r in zip(part, right))
    return [known[tuple(p[0])] for p in prompts]


def _final_norm(model: nn.Module) -> nn.Module:
    for name in FINAL_NORMS:
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise HeadlabError(f"cannot find the final norm of {type(model).__name__} (tried {', '.join(FINAL_NORMS)})")


@torch.no_grad()
def logit_shares(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt and head, the direct logit attribution to the correct answer and to a wrong one (the next prompt's
    answer), each as a share of the model's mean logit margin: two ``[B, layers, heads]`` tensors, and the margins
    ``[B]``."""
    ids, answers, distractors = batch["input_ids"], batch["answers"], batch["distractors"]
    device = input_device(model)
    sites = head_sites(model)
    norm = _final_norm(model)
    last: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []

    def keep(layer: int, z: torch.Tensor) -> None:
        last[layer] = z[:, -1].float()  # [B, H, dh]

    handle = norm.register_forward_pre_hook(lambda module, args: final.append(args[0][:, -1].float()))
    try:
        with hook_heads(model, keep, sites=sites):
            logits = model(input_ids=ids.to(device)).logits[:, -1].float()  # [B, V]
    finally:
        handle.remove()
    x = final[0]  # [B, d_model], the residual stream entering the final norm
    w_u = real_tensor(model.get_output_embeddings(), "weight").float()  # [V, d_model]
    weight = getattr(norm, "weight", None)
    gain = weight.float() if weight is not None else torch.ones(x.shape[-1])
    centred = isinstance(norm, nn.LayerNorm)  # LayerNorm centres; RMSNorm (Llama, Qwen) only rescales
    scale = x.std(-1, unbiased=False) if centred else x.pow(2).mean(-1).sqrt()  # [B]

    def direction(tokens: torch.Tensor) -> torch.Tensor:  # [B, d_model]: unembedding of tokens minus the others'
        others = w_u[distractors].mean(0)
        return w_u[tokens] - others

    margin = logits[torch.arange(len(answers)), answers] - logits[:, distractors].mean(-1)  # [B]
    shares = []
    for target in (answers, answers.roll(1)):
        u = direction(target.to(w_u.device)) * gain  # [B, d_model]
        per_layer = []
        for site in sites:
            w_o, _ = output_weights(site)  # [H, dh, d_model]
            c = torch.einsum("bhd,hde->bhe", last[site.layer], w_o.float())  # [B, H, d_model]
            if centred:
                c = c - c.mean(-1, keepdim=True)
            per_layer.append((c * u[:, None]).sum(-1) / scale[:, None])  # [B, H]
        shares.append(torch.stack(per_layer, 1) / margin.mean().clamp_min(1e-6))
    return shares[0].cpu(), shares[1].cpu(), margin.cpu()


@register("amplification", requires=("input_ids", "answers", "distractors"), uses_patterns=False)
def amplification(model: nn.Module | None, batch: Batch) -> Evidence:
    """Amplification / correct head: the head's direct share of the correct answer's logit margin at the final
    position (see the module docstring); control: its share for a wrong answer. Source: the survey's Expression
    Preparation stage (Zheng et al. 2024); direct logit attribution as in Wang et al. 2022."""
    if model is None:
        raise HeadlabError("the amplification detector needs a model")
    correct, wrong, _ = logit_shares(model, batch)
    return Evidence(correct.mean(0), wrong.mean(0), correct - wrong)


@register("memory", requires=("input_ids", "subject_mask"))
def memory(model: nn.Module | None, batch: Batch) -> Evidence:
    """Memory head, attention half: from the final position, attention to the subject's tokens (the country in "The
    capital of France is"); control: the token before the subject, scaled to the subject's token count. Its verdict
    also needs an amplification share above the floor (:mod:`roles.rule`): the head reads the subject and writes
    its attribute. Source: the survey's Knowledge Recalling stage (memory heads recall parametric knowledge into the
    residual stream); subject attention at the final token as in Geva et al. 2023 ("Dissecting Recall of Factual
    Associations")."""
    patterns = patterns_of(model, batch)
    subject = batch["subject_mask"]  # [B, T]
    before = torch.zeros_like(subject)
    before[:, :-1] = subject[:, 1:] & ~subject[:, :-1]  # the token just before the subject's first token
    last = patterns[:, :, :, -1].to(torch.float64)  # [B, L, H, keys]
    t = (last * subject[:, None, None]).sum(-1)
    c = (last * before[:, None, None]).sum(-1) * subject.sum(-1)[:, None, None]
    n, seq = subject.shape
    final = torch.zeros(n, seq, seq, dtype=torch.bool)
    final[:, -1] = subject
    return Evidence(masked_attention(patterns, final), c.mean(0).float(), (t - c).float())
