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
  that share a few-shot block; one pool serves the whole call and its last row keeps the prefix the
  batch's contexts share, rewound only to what the next batch shares (a task's few-shot block is
  prefilled once per call), and forked (``KVCache.fork``) into every question's row;
- the questions' own tokens are prefilled together (one padded forward per chunk), and each
  question's row is forked into one row per choice;
- the choices are then scored together, only their own tokens fed, and the output head runs only on
  the columns that predict continuation tokens (``Engine.forward(columns=...)``).
The numbers are the same as one forward per sequence up to float summation order. Generation stops
a batch as soon as every row has hit a stop id or an ``until`` string.
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
        # One pool for the whole call: batch_size choice rows and, last, the prefix row, which keeps
        # the longest prefix shared by a batch's contexts for the next batches (the few-shot block
        # of one task is prefilled once, not once per batch).
        widest = max(min(len(c) + len(x), self.max_length + 1) for c, x in encoded)
        rows_needed = max(len(g) for g in groups.values())
        pool = _Pool(self.engine.new_cache(max(self.batch_size, rows_needed) + 1, widest))
        start = 0
        while start < len(order):
            batch, rows = [], 0  # whole groups, up to batch_size choice rows (at least one group)
            while start < len(order) and (not batch or rows + len(groups[order[start]]) <= self.batch_size):
                batch.append(order[start])
                rows += len(groups[order[start]])
                start += 1
            for (i, _), score in zip([x for ctx in batch for x in groups[ctx]],
                                     self._score_batch([(list(ctx), [c for _, c in groups[ctx]]) for ctx in batch],
                                                       pool)):
                results[i] = score
                bar.update(1)
        bar.close()
        return results

    def _score_batch(self, batch: list[tuple[list[int], list[list[int]]]], pool: "_Pool") -> list[tuple[float, bool]]:
        """Questions (context, [continuation per choice]) -> one score per choice, in order.

        Rows: question q's context goes to row q (0..Q-1), its other choices to rows Q.. after it;
        the pool's last row holds the shared prefix."""
        dev, cache = self.engine.device, pool.cache
        # Each row is fed its context but the last token; that token starts the choice's forward,
        # so that every scored column is a choice column.
        bodies = [ctx[:-1] for ctx, _ in batch]
        shared = _common_prefix(bodies)
        have = pool.reuse(shared)  # tokens of ``shared`` the prefix row already holds
        if have < len(shared):
            self._prefill([shared[have:]], have, slice(pool.prefix_row, pool.prefix_row + 1), cache)
            pool.held = list(shared)
        n_q = len(batch)
        cache.fork(pool.prefix_row, list(range(n_q)))
        self._prefill([b[len(shared):] for b in bodies], len(shared), slice(0, n_q), cache)
        row_of, extra = [], n_q  # (question, choice) -> pool row
        for q, (_, conts) in enumerate(batch):
            mine = [q] + list(range(extra, extra + len(conts) - 1))
            cache.fork(q, mine[1:])
            extra += len(conts) - 1
            row_of.append(mine)
        # The choices: [last context token, continuation[:-1]] per row, right-padded (position -1),
        # in pool-row order; scores come back in request order.
        feeds: list = [None] * extra
        for q, (ctx, conts) in enumerate(batch):
            for k, cont in enumerate(conts):
                feeds[row_of[q][k]] = (len(ctx) - 1, [ctx[-1], *cont[:-1]], cont)
        by_row: list = [None] * extra
        row = 0
        while row < extra:
            end, width = row + 1, len(feeds[row][1])  # rows while rows x widest <= the column budget
            while end < extra and (end - row + 1) * max(width, len(feeds[end][1])) <= _COLUMNS_PER_FORWARD:
                width = max(width, len(feeds[end][1]))
                end += 1
            tokens = torch.zeros(end - row, width, dtype=torch.long)
            positions = torch.full((end - row, width), -1, dtype=torch.long)
            targets = torch.full((end - row, width), -1, dtype=torch.long)
            for r, (at, fed, cont) in enumerate(feeds[row:end]):
                tokens[r, : len(fed)] = torch.tensor(fed)
                positions[r, : len(fed)] = torch.arange(at, at + len(fed))
                targets[r, : len(cont)] = torch.tensor(cont)
            # A row wider than the budget (a rolling window of a long document) goes in pieces of
            # columns, in order: each piece extends the row's keys, so the sums are the same and
            # the logits never exceed the budget ([64, 262k] float32, not [8192, 262k]).
            piece = max(_COLUMNS_PER_FORWARD // (end - row), 1)
            total = torch.zeros(end - row, dtype=torch.float64)
            greedy = torch.ones(end - row, dtype=torch.bool)
            for a in range(0, width, piece):
                cols = slice(a, min(a + piece, width))
                logits = self.engine.forward(tokens[:, cols].to(dev), positions[:, cols].to(dev), cache,
                                             rows=slice(row, end), columns=list(range(cols.stop - a)))
                logp = torch.log_softmax(logits.float(), dim=-1)
                want = targets[:, cols]
                real = want >= 0
                picked = logp.gather(2, want.clamp(min=0).to(dev)[..., None])[..., 0].cpu()  # [rows, piece] to the host,
                top = logp.argmax(-1).cpu()                                                # not [rows, piece, V]
                total += (picked * real).sum(1).double()
                greedy &= ((top == want) | ~real).all(1)
            for r in range(end - row):
                by_row[row + r] = (float(total[r]), bool(greedy[r]))
            row = end
        return [by_row[r] for mine in row_of for r in mine]

    def _prefill(self, ids: list[list[int]], start: int, rows: slice, cache) -> None:
        """Feed ``ids[i]`` (positions start..) into pool row ``rows.start + i``, right-padded, in
        chunks, for the cache only."""
        dev, chunk = self.engine.device, self.engine.prefill_chunk
        longest = max(map(len, ids))
        for a in range(0, longest, chunk):
            width = min(chunk, longest - a)
            tokens = torch.zeros(len(ids), width, dtype=torch.long)
            positions = torch.full((len(ids), width), -1, dtype=torch.long)
            live = False
            for r, seq in enumerate(ids):
                piece = seq[a : a + width]
                if piece:
                    live = True
                    tokens[r, : len(piece)] = torch.tensor(piece)
                    positions[r, : len(piece)] = torch.arange(start + a, start + a + len(piece))
            if live:
                self.engine.forward(tokens.to(dev), positions.to(dev), cache, rows=rows, columns=[])

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
        """The Engine's lock-step greedy decode of the batch, stopped as soon as every row has
        emitted a stop id or completed an ``until`` string (the engine itself stops rows on ids
        only): the text after a stop string is never used, so the result is the same as decoding
        ``max_gen`` tokens and cutting."""
        params = SamplingParams(temperature=0.0, max_new_tokens=max_gen)
        streams = [TextStream(self.tok, until, self.tok.stop_ids) for _ in ids]
        texts = [[] for _ in ids]
        steps = self.engine.steps(ids, params, self.tok.stop_ids)
        try:
            for step in steps:
                for r, t in enumerate(step.tolist()):
                    if t >= 0 and not streams[r].done:
                        texts[r].append(streams[r].feed(t))
                    elif t < 0 and not streams[r].done:  # FINISHED: the row's stop id came earlier
                        texts[r].append(streams[r].finish())
                if all(st.done for st in streams):
                    break
        finally:
            steps.close()
        return ["".join(parts) + st.finish() for parts, st in zip(texts, streams)]


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


class _Pool:
    """One scoring call's cache and what its prefix row (the last) holds."""

    def __init__(self, cache):
        self.cache, self.prefix_row, self.held = cache, cache.num_rows - 1, []

    def reuse(self, prefix: list[int]) -> int:
        """Cut the prefix row back to what it shares with ``prefix``; the tokens it keeps."""
        n = len(_common_prefix([self.held, prefix])) if self.held else 0
        drop = len(self.held) - n
        if drop and not self.cache.can_rewind(self.prefix_row, drop):
            self.cache.free(self.prefix_row)  # its ring has overwritten keys: start over
            n, drop = 0, 0
        if drop:
            self.cache.rewind(self.prefix_row, drop)
        self.held = self.held[:n]
        return n


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first, n = seqs[0], min(map(len, seqs))
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return first[:i]
    return first[:n]
