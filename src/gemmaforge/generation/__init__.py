"""Generation: per-row sampling (``sampling.py``), the step scheduler over KV-cache rows
(``scheduler.py``), the engine that owns the model calls (``engine.py``, ``fast.py``), and the
text API (``api.py``)."""

from .api import TextStream, encode_prompt, generate, stream
from .engine import Engine
from .sampler import Sampler
from .sampling import SamplingParams, sample
from .scheduler import Event, Request, Scheduler, Sequence

__all__ = ["Engine", "Event", "Request", "Sampler", "SamplingParams", "Scheduler", "Sequence", "TextStream",
           "encode_prompt", "generate", "sample", "stream"]
