"""The Bayesian detector of the SynthID paper (its "Bayesian score"), trained in PyTorch.

P(watermarked | g) by Bayes' rule, with P(g | not watermarked) = 1/2 per g-value and a learned
P(g | watermarked): at layer l a tournament match had one distinct candidate (g carries no signal)
or two (the winner's g is 1 with probability 3/4), and the chance of two is a logistic regression on
the g-values of the layers before it, ``psi_l = sigmoid(beta_l + sum_{k<l} delta_lk g_k)``; so

    P(g_l | w) = 1/2 * ((g_l + 1/2) psi_l + (1 - psi_l)).

Parameters, names and formulas are transformers' ``BayesianDetectorModel`` (a detector trained with
either loads in the other: ``load`` reads its saved directory). The score is the posterior's
log-odds (the posterior itself rounds to 1.0 within a few hundred tokens); ``threshold`` on it is
set at the requested false-positive rate on plain training texts.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text
from ..errors import GemmaforgeError

FORMAT = "gemmaforge-synthid-bayesian-detector"


def keys_fingerprint(config) -> str:
    """A digest of the keys and n-gram length: says which watermark a detector belongs to without
    storing the keys in the detector file."""
    text = json.dumps({"keys": list(config.keys), "ngram_len": config.ngram_len,
                       "sampling_table_size": config.sampling_table_size,
                       "sampling_table_seed": config.sampling_table_seed})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class BayesianDetector(nn.Module):
    def __init__(self, depth: int, base_rate: float = 0.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.depth = depth
        self.base_rate = base_rate
        # transformers' initialisation: psi starts near sigmoid(-2.5), delta near 0.
        self.beta = nn.Parameter(-2.5 + 0.001 * torch.randn(1, 1, depth, generator=g))
        self.delta = nn.Parameter(0.001 * torch.randn(1, 1, depth, depth, generator=g))
        self.threshold = 0.0  # on the log-odds; 0 = posterior 1/2 at base rate 1/2
        self.fpr: float | None = None
        self.fingerprint: str | None = None

    # ---- scoring ------------------------------------------------------------------------------
    def likelihood_watermarked(self, g_values: torch.Tensor) -> torch.Tensor:
        """g [B, N, depth] -> P(g_l | watermarked) per value [B, N, depth]."""
        g = g_values.to(self.beta.dtype)
        # Layer l sees layers k < l only (the tournament's order): the strictly lower triangle.
        logits = torch.einsum("bnk,lk->bnl", g, torch.tril(self.delta[0, 0], diagonal=-1)) + self.beta[0, 0]
        two = torch.sigmoid(logits)
        return 0.5 * ((g + 0.5) * two + (1 - two))

    def log_odds(self, g_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B]: log P(w | g) - log P(not w | g), summed over unmasked n-grams and layers."""
        lw = torch.log(self.likelihood_watermarked(g_values).clamp(min=1e-30))
        lu = math.log(0.5)
        m = mask.to(lw.dtype)[..., None]
        prior = min(max(self.base_rate, 1e-5), 1 - 1e-5)
        return ((lw - lu) * m).sum(dim=(1, 2)) + math.log(prior) - math.log(1 - prior)

    def forward(self, g_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B] the posterior P(watermarked | g), transformers' ``BayesianDetectorModel`` output."""
        return torch.sigmoid(self.log_odds(g_values, mask))

    # ---- training -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, watermarked: tuple[torch.Tensor, torch.Tensor], plain: tuple[torch.Tensor, torch.Tensor], *,
            steps: int = 300, lr: float = 0.05, l2: float = 1e-3, fpr: float = 0.01, seed: int = 0,
            base_rate: float = 0.5) -> "BayesianDetector":
        """Train on (g-values, mask) of watermarked and of plain texts: binary cross-entropy of the
        posterior plus ``l2`` x sum(delta^2) (transformers' loss), full batch, Adam. Then the
        threshold is set so that a fraction ``fpr`` of the plain texts score above it."""
        (gw, mw), (gp, mp) = watermarked, plain
        if gw.shape[-1] != gp.shape[-1] or gw.shape[1] != gp.shape[1]:
            raise GemmaforgeError("watermarked and plain g-values must have the same [N, depth] shape (pad with mask 0)")
        det = cls(gw.shape[-1], base_rate, seed)
        g = torch.cat([gw, gp]).float()
        mask = torch.cat([mw, mp]).float()
        labels = torch.cat([torch.ones(len(gw)), torch.zeros(len(gp))])
        opt = torch.optim.Adam([det.beta, det.delta], lr=lr)
        loss_fn = nn.BCEWithLogitsLoss()  # on the log-odds: the posterior's BCE without saturating
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_fn(det.log_odds(g, mask), labels) + l2 * (det.delta**2).sum()
                loss.backward()
                opt.step()
        det.calibrate(gp, mp, fpr)
        return det.eval()

    @torch.no_grad()
    def calibrate(self, g_plain: torch.Tensor, mask_plain: torch.Tensor, fpr: float = 0.01) -> float:
        """Set ``threshold`` to the (1 - fpr) quantile of plain texts' log-odds."""
        scores = self.log_odds(g_plain, mask_plain).double()
        self.threshold = float(torch.quantile(scores, 1 - fpr))
        self.fpr = fpr
        return self.threshold

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        data = {"format": FORMAT, "depth": self.depth, "base_rate": self.base_rate,
                "beta": self.beta.detach()[0, 0].tolist(), "delta": self.delta.detach()[0, 0].tolist(),
                "threshold": self.threshold, "fpr": self.fpr, "keys_fingerprint": self.fingerprint}
        write_text(path, json.dumps(data) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BayesianDetector":
        """A detector saved by ``save`` (JSON), or a transformers ``BayesianDetectorModel``
        directory (config.json + model.safetensors)."""
        path = Path(path)
        if path.is_dir():
            return cls._load_transformers(path)
        if not path.is_file():
            raise GemmaforgeError(f"detector file {path} not found: train one with `gemmaforge watermark calibrate"
                                  " --save-detector PATH`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
            det = cls(int(data["depth"]), float(data["base_rate"]))
            with torch.no_grad():
                det.beta.copy_(torch.tensor(data["beta"], dtype=torch.float32).view(1, 1, det.depth))
                det.delta.copy_(torch.tensor(data["delta"], dtype=torch.float32).view(1, 1, det.depth, det.depth))
            det.threshold, det.fpr = float(data["threshold"]), data.get("fpr")
            det.fingerprint = data.get("keys_fingerprint")
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
            raise GemmaforgeError(f"detector file {path} is not a gemmaforge Bayesian detector ({e})") from None
        return det.eval()

    @classmethod
    def _load_transformers(cls, directory: Path) -> "BayesianDetector":
        from safetensors.torch import load_file

        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            tensors = load_file(directory / "model.safetensors")
            det = cls(int(config["watermarking_depth"]), float(config.get("base_rate", 0.5)))
            with torch.no_grad():
                det.beta.copy_(tensors["likelihood_model_watermarked.beta"].view(1, 1, det.depth))
                det.delta.copy_(tensors["likelihood_model_watermarked.delta"].view(1, 1, det.depth, det.depth))
            det.base_rate = float(tensors["prior"].reshape(-1)[0])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise GemmaforgeError(f"{directory} is not a transformers BayesianDetectorModel directory ({e})") from None
        return det.eval()
