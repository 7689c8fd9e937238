"""Preallocated KV cache: a fixed pool of rows (slots), each one sequence with its own length.

Global layers keep every position; local layers a ring of ``sliding_window + slack`` slots. Why a
ring is enough (docs/reference.md section 5): a local layer's query at position p sees keys
p-W+1..p, so only the last W keys ever matter. Each slot stores the position of the token in it
and ``attention.visible`` turns stored positions into visibility, so a stale or empty slot
(position -1) is masked by the same rule as everything else.

Addressing: a row's token at position p lives in global column p and in ring slot p % ring. There
is no padding inside a row: rows of different lengths simply have different lengths. Every buffer
has one extra *trash* slot at its end whose position stays -1: writes of padding tokens (position
-1: a short row in a batched prefill chunk, an idle row in a decode step over the whole pool) go
there, so one scatter serves every row without branching, and a slice of the written slots is
never the whole buffer (which would be a recompilation for the compiled CPU step).

Slack: with ``slack`` extra ring slots, up to ``slack + 1`` new tokens can be written *before*
attending (a decode step, or the verification of ``slack`` draft tokens) without overwriting a key
that one of them still sees, and ``rewind(row, n <= slack)`` leaves every key that the next tokens
will need in place. Longer prefill chunks attend over [ring before the chunk | the chunk] and
write the ring afterwards (``commit``).

The cache owns every write: the model (``prepare`` / ``update`` / ``commit``) and the fast decode
step (``decode_columns`` / ``write``) both call it. Pool operations for the scheduler: ``free``,
``fork`` (copy one prefilled row into others: n samples, RL groups, the choices of one eval
question), ``rewind`` (drop rejected draft tokens). Shapes never change, so CUDA graphs stay valid.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .config import GemmaConfig


@dataclass
class CacheStep:
    """One forward of ``new`` columns over the pool rows ``rows`` (a slice)."""

    rows: slice
    new: int
    kv_len: int  # global columns attended: the longest row's length after this forward
    ring_len: int  # ring slots attended (write-first mode)
    write_first: bool  # local layers: write the chunk, then attend over the ring
    global_cols: torch.Tensor  # [B, T] global column of each new token (trash slot for padding)
    ring_cols: torch.Tensor  # [B, T] ring slot of each new token written into the ring (else trash)
    positions: torch.Tensor  # [B, T]
    global_k_pos: torch.Tensor  # [B, kv_len] positions of the keys global layers attend to
    local_k_pos: torch.Tensor  # [B, S_local] positions of the keys local layers attend to


class KVCache:
    def __init__(self, config: GemmaConfig, num_rows: int, max_len: int, *, device=None, dtype=torch.float32,
                 slack: int = 0):
        self.config, self.num_rows, self.max_len = config, num_rows, max_len
        self.window = min(config.sliding_window, max_len)
        self.ring = min(config.sliding_window + slack, max_len)
        kv, hd = config.num_kv_heads, config.head_dim
        self.k, self.v = [], []
        for i in range(config.num_layers):
            slots = (self.ring if config.is_local(i) else max_len) + 1  # + the trash slot
            self.k.append(torch.zeros(num_rows, kv, slots, hd, device=device, dtype=dtype))
            self.v.append(torch.zeros(num_rows, kv, slots, hd, device=device, dtype=dtype))
        # Slot positions are the same for every layer of one type: stored once per type.
        self.global_pos = torch.full((num_rows, max_len + 1), -1, dtype=torch.long, device=device)
        self.ring_pos = torch.full((num_rows, self.ring + 1), -1, dtype=torch.long, device=device)
        self.lengths = [0] * num_rows  # host copy: tokens held by each row
        self._prefixes: dict[int, KVCache] = {}

    @property
    def slack(self) -> int:
        """Tokens that can be written before attending, minus one; and the longest safe rewind."""
        return self.max_len if self.ring >= self.max_len else self.ring - self.window

    @property
    def length(self) -> int:
        """The longest row's length (for callers that treat the pool as one batch)."""
        return max(self.lengths)

    def prefix(self, n: int) -> KVCache:
        """Rows 0..n-1 as a cache of their own: views of this pool's buffers and the same host
        ``lengths`` list, so writes and ``advance`` land in the pool. A decode step over the live
        rows only, when they are the first n (the scheduler keeps them there): on CPU every idle
        row of a whole-pool step costs as much as a live one (docs/serving.md, "KV budget").
        ``n == num_rows`` is a view too: a compiled step sees the same kind of tensors (views,
        whose ``_base`` dynamo guards on) at every width, and does not recompile for the pool."""
        view = self._prefixes.get(n)
        if view is None:
            view = copy.copy(self)
            view.num_rows, view._prefixes = n, {}
            view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
            view.global_pos, view.ring_pos = self.global_pos[:n], self.ring_pos[:n]
            self._prefixes[n] = view
        return view

    # ---- pool operations -----------------------------------------------------------------------
    def reset(self) -> None:
        self.global_pos.fill_(-1)
        self.ring_pos.fill_(-1)
        self.lengths[:] = [0] * self.num_rows  # in place: prefix() views share the list

    def free(self, row: int) -> None:
        """Row ``row`` holds nothing any more (its keys stay but are masked: position -1)."""
        self.global_pos[row] = -1
        self.ring_pos[row] = -1
        self.lengths[row] = 0

    def fork(self, src: int, dst: list[int] | tuple[int, ...]) -> None:
        """Copy row ``src`` (keys, values, positions, length) into each row of ``dst``."""
        if not dst:
            return
        idx = torch.tensor(list(dst), device=self.global_pos.device)
        for buf in (*self.k, *self.v, self.global_pos, self.ring_pos):
            # A copy of the source row first: torch refuses a write whose input aliases the target.
            buf[idx] = buf[src : src + 1].clone().expand(len(dst), *buf.shape[1:])
        for r in dst:
            self.lengths[r] = self.lengths[src]

    def can_rewind(self, row: int, n: int) -> bool:
        """Whether ``rewind(row, n)`` keeps every key the next tokens need: n <= slack (the ring
        slots those tokens overwrote held positions no later query can see), or the row never
        wrapped its ring (nothing was overwritten)."""
        return 0 <= n <= self.lengths[row] and (n <= self.slack or self.lengths[row] <= self.ring)

    def rewind(self, row: int, n: int) -> None:
        """Forget the last ``n`` tokens of ``row``: rejected draft tokens, or the part of a finished
        request that a new one does not share (prefix reuse). Checked by ``can_rewind``."""
        length = self.lengths[row]
        if not 0 <= n <= length:
            raise ValueError(f"cannot rewind row {row} by {n}: it holds {length} tokens")
        if not self.can_rewind(row, n):
            raise ValueError(f"cannot rewind by {n} > slack {self.slack}: the ring has overwritten keys that "
                             "the next tokens need; build the cache with a larger slack")
        start = length - n
        self.global_pos[row, start:length] = -1
        dropped = torch.arange(start, length, device=self.ring_pos.device) % self.ring
        self.ring_pos[row, dropped] = -1
        self.lengths[row] = start

    # ---- one forward through the model: prepare, update per layer, commit ---------------------
    def prepare(self, positions: torch.Tensor, rows: slice | None = None) -> CacheStep:
        """positions [B, T] of the tokens about to be fed to pool rows ``rows`` (default: all);
        -1 marks padding. A token at position p goes to column p."""
        rows = rows or slice(0, self.num_rows)
        b, t = positions.shape
        lengths = self.lengths[rows]
        if len(lengths) != b:
            raise ValueError(f"positions have {b} rows but the pool slice {rows} has {len(lengths)}")
        last = positions.max(dim=1).values.tolist()  # one host sync per forward (not on the decode path)
        new_lengths = [max(n, p + 1) for n, p in zip(lengths, last)]
        kv_len = max(new_lengths)
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: {kv_len} tokens > max_len {self.max_len}")
        real = positions >= 0
        global_cols = torch.where(real, positions, self.max_len)
        write_first = t <= self.slack + 1
        if write_first:
            ring_cols = torch.where(real, positions % self.ring, self.ring)
        else:
            # Only each row's last ``ring`` tokens reach the ring (earlier ones would collide).
            keep = real & (positions > torch.tensor(last, device=positions.device)[:, None] - self.ring)
            ring_cols = torch.where(keep, positions % self.ring, self.ring)
        gpos, rpos = self.global_pos[rows], self.ring_pos[rows]
        gpos.scatter_(1, global_cols, positions)
        ring_len = min(kv_len, self.ring)
        if write_first:
            rpos.scatter_(1, ring_cols, positions)
            local_k_pos = rpos[:, :ring_len]
        else:
            # Chunked prefill: earlier queries of this chunk may need keys that later tokens of the
            # chunk overwrite, so attend over [ring before this chunk | the chunk], then write. A
            # pool slice that holds nothing yet attends over the chunk alone.
            empty = all(n == 0 for n in lengths)
            local_k_pos = positions if empty else torch.cat([rpos[:, :ring_len], positions], dim=1)
        for i, r in enumerate(range(*rows.indices(self.num_rows))):
            self.lengths[r] = new_lengths[i]
        return CacheStep(rows, t, kv_len, ring_len, write_first, global_cols, ring_cols, positions,
                         gpos[:, :kv_len], local_k_pos)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep):
        """k, v [B, Hkv, T, D] of this layer's new tokens -> (keys, values) to attend over."""
        ck, cv = self.k[layer][step.rows], self.v[layer][step.rows]
        if not self.config.is_local(layer):
            self._scatter(ck, cv, k, v, step.global_cols)
            return ck[:, :, : step.kv_len], cv[:, :, : step.kv_len]
        if step.write_first:
            self._scatter(ck, cv, k, v, step.ring_cols)
            return ck[:, :, : step.ring_len], cv[:, :, : step.ring_len]
        if step.local_k_pos is step.positions:
            keys, values = k, v
        else:
            keys = torch.cat([ck[:, :, : step.ring_len], k], dim=2)
            values = torch.cat([cv[:, :, : step.ring_len], v], dim=2)
        self._scatter(ck, cv, k, v, step.ring_cols)  # after the reads above: cat made copies
        return keys, values

    def commit(self, step: CacheStep) -> None:
        if not step.write_first:
            self.ring_pos[step.rows].scatter_(1, step.ring_cols, step.positions)
        # Padding wrote position -1 into the trash slots: they stay "empty".

    @staticmethod
    def _scatter(ck, cv, k, v, cols: torch.Tensor) -> None:
        idx = cols[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        ck.scatter_(2, idx, k)
        cv.scatter_(2, idx, v)

    # ---- the decode step's interface (no host work: it runs inside a compiled graph) ------------
    def decode_columns(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S, 1] (-1 = idle row) -> (global column, ring slot) [S, 1]; records the positions."""
        real = positions >= 0
        global_cols = torch.where(real, positions, self.max_len)
        ring_cols = torch.where(real, positions % self.ring, self.ring)
        self.global_pos.scatter_(1, global_cols, positions)
        self.ring_pos.scatter_(1, ring_cols, positions)
        return global_cols, ring_cols

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor) -> None:
        """k, v [S, Hkv, T, D] into the whole pool at ``cols`` [S, T] (from ``decode_columns``).
        An index_put over (row, column) pairs: inductor lowers it to one indirect store, cheaper in
        the compiled step than a scatter along an expanded index."""
        rows = torch.arange(k.shape[0], device=cols.device)[:, None]
        self.k[layer][rows, :, cols] = k.transpose(1, 2)
        self.v[layer][rows, :, cols] = v.transpose(1, 2)

    def advance(self, positions: list[int]) -> None:
        """Host bookkeeping after a decode step: row r now holds positions[r] + 1 tokens (-1: idle)."""
        for r, p in enumerate(positions):
            if p >= 0:
                self.lengths[r] = max(self.lengths[r], p + 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def cache_bytes_per_token(config: GemmaConfig, max_len: int, dtype_bytes: int = 2) -> float:
    """Average KV bytes per token of context when the cache holds ``max_len`` tokens (bf16 default)."""
    per_slot = 2 * config.num_kv_heads * config.head_dim * dtype_bytes  # K and V
    window = min(config.sliding_window, max_len)
    slots = sum(window if config.is_local(i) else max_len for i in range(config.num_layers))
    return per_slot * slots / max_len


def full_cache_bytes_per_token(config: GemmaConfig, dtype_bytes: int = 2) -> float:
    """What a cache that keeps every position in every layer would need (the baseline to compare to)."""
    return 2 * config.num_kv_heads * config.head_dim * dtype_bytes * config.num_layers
