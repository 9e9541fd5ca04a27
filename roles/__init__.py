"""Head functions of any model, toy or Hugging Face: detectors, null thresholds, ablation, the role table and the
survey's stage map.

Importing the package registers every built-in detector (:mod:`roles.patterns`, :mod:`roles.ov`) in
:data:`roles.registry.DETECTORS`.
"""

from roles import knowledge, ov, patterns  # noqa: F401  (registers the detectors)
from roles.registry import DETECTORS, applicable, register, score_heads

__all__ = ["DETECTORS", "applicable", "register", "score_heads"]
