"""Generation: sampling (``sampling.py``), the batched token engine (``engine.py``), text API (``api.py``)."""

from .api import TextStream, encode_prompt, generate, stream
from .engine import Engine
from .sampling import SamplingParams, sample

__all__ = ["Engine", "SamplingParams", "TextStream", "encode_prompt", "generate", "sample", "stream"]
