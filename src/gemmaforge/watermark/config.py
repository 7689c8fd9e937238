"""The watermark's settings and its keys file.

A keys file is JSON; only ``keys`` is required, the rest default as in transformers'
``SynthIDTextWatermarkingConfig`` (whose dict, saved as JSON, loads here too):

    {"keys": [654, 400, 836, 123, 340, 443, 597, 160, 57], "ngram_len": 5,
     "sampling_table_size": 65536, "sampling_table_seed": 0, "context_history_size": 1024}

Anyone holding the keys can detect, and forge, the watermark: keep the file private (docs/watermark.md).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..errors import GemmaforgeError, unknown_name

_INT64 = 2**63
MAX_TABLE_SIZE = 2**24  # transformers' SynthIDTextWatermarkingConfig.validate limit


@dataclass(frozen=True)
class WatermarkConfig:
    """SynthID-Text settings (docs/reference.md section 8). ``keys``: one per tournament layer.

    ``skip_first_ngram_calls`` leaves the first ``ngram_len - 1`` new tokens unwatermarked (as
    transformers' option of that name). ``table_device``: where the g-value table is drawn: the
    table is a torch random draw, and CPU and CUDA generators differ, so a text watermarked by
    transformers on a GPU is detected with ``"cuda"`` (docs/watermark.md); our own default is
    ``"cpu"`` whatever device generates, so our texts detect anywhere."""

    keys: tuple[int, ...]
    ngram_len: int = 5
    sampling_table_size: int = 2**16
    sampling_table_seed: int = 0
    context_history_size: int = 1024
    skip_first_ngram_calls: bool = False
    table_device: str = "cpu"

    def __post_init__(self):
        keys = self.keys
        if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
            raise GemmaforgeError(f"watermark keys must be a list of integers, got {keys!r}")
        keys = tuple(keys)
        if not keys or any(isinstance(k, bool) or not isinstance(k, int) or not -_INT64 <= k < _INT64 for k in keys):
            raise GemmaforgeError("watermark keys must be a non-empty list of 64-bit integers (one per layer)")
        object.__setattr__(self, "keys", keys)
        _integer("ngram_len", self.ngram_len, 2)  # 1 would leave an empty context: every step repeats it
        _integer("sampling_table_size", self.sampling_table_size, 2, MAX_TABLE_SIZE)
        _integer("sampling_table_seed", self.sampling_table_seed, 0, _INT64 - 1)
        _integer("context_history_size", self.context_history_size, 1)
        if not isinstance(self.skip_first_ngram_calls, bool):
            raise GemmaforgeError(f"skip_first_ngram_calls must be true or false, got {self.skip_first_ngram_calls!r}")
        if self.table_device not in ("cpu", "cuda"):
            raise GemmaforgeError(f"table_device must be 'cpu' or 'cuda', got {self.table_device!r}")

    @property
    def depth(self) -> int:
        return len(self.keys)

    @classmethod
    def random(cls, depth: int = 30, **options) -> "WatermarkConfig":
        """Fresh secret keys (30 layers by default, as the SynthID paper's Gemma setting)."""
        _integer("depth", depth, 1)
        return cls(tuple(secrets.randbits(62) for _ in range(depth)), **options)

    # ---- the keys file ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, source: str = "watermark config") -> "WatermarkConfig":
        if not isinstance(data, dict):
            raise GemmaforgeError(f"{source}: expected a JSON object with a 'keys' list, got {type(data).__name__}")
        data = dict(data)
        if data.pop("debug_mode", False):  # transformers' test switch: uniform logits, never a real watermark
            raise GemmaforgeError(f"{source}: debug_mode=true is transformers' test mode, not a watermark")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise GemmaforgeError(f"{source}: {unknown_name('field', key, names)}")
        if "keys" not in data:
            raise GemmaforgeError(f"{source}: no 'keys' (a list of integers, one per layer)")
        try:
            return cls(**data)
        except GemmaforgeError as e:
            raise GemmaforgeError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "WatermarkConfig":
        path = Path(path)
        if not path.is_file():
            raise GemmaforgeError(f"keys file {path} not found: create one with `gemmaforge watermark keygen --out {path}`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GemmaforgeError(f"keys file {path} is not valid JSON ({e})") from None
        return cls.from_dict(data, f"keys file {path}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keys"] = list(self.keys)
        return d

    def save(self, path: str | Path) -> None:
        fields = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items())
        write_text(path, "{\n" + fields + "\n}\n")

    def watermark(self, device=None):
        """The watermark these settings describe, on ``device`` (default CPU)."""
        from .synthid import SynthIDTextWatermark

        return SynthIDTextWatermark.from_config(self, device)


def _integer(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise GemmaforgeError(f"{name}={value!r}: it must be an integer {bound}")
