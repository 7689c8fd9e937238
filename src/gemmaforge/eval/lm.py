"""``GemmaforgeLM``: gemmaforge as a model of lm-evaluation-harness (lm-eval), registered as ``gemmaforge``.

    import lm_eval, gemmaforge.eval.lm
    lm_eval.simple_evaluate(model=GemmaforgeLM(model="path/or.gguf", batch_size=16), tasks=["arc_easy"])
    lm_eval --model gemmaforge --model_args model=path/or.gguf,quant=int8 --tasks arc_easy   # after import

The three request types go to ``eval.scorer.Scorer`` (lm-eval's HF tokenization and truncation, shared
prefixes computed once). lm-eval is an optional dependency: this module needs it, the rest of
gemmaforge does not.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import GemmaforgeError
from .scorer import Scorer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None, None: None}


@register_model("gemmaforge")
class GemmaforgeLM(LM):
    def __init__(self, model=None, tokenizer=None, batch_size: int | str = 16, device: str | None = None,
                 dtype: str | torch.dtype | None = None, quant: str | None = None, max_length: int | None = None,
                 **unused):
        """``model``: a loaded ``Gemma`` or any source ``gemmaforge.load`` reads (None = the embedded
        model); ``tokenizer``: a Tokenizer or a source (default: the one inside ``model``);
        ``quant``: auto | none | gguf | int8 | int8-h4 | int4 (as ``--quant``); ``batch_size``: choice rows scored together ("auto" = 16)."""
        super().__init__()
        import gemmaforge

        if isinstance(dtype, str) and dtype not in _DTYPES:
            raise GemmaforgeError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
        source = model
        if not isinstance(model, gemmaforge.Gemma):
            from ..quant import load_quantized

            model = load_quantized(model, quant or "auto", dtype=_DTYPES.get(dtype, dtype), device=device)
        elif quant not in (None, "none"):
            from ..quant import quantize

            quantize(model, quant)
        if tokenizer is None or isinstance(tokenizer, str):
            if tokenizer is None and isinstance(source, gemmaforge.Gemma):
                raise GemmaforgeError("pass tokenizer= with a loaded model (it does not carry one)")
            tokenizer = gemmaforge.load_tokenizer(tokenizer or source)
        batch = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(model, tokenizer, batch_size=batch, max_length=max_length)

    @property
    def tokenizer_name(self) -> str:  # lm-eval's cache key for chat templates
        return "gemmaforge"

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.scorer.generate_until([r.args for r in requests])
