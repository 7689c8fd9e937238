"""SynthID-Text (Dathathri et al., Nature 2024): tournament sampling keyed on the last n-1 tokens.

``SynthIDTextWatermark`` has the methods of transformers' ``SynthIDTextWatermarkLogitsProcessor``
and gives its results bit for bit (tests/test_watermark.py runs both), so texts, keys and detectors
move between the two:

    wm = SynthIDTextWatermark(keys=[654, 400, 836, 123, 340], ngram_len=5)
    scores = wm(input_ids, scores)          # one generation step of a batch (HF's stateful call)
    g = wm.compute_g_values(ids)            # [B, L - ngram_len + 1, depth] in {0, 1}
    mask = wm.compute_context_repetition_mask(ids) & wm.compute_eos_token_mask(ids, eos)[:, 4:]

In the engine the watermark runs per pool row through ``processor.WatermarkProcessor`` instead of
the batch-wide ``__call__``, because rows join and leave the pool at different moments.

The tournament (docs/reference.md section 8): with 2 candidates per match, m layers of matches have
the closed form ``p <- p * (1 + g_l - sum_v g_l(v) p(v))`` per layer, over every candidate token v.
Here the g-values are computed one layer at a time, so a step holds [R, V] tensors, never the
[R, V, depth] one transformers builds (262k x 30 int64 = 63 MiB per row for Gemma).
"""

from __future__ import annotations

import torch

from ..errors import GemmaforgeError
from .config import WatermarkConfig
from .hashing import INCREMENT, MULTIPLIER, accumulate_hash, context_hash, sampling_table

_M64 = 1 << 64
_CPU_CHUNK = 2**18  # values per tournament group on CPU (see tournament)


def _signed(x: int) -> int:
    x %= _M64
    return x - _M64 if x >= 1 << 63 else x


class SynthIDTextWatermark:
    def __init__(self, keys, ngram_len: int, sampling_table_size: int = 2**16, sampling_table_seed: int = 0,
                 context_history_size: int = 1024, device: torch.device | str | None = None, *,
                 skip_first_ngram_calls: bool = False, table_device: str = "cpu"):
        if isinstance(keys, torch.Tensor):
            keys = keys.tolist()
        self.config = WatermarkConfig(tuple(keys) if hasattr(keys, "__iter__") else keys, ngram_len,
                                      sampling_table_size, sampling_table_seed, context_history_size,
                                      skip_first_ngram_calls, table_device)
        self.device = torch.device("cpu" if device is None else device)
        self.ngram_len = ngram_len
        self.context_history_size = context_history_size
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.keys = torch.tensor(self.config.keys, dtype=torch.long, device=self.device)
        self.sampling_table = sampling_table(sampling_table_size, sampling_table_seed, table_device).to(self.device)
        self._table_f = self.sampling_table.float()
        # (h + k) * M + 1 == h * M + (k * M + 1) mod 2**64: one add per layer on the [R, V] hashes.
        self._layer_offsets = [_signed(k * MULTIPLIER + INCREMENT) for k in self.config.keys]
        size = sampling_table_size
        self._pow2_mask = size - 1 if size & (size - 1) == 0 else None  # floor mod by 2**b == low b bits
        self._state: _BatchState | None = None

    @classmethod
    def from_config(cls, config: WatermarkConfig, device=None) -> "SynthIDTextWatermark":
        return cls(config.keys, config.ngram_len, config.sampling_table_size, config.sampling_table_seed,
                   config.context_history_size, device, skip_first_ngram_calls=config.skip_first_ngram_calls,
                   table_device=config.table_device)

    def to(self, device) -> "SynthIDTextWatermark":
        """The same watermark on ``device`` (self if already there); the table is not redrawn."""
        device = torch.device(device)
        if device == self.device:
            return self
        return SynthIDTextWatermark.from_config(self.config, device)

    @property
    def depth(self) -> int:
        return len(self.config.keys)

    def __repr__(self) -> str:
        return f"SynthIDTextWatermark(depth={self.depth}, ngram_len={self.ngram_len}, device={self.device})"

    # ---- hashing and g-values (transformers' names and shapes) ---------------------------------
    def accumulate_hash(self, current_hash: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return accumulate_hash(current_hash, data)

    def compute_ngram_keys(self, ngrams: torch.Tensor) -> torch.Tensor:
        """ngrams [B, N, ngram_len] -> the hash of each (n-gram, layer key) [B, N, depth]."""
        if ngrams.dim() != 3 or ngrams.shape[2] != self.ngram_len:
            raise GemmaforgeError(f"ngrams must be [batch, num_ngrams, {self.ngram_len}], got {tuple(ngrams.shape)}")
        h = accumulate_hash(torch.ones(ngrams.shape[:2], dtype=torch.long, device=ngrams.device), ngrams)
        return (h[..., None] + self.keys.to(ngrams.device)) * MULTIPLIER + INCREMENT

    def sample_g_values(self, ngram_keys: torch.Tensor) -> torch.Tensor:
        """Hashes (any shape) -> their g-values, int64 in {0, 1}."""
        return self.sampling_table.to(ngram_keys.device)[ngram_keys % self.sampling_table.numel()]

    def compute_g_values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> g-values [B, L - (ngram_len - 1), depth]: one per n-gram ending at
        each token from the ngram_len-th on, one per layer."""
        self._check_ids(input_ids)
        return self.sample_g_values(self.compute_ngram_keys(input_ids.unfold(1, self.ngram_len, 1)))

    def compute_context_repetition_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> bool [B, L - (ngram_len - 1)]: False where the n-gram's context
        (its first n-1 tokens) already occurred among the ``context_history_size`` contexts before
        it, the steps the generator left unwatermarked (transformers: 0 = repeated).

        transformers' history starts as zeros, so a context whose hash is 0 counts as seen until
        the history has filled; kept for equality (it happens with probability 2**-64)."""
        self._check_ids(input_ids)
        contexts = input_ids[:, :-1].unfold(1, self.ngram_len - 1, 1)  # [B, N, n-1]
        h = context_hash(contexts)  # [B, N]
        b, n = h.shape
        # The latest earlier occurrence of each hash: the previous one in a stable sort.
        sorted_h, order = torch.sort(h, dim=1, stable=True)
        rep_sorted = torch.zeros(b, n, dtype=torch.bool, device=h.device)
        rep_sorted[:, 1:] = (sorted_h[:, 1:] == sorted_h[:, :-1]) & (
            order[:, 1:] - order[:, :-1] <= self.context_history_size)
        repeated = torch.zeros_like(rep_sorted).scatter_(1, order, rep_sorted)
        repeated |= (h == 0) & (torch.arange(n, device=h.device) < self.context_history_size)
        return ~repeated

    def compute_eos_token_mask(self, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
        """input_ids [B, L] -> bool [B, L]: False from each row's first ``eos_token_id`` on."""
        self._check_ids(input_ids, min_len=1)
        return (input_ids == eos_token_id).cumsum(dim=1) == 0

    def expected_mean_g_value(self, vocab_size: int, coinflip_prob: float = 0.5) -> float:
        """The mean g-value of one layer after watermarking a uniform distribution over
        ``vocab_size`` tokens (transformers' formula; the SynthID paper's single-layer bound)."""
        return coinflip_prob + coinflip_prob * (1 - coinflip_prob) * (1 - 1 / vocab_size)

    # ---- the tournament --------------------------------------------------------------------------
    def update_scores(self, scores: torch.Tensor, g_values: torch.Tensor) -> torch.Tensor:
        """scores [B, V] (log space), g_values [B, V, depth] -> log-probs after the tournament
        (transformers' signature; the engine uses ``tournament``, which needs no [B, V, depth])."""
        probs = torch.softmax(scores, dim=1)
        for i in range(g_values.shape[2]):
            g = g_values[:, :, i]
            probs = probs * (1 + g - (g * probs).sum(dim=1, keepdim=True))
        return _finite_log(probs)

    def tournament(self, scores: torch.Tensor, context_hashes: torch.Tensor) -> torch.Tensor:
        """scores [R, V] and the hash of each row's context [R] -> log-probs after m layers of
        tournament (``update_scores`` with every candidate's g-values, one layer at a time, in
        preallocated buffers: ~2x faster than transformers' form on CPU, same bits).

        On CPU, rows go in groups of at most ``_CPU_CHUNK`` values (one row of Gemma's 262k
        vocabulary), whose five buffers stay in cache across the 2 x depth passes: 2x faster
        again. A reduction over one long row may then be split over threads, so the sums can
        differ from a whole-batch call in the last bit (so do transformers' across batch sizes)."""
        r, v = scores.shape
        if scores.device.type == "cpu":
            # After top-k / top-p most candidates are -inf (probability 0, which the tournament keeps
            # at 0): then only the rest are worth hashing. Same result up to the order of the sums.
            support = int(torch.isfinite(scores).sum(dim=1).max())
            if support <= v // 8:
                return self._sparse_tournament(scores, context_hashes, max(support, 1))
        step = max(1, _CPU_CHUNK // v) if scores.device.type == "cpu" else r
        if step < r:
            return torch.cat([self._tournament(scores[i:i + step], context_hashes[i:i + step])
                              for i in range(0, r, step)])
        return self._tournament(scores, context_hashes)

    def _sparse_tournament(self, scores: torch.Tensor, context_hashes: torch.Tensor, k: int) -> torch.Tensor:
        values, tokens = scores.topk(k, dim=1)  # every finite score of every row, and some -inf
        out = torch.full_like(scores, torch.finfo(scores.dtype).min)
        return out.scatter_(1, tokens, self._tournament(values, context_hashes, tokens))

    def _tournament(self, scores: torch.Tensor, context_hashes: torch.Tensor,
                    tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` [R, C]: the candidate ids of the columns of ``scores`` (default: 0..V-1)."""
        v = scores.shape[1]
        table = self._table_f if self._table_f.device == scores.device else self._table_f.to(scores.device)
        size = table.numel()
        # Every candidate's running hash: (h + v) * M + 1, then times M for the layer offsets above.
        if tokens is None:
            tokens = torch.arange(v, dtype=torch.long, device=scores.device)
        cand = ((context_hashes.to(scores.device)[:, None] + tokens) * MULTIPLIER + INCREMENT) * MULTIPLIER
        if self._pow2_mask is not None:
            # Only the low bits of a sum reach a power-of-two modulus: int32 suffices (size <= 2**24).
            cand = cand.bitwise_and_(self._pow2_mask).to(torch.int32)
        index = torch.empty_like(cand)
        probs = torch.softmax(scores, dim=1)
        g, scratch = torch.empty_like(probs), torch.empty_like(probs)
        for offset in self._layer_offsets:
            if self._pow2_mask is not None:
                torch.add(cand, offset & self._pow2_mask, out=index).bitwise_and_(self._pow2_mask)
            else:
                torch.add(cand, offset, out=index).remainder_(size)  # int64 wrap first, as transformers
            torch.index_select(table, 0, index.view(-1), out=g.view(-1))  # [R, V] float 0/1
            mass = torch.mul(g, probs, out=scratch).sum(dim=1, keepdim=True)
            # transformers: probs * (1 + g - G) with g int64; 1 + g is exact in float32, so equal.
            probs.mul_(g.add_(1).sub_(mass))
        return _finite_log(probs)

    def candidate_g_values(self, contexts: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """contexts [R, ngram_len - 1] -> the g-values [R, V, depth] of every candidate next token."""
        cand = accumulate_hash(context_hash(contexts)[:, None], torch.arange(vocab_size, device=contexts.device)[None, :, None])
        return self.sample_g_values((cand[..., None] + self.keys.to(contexts.device)) * MULTIPLIER + INCREMENT)

    # ---- transformers' stateful batch call ---------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """One generation step of a fixed batch, as transformers' logits processor: the first call
        starts a new generation whose context is zeros (the prompt is not part of it); each later
        call shifts in ``input_ids[:, -1]``, the token chosen at the previous step. ``reset()``
        before the next generation (transformers builds a new processor per ``generate``)."""
        self._check_ids(input_ids, min_len=1)
        b, _ = scores.shape
        if self._state is None or self._state.context.shape[0] != b:
            self._state = _BatchState(b, self.ngram_len, self.context_history_size, scores.device)
        else:
            self._state.context = torch.cat((self._state.context, input_ids[:, -1:].to(scores.device)), 1)[:, 1:]
        state = self._state
        state.calls += 1
        if self.skip_first_ngram_calls and state.calls < self.ngram_len:
            return scores
        h = context_hash(state.context)
        updated = self.tournament(scores, h)
        repeated = (state.history == h[:, None]).any(dim=1, keepdim=True)
        state.history = torch.cat((h[:, None], state.history), dim=1)[:, :-1]
        return torch.where(repeated, scores, updated)

    def reset(self) -> None:
        """Forget the batch state of ``__call__`` (a new generation starts)."""
        self._state = None

    def _check_ids(self, input_ids: torch.Tensor, min_len: int | None = None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise GemmaforgeError(f"input_ids must be a [batch, length] tensor, got {shape}")
        if min_len is not None and input_ids.shape[1] < min_len:
            raise GemmaforgeError(f"input_ids has {input_ids.shape[1]} tokens: at least {min_len} needed")
        if min_len is None and input_ids.shape[1] < self.ngram_len:
            raise GemmaforgeError(f"the text has {input_ids.shape[1]} tokens, fewer than ngram_len={self.ngram_len}:"
                                  " nothing to score; give a longer text")


class _BatchState:
    """transformers' SynthIDTextWatermarkState: the context and the hashes of recent contexts."""

    def __init__(self, batch: int, ngram_len: int, history: int, device):
        self.context = torch.zeros(batch, ngram_len - 1, dtype=torch.long, device=device)
        self.history = torch.zeros(batch, history, dtype=torch.long, device=device)
        self.calls = 0


def _finite_log(probs: torch.Tensor) -> torch.Tensor:
    """log p with -inf (a filtered token) as the dtype's lowest finite value, as transformers."""
    log = torch.log(probs)
    return torch.where(torch.isfinite(log), log, torch.finfo(log.dtype).min)
