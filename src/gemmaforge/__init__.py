"""gemmaforge: Gemma 2 / Gemma 3 in plain PyTorch."""

from .checkpoint import load
from .checkpoint.hf import save_pretrained
from .config import PRESETS, GemmaConfig, preset
from .errors import GemmaforgeError
from .generation import SamplingParams, generate, stream
from .kv_cache import KVCache, cache_bytes_per_token
from .model import Gemma
from .tokenizer import load_tokenizer

__all__ = ["load", "Gemma", "GemmaConfig", "GemmaforgeError", "KVCache", "PRESETS", "preset",
           "cache_bytes_per_token", "generate", "stream", "load_tokenizer", "SamplingParams"]
__version__ = "0.1.0"
