"""The model side of evaluation: lm-eval's three request types on gemmaforge's cache and engine.

    scorer = Scorer(model, tokenizer, batch_size=16)
    scorer.loglikelihood([(context, continuation), ...])   -> [(log p, is_greedy), ...]
    scorer.loglikelihood_rolling([text, ...])              -> [log p(text), ...]
    scorer.generate_until([(context, {"until": [...], "max_gen_toks": 256}), ...]) -> [text, ...]

Tokenization and truncation are lm-eval's HF backend's (``HFLM``), so scores agree sample by sample
(docs/evaluation.md): trailing spaces of a context move to its continuation, both are cut out of one
encoding of ``context + continuation``, every encoding starts with ``<bos>`` (HF's Gemma tokenizer adds
it), an empty context is ``<bos>`` (the continuation then encoded without one), and rolling windows
use ``<bos>`` as the prefix token.

What is faster than scoring each (context, continuation) as one sequence:
- requests are grouped by context and the groups sorted by their tokens, so a batch holds questions
  that share a few-shot block; the batch's common prefix is prefilled once into one cache row and
  forked (``KVCache.fork``) into every question's rows;
- each question's own context is prefilled once and forked into one row per choice;
- the choices are then scored together, only their own tokens fed, and the output head runs only on
  the columns that predict continuation tokens (``Engine.forward(columns=...)``).
The numbers are the same as one forward per sequence up to float summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from ..generation.api import TextStream
from ..generation.engine import Engine
from ..generation.sampling import SamplingParams

BOS_TEXT = "<bos>"
_COLUMNS_PER_FORWARD = 64  # choice tokens per scoring forward: 64 x 262k float32 logits = 64 MiB


class Scorer:
    def __init__(self, model, tokenizer, *, batch_size: int = 16, engine: Engine | None = None,
                 max_length: int | None = None, progress: bool = True):
        self.model, self.tok = model, tokenizer
        self.engine = engine or Engine.for_model(model)
        self.batch_size = max(int(batch_size), 1)
        self.max_length = max_length or model.config.max_position_embeddings
        self.progress = progress
        self.bos = tokenizer.bos_id

    # ---- tokenization: lm-eval's HFLM ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """HFLM.tok_encode: one <bos> in front, unless the text already starts with it."""
        return self.tok.encode(text, add_bos=not text.startswith(BOS_TEXT))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:  # <bos> is the context; a continuation that starts with it gives it up
            cont = self.tok.encode(continuation, add_bos=False)
            return ([self.bos], cont) if cont[:1] != [self.bos] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- log-likelihood -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        return self.loglikelihood_tokens(encoded)

    @torch.inference_mode()
    def loglikelihood_tokens(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (log p(continuation | context), greedy?)."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(encoded):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation: nothing to score")
            whole = (ctx + cont)[-(self.max_length + 1):]  # HFLM's left truncation
            groups.setdefault(tuple(whole[: len(whole) - len(cont)]), []).append((i, cont))
        order = sorted(groups)  # neighbours share prefixes (the same few-shot block)
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc="loglikelihood", disable=not self.progress, leave=False)
        start = 0
        while start < len(order):
            batch, rows = [], 0  # whole groups, up to batch_size choice rows (at least one group)
            while start < len(order) and (not batch or rows + len(groups[order[start]]) <= self.batch_size):
                batch.append(order[start])
                rows += len(groups[order[start]])
                start += 1
            for (i, _), score in zip([x for ctx in batch for x in groups[ctx]],
                                     self._score_batch([(list(ctx), [c for _, c in groups[ctx]]) for ctx in batch])):
                results[i] = score
                bar.update(1)
        bar.close()
        return results

    def _score_batch(self, batch: list[tuple[list[int], list[list[int]]]]) -> list[tuple[float, bool]]:
        """Questions (context, [continuation per choice]) -> one score per choice, in order."""
        dev = self.engine.device
        n_rows = sum(len(conts) for _, conts in batch)
        max_len = max(len(ctx) + max(map(len, conts)) for ctx, conts in batch)
        cache = self.engine.new_cache(n_rows, max_len)
        # Each row is fed its context but the last token; that token starts the choice's forward,
        # so that every scored column is a choice column.
        bodies = [ctx[:-1] for ctx, _ in batch]
        shared = _common_prefix(bodies) if len(batch) > 1 else []
        bases = [0]
        for _, conts in batch[:-1]:
            bases.append(bases[-1] + len(conts))
        if shared:
            self._prefill(shared, 0, 0, cache)
            cache.fork(0, bases[1:])
        for base, body, (_, conts) in zip(bases, bodies, batch):
            self._prefill(body[len(shared):], len(shared), base, cache)
            cache.fork(base, list(range(base + 1, base + len(conts))))
        # The choices: [last context token, continuation[:-1]] per row, right-padded (position -1).
        feeds = [(len(ctx) - 1, [ctx[-1], *cont[:-1]], cont) for ctx, conts in batch for cont in conts]
        scores = []
        row = 0
        while row < n_rows:
            end, width = row + 1, len(feeds[row][1])  # rows while rows x widest <= the column budget
            while end < n_rows and (end - row + 1) * max(width, len(feeds[end][1])) <= _COLUMNS_PER_FORWARD:
                width = max(width, len(feeds[end][1]))
                end += 1
            tokens = torch.zeros(end - row, width, dtype=torch.long)
            positions = torch.full((end - row, width), -1, dtype=torch.long)
            for r, (at, fed, _) in enumerate(feeds[row:end]):
                tokens[r, : len(fed)] = torch.tensor(fed)
                positions[r, : len(fed)] = torch.arange(at, at + len(fed))
            logits = self.engine.forward(tokens.to(dev), positions.to(dev), cache, rows=slice(row, end),
                                         columns=list(range(width)))
            for r, (_, fed, cont) in enumerate(feeds[row:end]):
                logp = torch.log_softmax(logits[r, : len(cont)].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                scores.append((float(logp.gather(1, target[:, None]).sum()),
                               bool((logp.argmax(-1) == target).all())))
            row = end
        return scores

    def _prefill(self, ids: list[int], start: int, row: int, cache) -> None:
        """Feed ``ids`` (positions start..) into pool row ``row``, in chunks, for the cache only."""
        dev, chunk = self.engine.device, self.engine.prefill_chunk
        for a in range(0, len(ids), chunk):
            piece = ids[a : a + chunk]
            self.engine.forward(torch.tensor([piece], device=dev),
                                torch.arange(start + a, start + a + len(piece), device=dev)[None], cache,
                                rows=slice(row, row + 1), columns=[])

    # ---- rolling log-likelihood (perplexity tasks) ----------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """lm-eval's rolling windows of ``max_length`` tokens (prefix <bos>, disjoint predictions).
        Note HFLM encodes the text with its own <bos>, so the first prediction is p(<bos> | <bos>):
        kept, so that word and byte perplexities equal lm-eval's."""
        out = []
        for text in tqdm(texts, desc="loglikelihood_rolling", disable=not self.progress, leave=False):
            windows = rolling_windows(self.encode(text), self.bos, self.max_length)
            out.append(sum(lp for lp, _ in self.loglikelihood_tokens(windows)))
        return out

    # ---- generation ------------------------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
        """Greedy continuations, cut at the first ``until`` string (lm-eval's generate_until)."""
        out: list[str | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))  # longest first, as HFLM
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self.progress, leave=False)
        for a in range(0, len(order), self.batch_size):
            idx = order[a : a + self.batch_size]
            by_kwargs: dict[tuple, list[int]] = {}
            for i in idx:  # one engine call per set of generation settings
                kw = requests[i][1] or {}
                until = kw.get("until", ())
                until = (until,) if isinstance(until, str) else tuple(until)
                by_kwargs.setdefault((until, int(kw.get("max_gen_toks", 256))), []).append(i)
            for (until, max_gen), members in by_kwargs.items():
                ids = [self.encode(requests[i][0])[-(self.max_length - max_gen):] for i in members]
                for i, text in zip(members, self._greedy(ids, until, max_gen)):
                    out[i] = text
                bar.update(len(members))
        bar.close()
        return out

    def _greedy(self, ids: list[list[int]], until: tuple[str, ...], max_gen: int) -> list[str]:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_gen, stop=until)
        texts = []
        for row in self.engine.generate(ids, params, self.tok.stop_ids):
            stream = TextStream(self.tok, until, self.tok.stop_ids)
            texts.append("".join([stream.feed(t) for t in row] + [stream.finish()]))
        return texts


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` + ``make_disjoint_window`` as
    (context, continuation) pairs: every token predicted once, each window as long as allowed."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n : end]))
        done = end
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first, n = seqs[0], min(map(len, seqs))
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return first[:i]
    return first[:n]
