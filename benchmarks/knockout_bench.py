"""Attention knockout of every head of a real model: the whole prompt rerun per knockout (the baseline) against
headlab's prefix cache (:class:`roles.knockout.PrefixRun`: the prompt minus its last token run once, each knockout
reruns the last token from the key/value cache).

Both arms use the same per-head masks (:func:`roles.knockout.knock_out`) and batch plans, so they must agree to
float precision. It ends with ``knockout_bench speedup=<full / cached seconds> max_abs_diff=<largest |log p|
difference> heads=<heads timed>``. Model: the built-in SmolLM2-135M-Instruct on the capital prompts it answers.

    python benchmarks/knockout_bench.py                 # 16 prompts, the heads of 6 layers
    python benchmarks/knockout_bench.py --prompts 32 --layers 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headlab.heads import head_sites
from headlab.models import load_model
from roles.knockout import PrefixRun, head_plans, knock_out, knockout_log_probs
from roles.knowledge import capitals_batch


@torch.no_grad()
def full_log_probs(model, batch, plans: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The baseline: the whole prompt per (prompt, plan) row, the same masks at the final query: ``[B, P]``."""
    ids, subject, answers = batch["input_ids"], batch["subject_mask"], batch["answers"]
    out = []
    for start in range(0, plans.shape[0], chunk):
        part = plans[start:start + chunk]
        cuts = {layer: (part[None, :, layer, :, None] & subject[:, None, None, :]).flatten(0, 1)
                for layer in range(part.shape[1]) if part[:, layer].any()}
        with knock_out(model, cuts):
            logits = model(input_ids=ids.repeat_interleave(len(part), 0)).logits[:, -1].float()
        logp = logits.log_softmax(-1).view(len(ids), len(part), -1)
        out.append(logp.gather(-1, answers[:, None, None].expand(-1, len(part), 1))[..., 0])
    return torch.cat(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6, help="time the heads of the first this many layers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("smollm2", head="auto", attn_implementation="eager", need_tokenizer=True)
    model = loaded.model
    batch = capitals_batch(loaded.tokenizer, args.prompts, 1, model=model)
    n_layers, n_heads = len(head_sites(model)), head_sites(model)[0].n_heads
    plans = head_plans(n_layers, n_heads)[: args.layers * n_heads]
    start = time.perf_counter()
    run = PrefixRun(model, batch["input_ids"], batch["subject_mask"])
    cached = knockout_log_probs(run, plans, batch["answers"][:, None])[..., 0]
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    full = full_log_probs(model, batch, plans)
    full_s = time.perf_counter() - start
    print(f"prompts={len(batch['input_ids'])} tokens={batch['input_ids'].shape[1]} heads={len(plans)}")
    print(f"full prompt per knockout: {full_s:.1f} s; prefix cache: {cached_s:.1f} s")
    print(f"knockout_bench speedup={full_s / cached_s:.2f} max_abs_diff={(full - cached).abs().max():.2e} "
          f"heads={len(plans)}")


if __name__ == "__main__":
    main()
