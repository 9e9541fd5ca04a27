"""headlab: probe every attention head of a Hugging Face model, and train toy transformers to see which head
functions re-emerge.

Packages by pipeline stage:
  headlab/   shared infrastructure: the head hook point, model loading, run directories, the CLI.
  data/      labelled datasets, head-output capture and the on-disk head cache, synthetic task generators.
  probes/    all-heads linear probes (Lightning), controls, reports, steering.
  toymodels/ the toy transformer, its Lightning trainer, head-function detectors, ablation, emergence tracking.
"""

from headlab.errors import HeadlabError

__all__ = ["HeadlabError"]
__version__ = "0.1.0"
