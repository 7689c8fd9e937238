"""Is this text watermarked? Token ids -> g-values and mask -> a score, a p-value and a verdict.

    det = Detector(wm)                               # the mean score; or kind="weighted" / "bayesian"
    det.detect_ids(new_token_ids).watermarked        # the generated tokens, without the prompt
    det.detect_text("some text", tokenizer)          # re-tokenized with the generating model's tokenizer

The n-grams that count are transformers' ``SynthIDTextWatermarkDetector`` mask: context not repeated
(``compute_context_repetition_mask``) and no EOS in the n-gram or before it. The verdict is at the
false-positive rate ``fpr`` (1% by default): for the mean and weighted scores their p-value below
``fpr``; for the Bayesian detector, its log-odds above the threshold calibrated at its own training
FPR. ``p_value`` is always the mean score's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import GemmaforgeError
from .bayesian import BayesianDetector, keys_fingerprint
from .scores import mean_p_value, mean_score, weighted_mean_score, weighted_p_value
from .synthid import SynthIDTextWatermark

KINDS = ("mean", "weighted", "bayesian")


@dataclass(frozen=True)
class Detection:
    tokens: int  # tokens in the text
    scored: int  # n-grams that count (unmasked)
    mean_score: float
    p_value: float  # of the mean score, under "not watermarked"
    score: float  # the chosen detector's: mean, weighted mean, or Bayesian posterior
    watermarked: bool
    detector: str

    def as_json(self) -> dict:
        """The CLI's ``--json`` object; ``score`` only when it is not the mean score."""
        mean = None if math.isnan(self.mean_score) else self.mean_score  # nothing scored: JSON has no NaN
        out = {"tokens": self.tokens, "mean_score": mean, "p_value": self.p_value, "watermarked": self.watermarked}
        if self.detector != "mean":
            out.update(detector=self.detector, score=None if math.isnan(self.score) else self.score)
        return out


def features(wm: SynthIDTextWatermark, sequences: Sequence[Sequence[int]] | torch.Tensor,
             eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences (any lengths) -> g-values [B, N, depth] int64 and mask [B, N] bool, N the
    most n-grams of any sequence, shorter ones padded with masked zeros. A sequence shorter than
    ``ngram_len`` is an error: it has nothing to score."""
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.tolist()
    if not len(sequences):
        raise GemmaforgeError("no texts to score")
    short = [i for i, s in enumerate(sequences) if len(s) < wm.ngram_len]
    if short:
        i = short[0]
        raise GemmaforgeError(f"text {i + 1} has {len(sequences[i])} tokens, fewer than ngram_len={wm.ngram_len}: "
                              "too short to score; give a longer text")
    n_max = max(len(s) for s in sequences) - wm.ngram_len + 1
    g = torch.zeros(len(sequences), n_max, wm.depth, dtype=torch.long)
    mask = torch.zeros(len(sequences), n_max, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids = torch.tensor([list(seq)], dtype=torch.long, device=wm.device)
        n = ids.shape[1] - wm.ngram_len + 1
        g[i, :n] = wm.compute_g_values(ids)[0].cpu()
        m = wm.compute_context_repetition_mask(ids)[0]
        if eos_token_id is not None:
            m &= wm.compute_eos_token_mask(ids, eos_token_id)[0, wm.ngram_len - 1:]
        mask[i, :n] = m.cpu()
    return g, mask


class Detector:
    def __init__(self, watermark: SynthIDTextWatermark, kind: str = "mean", *, bayesian: BayesianDetector | None = None,
                 fpr: float = 0.01, eos_token_id: int | None = None):
        if kind not in KINDS:
            raise GemmaforgeError(f"unknown detector {kind!r}: use one of {', '.join(KINDS)}")
        if not 0 < fpr < 1:
            raise GemmaforgeError(f"fpr={fpr!r}: the false-positive rate must be in (0, 1)")
        if kind == "bayesian":
            if bayesian is None:
                raise GemmaforgeError("the Bayesian detector needs a trained detector file (--detector-file PATH; "
                                      "`gemmaforge watermark calibrate --save-detector PATH` trains one)")
            if bayesian.depth != watermark.depth:
                raise GemmaforgeError(f"the Bayesian detector has {bayesian.depth} layers but the keys {watermark.depth}")
            if bayesian.fingerprint is not None and bayesian.fingerprint != keys_fingerprint(watermark.config):
                raise GemmaforgeError("the Bayesian detector was trained for other watermark keys")
        self.watermark, self.kind, self.bayesian, self.fpr = watermark, kind, bayesian, fpr
        self.eos_token_id = eos_token_id
        self.p0 = float(watermark.sampling_table.float().mean())  # P(g = 1) without the watermark

    def score(self, g: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B] each: mean score, its p-value, the chosen detector's score, its verdict."""
        mean = mean_score(g, mask)
        p = mean_p_value(g, mask, self.p0)
        if self.kind == "mean":
            return mean, p, mean, p < self.fpr
        if self.kind == "weighted":
            return mean, p, weighted_mean_score(g, mask), weighted_p_value(g, mask, self.p0) < self.fpr
        with torch.no_grad():
            log_odds = self.bayesian.log_odds(g, mask).double()
        return mean, p, torch.sigmoid(log_odds), log_odds > self.bayesian.threshold

    def detect_batch(self, sequences) -> list[Detection]:
        g, mask = features(self.watermark, sequences, self.eos_token_id)
        mean, p, score, verdict = self.score(g, mask)
        scored = mask.sum(dim=1).tolist()
        return [Detection(len(s), int(n), float(m), float(pv), float(sc), bool(v), self.kind)
                for s, n, m, pv, sc, v in zip(sequences, scored, mean.tolist(), p.tolist(), score.tolist(),
                                              verdict.tolist())]

    def detect_ids(self, ids: Sequence[int]) -> Detection:
        return self.detect_batch([list(ids)])[0]

    def detect_text(self, text: str, tokenizer) -> Detection:
        """``text`` tokenized without <bos> (the generated tokens are scored, not a prompt)."""
        if not text.strip():
            raise GemmaforgeError("the text is empty: give the text to check")
        ids = tokenizer.encode(text, add_bos=False)
        if len(ids) < self.watermark.ngram_len:
            raise GemmaforgeError(f"the text has {len(ids)} tokens, fewer than ngram_len={self.watermark.ngram_len}: "
                                  "too short to score; give a longer text")
        return self.detect_ids(ids)
