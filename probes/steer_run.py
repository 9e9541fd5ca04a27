"""The steering check of ``train.py probe --steer.enabled true``: the cache's model, its held-out prompts, the top
heads' directions (see :mod:`probes.steering`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from data import HeadCache
from headlab.errors import HeadlabError
from probes.config import SteerConfig
from probes.data import ProbeProblem
from probes.evaluate import top_heads
from probes.report import load_directions
from probes.steering import final_hidden, head_directions, hidden_projection, logit_difference, steering_check


def steer_top_heads(cache: HeadCache, problem: ProbeProblem, frame: pd.DataFrame, directions: Path,
                    steer: SteerConfig, seed: int) -> dict[str, Any]:
    """Steer the cache's model along the top heads' directions on held-out (test) examples."""
    from data.capture import forward_inputs, tokenize_batch
    from data.datasets import DatasetConfig, load_dataset
    from headlab.models import input_device, load_model
    from headlab.placement import Placement

    if problem.kind != "binary" and steer.continuations is None:
        raise HeadlabError("the steering check without --steer.continuations needs a binary label")
    manifest = cache.manifest
    dataset = load_dataset(DatasetConfig.from_manifest(manifest["dataset"]))  # the cache's examples, split included
    examples = np.unique(cache.example_index[problem.parts == problem.test_part])[: steer.max_prompts]
    texts = [dataset.texts[i] for i in examples]
    model_id = steer.model or manifest["model"]["id"]
    loaded = load_model(model_id, device=steer.device, head="causal_lm" if steer.continuations else "base",
                        placement=Placement(steer.device_map, steer.max_memory, steer.offload_folder))
    batch = tokenize_batch(loaded.tokenizer, texts, None)
    device = input_device(loaded.model)
    inputs = forward_inputs(loaded.model, batch, device)
    if steer.continuations:
        ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in steer.continuations]
        if any(len(i) != 1 for i in ids):
            raise HeadlabError(f"--steer.continuations {list(steer.continuations)} must each be one token")
        readout = logit_difference(ids[0][0], ids[1][0])
    else:
        with torch.no_grad():
            hidden = final_hidden(loaded.model(**inputs, output_hidden_states=True))
        last = inputs["attention_mask"].sum(-1) - 1
        final = hidden[torch.arange(len(last)), last].float()  # [prompts, d_model]
        y = torch.from_numpy(problem.y[np.searchsorted(cache.example_index, examples)])
        if y.unique().numel() < 2:
            raise HeadlabError("the held-out steering prompts hold one class only; raise --steer.max_prompts")
        axis = final[y == 1].mean(0) - final[y == 0].mean(0)
        readout = hidden_projection(axis / axis.norm())
    table, _ = load_directions(directions)
    heads = [(int(r.layer), int(r.head)) for r in top_heads(frame, steer.top_k).itertuples()]
    chosen = head_directions(table, heads, cache.layers, steer.direction)
    result = steering_check(loaded.model, inputs, readout, chosen, steer.alpha, steer.random_directions, seed,
                            significance=steer.significance)
    return {**result.as_dict(), "model": model_id, "prompts": len(texts), "direction": steer.direction,
            "readout": "logit_difference" if steer.continuations else "final_hidden_projection"}
