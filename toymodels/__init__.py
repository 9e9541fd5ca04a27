"""Toy transformers on synthetic tasks, head-function detectors and their causal checks.

Importing this package registers the toy model with the Hugging Face Auto classes and its hook point
(``blocks.{i}.attn.out_proj``) with :func:`headlab.heads.register_architecture`, so
``AutoModelForCausalLM.from_pretrained(run_dir / "model")`` and every headlab hook work on saved toy models.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from headlab.heads import register_architecture
from toymodels.modeling import ToyTransformer, ToyTransformerConfig

AutoConfig.register(ToyTransformerConfig.model_type, ToyTransformerConfig, exist_ok=True)
AutoModel.register(ToyTransformerConfig, ToyTransformer, exist_ok=True)
AutoModelForCausalLM.register(ToyTransformerConfig, ToyTransformer, exist_ok=True)
register_architecture(ToyTransformerConfig.model_type, r"blocks\.(\d+)\.attn\.out_proj")

__all__ = ["ToyTransformer", "ToyTransformerConfig"]
