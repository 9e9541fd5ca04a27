"""A tiny command for sweep tests: a known objective with its optimum at x=0.3, y=2, scale.power=2."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Scale:
    """Options of a nested group.

    Attributes:
        power: exponent of the distance
    """

    power: int = 2


def quadratic(x: float = 0.0, y: int = 0, scale: Scale = Scale(), out: Path = Path("runs/q"),
              seconds: float = 0.0, hold: Path | None = None) -> Path:
    """Writes metrics.json with score = -(|x - 0.3|^power + (y - 2)^2).

    Args:
        x: a float parameter
        y: an int parameter
        scale: nested options
        out: run directory
        seconds: sleep this long after creating the run directory (to kill a sweep mid-trial)
        hold: wait while this file exists, after creating the run directory (to stop a sweep mid-trial); `{x}`
            in it is replaced by x (to hold one grid point only)
    """
    out.mkdir(parents=True, exist_ok=True)
    time.sleep(seconds)
    while hold is not None and Path(str(hold).replace("{x}", str(x))).exists():
        time.sleep(0.05)
    score = -(abs(x - 0.3) ** scale.power + (y - 2) ** 2)
    (out / "metrics.json").write_text(json.dumps({"score": score, "nested": {"x": x}}))
    return out
