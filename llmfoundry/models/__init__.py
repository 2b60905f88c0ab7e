"""Model definitions."""
from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

__all__ = ["MPTConfig", "MPTForCausalLM"]
