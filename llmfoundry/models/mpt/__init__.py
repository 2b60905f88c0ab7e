"""MPT: a decoder-only transformer with ALiBi, grouped-query attention and Hugging Face interop."""
from llmfoundry.models.mpt.attention import KVCache, alibi_slopes
from llmfoundry.models.mpt.config import AttnConfig, InitConfig, MPTConfig
from llmfoundry.models.mpt.model import MPTBlock, MPTForCausalLM, MPTModel, MPTOutput, build_meta

__all__ = ["AttnConfig", "InitConfig", "KVCache", "MPTBlock", "MPTConfig", "MPTForCausalLM", "MPTModel",
           "MPTOutput", "alibi_slopes", "build_meta"]
