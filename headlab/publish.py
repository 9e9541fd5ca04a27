"""Publish a whole folder at once: written under a temporary name beside it, then renamed into place.

``save_pretrained`` writes several files (config, weights, generation config) one after another; a run killed in
the middle would leave a folder that loads with missing or torn weights. :func:`publish_folder` makes the folder
appear complete or not at all, like :func:`headlab.runs.atomic_write` does for one file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def publish_folder(final: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(folder)`` on a new temporary folder beside ``final``, then move it to ``final``.

    A folder already at ``final`` is replaced: it is renamed aside, the new one renamed in, and the old one removed,
    so a reader sees either folder complete (for the instant between the two renames, no folder). If ``write``
    raises (or the process is interrupted), the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
