"""Cache throughput and memory: ``python benchmarks/cache_bench.py [--seq 32] [--base 48] [--batch_size 16]``.

A GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768) is saved locally with a word-level tokenizer,
and datasets of 1x, 4x and 16x examples (``--seq`` words each) are written as JSONL. Every head is cached at every
token (``--positions all``, the largest output: one row per token).

* Throughput, in this process, alternating and repeated (the best of ``--repeats`` each, as the machine is noisy):
  a bare forward pass (tokenize + ``model(**inputs)`` over the same batches, no hooks, nothing kept) against the
  end-to-end ``cache`` command (load the model and data, capture, write and checksum the shards) on the 16x data.
* Peak RSS of the ``cache`` command at 1x, 4x and 16x rows, each in a fresh subprocess. Shards are ``--shard_mb``
  (8 MiB, below the 1x output, so every size reaches the steady state the shard size bounds).

Ends with ``cache_bench throughput_ratio=<bare seconds / cache seconds> rss_growth=<peak RSS 16x / 1x>``.
Goal: throughput_ratio >= 0.9, rss_growth <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = [f"w{i}" for i in range(2000)]


def build(workdir: Path, n_examples: list[int], seq: int) -> Path:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = workdir / "gpt2-small-random"
    config = transformers.GPT2Config(vocab_size=len(VOCAB) + 2, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2Model(config).save_pretrained(model_dir)
    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(VOCAB)}},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                         model_max_length=1024).save_pretrained(model_dir)
    rng = random.Random(0)
    for n in n_examples:
        with open(workdir / f"data-{n}.jsonl", "w") as handle:
            for i in range(n):
                text = " ".join(rng.choice(VOCAB) for _ in range(seq))
                handle.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return model_dir


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare_forward(model, tokenizer, texts: list[str], batch_size: int, device: str = "cpu") -> float:
    import torch

    from data.capture import forward_inputs, tokenize_batch

    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            batch = tokenize_batch(tokenizer, texts[lo : lo + batch_size], 1024)
            model(**forward_inputs(model, batch, torch.device(device)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(model_dir: Path, data: Path, work: Path, batch_size: int, shard_mb: float, repeats: int,
               device: str = "cpu"):
    import shutil

    import transformers

    from data.cache_command import cache
    from data.datasets import load_dataset

    model = transformers.AutoModel.from_pretrained(model_dir).eval().to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = load_dataset(str(data)).texts
    bare, full = [], []
    for i in range(repeats):
        bare.append(bare_forward(model, tokenizer, texts, batch_size, device))
        out = work / f"throughput-{i}"
        start = time.perf_counter()
        cache(model=str(model_dir), dataset=str(data), out=out, positions="all", batch_size=batch_size,
              device=device, shard_mb=shard_mb)
        full.append(time.perf_counter() - start)
        shutil.rmtree(out)
        print(f"  repeat {i}: bare forward {bare[-1]:6.1f} s, cache end to end {full[-1]:6.1f} s", flush=True)
    return min(bare), min(full)


def child_cache(model_dir: str, data: str, batch_size: int, out: str, shard_mb: float) -> dict:
    from data.cache_command import cache

    start = time.perf_counter()
    cache(model=model_dir, dataset=data, out=Path(out), positions="all", batch_size=batch_size, device="cpu",
          shard_mb=shard_mb)
    from data import HeadCache

    rows = HeadCache.open(out).rows
    return {"seconds": time.perf_counter() - start, "rows": rows, "rss_mib": peak_rss_mib()}


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode:
        raise SystemExit(f"benchmark child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32, help="words per example")
    parser.add_argument("--base", type=int, default=48, help="examples at 1x")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--shard_mb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where both arms run: cpu, cuda, cuda:N")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        _, *rest = args.child
        print(json.dumps(child_cache(rest[0], rest[1], int(rest[2]), rest[3], float(rest[4]))))
        return
    sizes = [args.base, 4 * args.base, 16 * args.base]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build(work, sizes, args.seq)
        results = {}
        for n in sizes:
            results[n] = run_child("cache", str(model_dir), str(work / f"data-{n}.jsonl"), str(args.batch_size),
                                   str(work / f"cache-{n}"), str(args.shard_mb))
            print(f"cache {n:>5} examples: {results[n]['rows']:>6} rows in {results[n]['seconds']:6.1f} s, "
                  f"peak RSS {results[n]['rss_mib']:7.1f} MiB", flush=True)
        print(f"throughput on {sizes[-1]} examples ({results[sizes[-1]]['rows']} rows):", flush=True)
        bare, full = throughput(model_dir, work / f"data-{sizes[-1]}.jsonl", work, args.batch_size, args.shard_mb,
                                args.repeats, args.device)
    ratio = bare / full
    growth = results[sizes[-1]]["rss_mib"] / results[sizes[0]]["rss_mib"]
    print(f"cache_bench throughput_ratio={ratio:.3f} rss_growth={growth:.3f}")


if __name__ == "__main__":
    main()
