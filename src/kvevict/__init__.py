"""kvevict: KV-cache eviction for Hugging Face transformers models."""

from .api import answer, generate
from .cache import EvictingCache
from .models import load_model
from .policies import list_policies, make_policy

__version__ = "0.1.0"
__all__ = ["EvictingCache", "answer", "generate", "list_policies", "load_model", "make_policy"]
