"""Language models of the Gated DeltaNet family: config and presets, the causal LM, its
generation cache, sampling, and (in ``gdn.models.hf``, needs the ``hf`` extra) the Hugging
Face wrappers."""

from gdn.models.cache import ModelCache
from gdn.models.config import MIXERS, PRESETS, ModelConfig, preset_names
from gdn.models.generate import generate, sample_next
from gdn.models.lm import CausalLM, CausalLMOutput

__all__ = [
    "MIXERS",
    "PRESETS",
    "CausalLM",
    "CausalLMOutput",
    "ModelCache",
    "ModelConfig",
    "generate",
    "preset_names",
    "sample_next",
]
