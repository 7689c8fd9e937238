"""SynthID-Text watermarking: generation (``SynthIDTextWatermark``, applied per pool row by
``attach_watermark``), detection (``Detector``: mean, weighted mean, Bayesian; p-values) and the keys
file (``WatermarkConfig``). docs/watermark.md has the usage and the measured detection rates."""

from __future__ import annotations

from ..errors import GemmaforgeError
from .bayesian import BayesianDetector
from .config import WatermarkConfig
from .detector import Detection, Detector, features
from .processor import WatermarkProcessor, attach_watermark
from .scores import mean_p_value, mean_score, weighted_mean_score, weighted_p_value
from .synthid import SynthIDTextWatermark


def as_watermark(value, device=None) -> SynthIDTextWatermark:
    """A ``SynthIDTextWatermark``, its ``WatermarkConfig``, or a keys file path -> the watermark."""
    if isinstance(value, SynthIDTextWatermark):
        return value if device is None else value.to(device)
    if isinstance(value, WatermarkConfig):
        return value.watermark(device)
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        return WatermarkConfig.load(value).watermark(device)
    raise GemmaforgeError(f"watermark must be a SynthIDTextWatermark, a WatermarkConfig or a keys file path, "
                          f"got {type(value).__name__}")


__all__ = ["BayesianDetector", "Detection", "Detector", "SynthIDTextWatermark", "WatermarkConfig",
           "WatermarkProcessor", "as_watermark", "attach_watermark", "features", "mean_p_value", "mean_score",
           "weighted_mean_score", "weighted_p_value"]
