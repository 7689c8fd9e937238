"""Cached inference must equal a full forward: token by token, chunked, past the window, padded batches."""

import pytest
import torch

from gemmaforge import cache_bytes_per_token, preset
from gemmaforge.kv_cache import full_cache_bytes_per_token

ATOL = 2e-5


def tokens(n, vocab, seed=0, batch=1):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[1] * 30, [7, 1, 1, 9, 12], [30], [3, 10, 1, 16]])
def test_incremental_equals_full_forward(model, chunks):
    x = tokens(sum(chunks), model.config.vocab_size)
    assert x.shape[1] > 2 * model.config.sliding_window  # the ring wraps around, more than once
    full = model(x)
    cache = model.new_cache(1, max_len=40)
    out, i = [], 0
    for n in chunks:
        out.append(model(x[:, i : i + n], cache=cache))
        i += n
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=1e-5)


@torch.no_grad()
def test_ring_buffer_holds_only_the_window(model):
    cache = model.new_cache(1, max_len=64)
    for i, c in enumerate(model.config.layer_types):
        expected = model.config.sliding_window if c == "sliding_attention" else 64
        assert cache.k[i].shape[2] == expected


@torch.no_grad()
def test_left_padded_batch_equals_separate_rows(model):
    """Prompts of different lengths in one batch, prefilled then decoded, equal each row run alone."""
    v = model.config.vocab_size
    prompts = [tokens(n, v, seed=n)[0] for n in (5, 17, 11)]
    steps = 12
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.full((len(prompts), width), -1)
    for r, p in enumerate(prompts):
        batch[r, width - len(p) :] = p
        pos[r, width - len(p) :] = torch.arange(len(p))
    cache = model.new_cache(len(prompts), max_len=width + steps)
    logits = model(batch, pos, cache=cache)[:, -1]
    decoded = [logits]
    nxt = torch.arange(len(prompts))[:, None] + 7  # fixed continuation tokens, same for reference
    for s in range(steps):
        pos = pos[:, -1:] + 1
        decoded.append(model(nxt + s, pos, cache=cache)[:, -1])
    for r, p in enumerate(prompts):
        seq = torch.cat([p, (nxt[r] + torch.arange(steps))])[None]
        ref = model(seq)[0, len(p) - 1 :]
        torch.testing.assert_close(torch.stack([d[r] for d in decoded]), ref, atol=ATOL, rtol=1e-5)


def test_cache_overflow_is_an_error(model):
    cache = model.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(tokens(5, model.config.vocab_size), cache=cache)


def test_cache_bytes_per_token():
    g9 = preset("gemma2-9b")
    full = full_cache_bytes_per_token(g9)
    assert full == 2 * 8 * 256 * 2 * 42
    assert cache_bytes_per_token(g9, 4096) == full  # window covers everything: no saving at <= 4k
    assert cache_bytes_per_token(g9, 8192) == pytest.approx(full * 0.75)  # half the layers keep half
    g1 = preset("gemma3-1b")
    # 22 of 26 layers local with W=512 at 32k context.
    assert cache_bytes_per_token(g1, 32768) == pytest.approx(
        full_cache_bytes_per_token(g1) * (4 + 22 * 512 / 32768) / 26
    )
