"""All-heads linear probes: one probe per (layer, head) of a head cache, trained at once, with controls.

>>> from probes import probe
>>> probe("runs/cache/gpt2-capitals", out="runs/probe/capitals", logger="none")   # prints the heatmap path

Modules: ``config`` (options), ``data`` (labels, splits, readers, DataModule), ``module`` (the Lightning module),
``newton`` (the full-batch solver), ``sklearn_backend`` (the reference), ``mass_mean``, ``metrics``, ``evaluate``
(rank on validation, report on test), ``report`` (files and W&B), ``steering`` (the causal check), ``command``.
"""

from probes.command import probe
from probes.config import ControlConfig, ProbeConfig, ReportConfig, SplitConfig, SteerConfig

__all__ = ["ControlConfig", "ProbeConfig", "ReportConfig", "SplitConfig", "SteerConfig", "probe"]
