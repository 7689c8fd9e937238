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
        assert cache.k[i].shape[2] == expected + 1  # + the trash slot for padding writes (kv_cache.py)


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


# ---- the pool: per-row lengths, free, fork, rewind, slack ---------------------------------------------
def full_logits(model, ids):
    return model(torch.tensor([ids]))[0]


@torch.no_grad()
def test_rows_have_their_own_lengths_and_prefill_one_at_a_time(model):
    """Rows of a pool filled separately (a slice each), then decoded together in one [S, 1] step
    with an idle row (position -1), equal full forwards of each sequence."""
    v = model.config.vocab_size
    a, b = tokens(13, v, seed=1)[0].tolist(), tokens(4, v, seed=2)[0].tolist()
    cache = model.new_cache(3, max_len=32)
    model(torch.tensor([a]), cache=cache, rows=slice(0, 1))
    model(torch.tensor([b]), cache=cache, rows=slice(2, 3))
    assert cache.lengths == [13, 0, 4]
    out = model(torch.tensor([[5], [0], [6]]), torch.tensor([[13], [-1], [4]]), cache)[:, -1]
    torch.testing.assert_close(out[0], full_logits(model, a + [5])[-1], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out[2], full_logits(model, b + [6])[-1], atol=ATOL, rtol=1e-5)
    assert cache.lengths == [14, 0, 5]
    assert (cache.global_pos[1] == -1).all()  # the idle row wrote only to its trash slot


@torch.no_grad()
def test_fork_copies_a_prefilled_row_and_free_empties_one(model):
    v = model.config.vocab_size
    ids = tokens(11, v, seed=3)[0].tolist()
    cache = model.new_cache(3, max_len=24)
    model(torch.tensor([ids]), cache=cache, rows=slice(1, 2))
    cache.fork(1, [0, 2])
    assert cache.lengths == [11, 11, 11]
    nxt = torch.tensor([[3], [4], [5]])
    out = model(nxt, torch.full((3, 1), 11), cache)[:, -1]
    for r in range(3):
        torch.testing.assert_close(out[r], full_logits(model, ids + [3 + r])[-1], atol=ATOL, rtol=1e-5)
    cache.free(0)
    assert cache.lengths[0] == 0 and (cache.global_pos[0] == -1).all() and (cache.ring_pos[0] == -1).all()
    other = tokens(3, v, seed=4)[0].tolist()  # a new sequence in the freed row sees nothing of the old one
    out = model(torch.tensor([other]), cache=cache, rows=slice(0, 1))[0, -1]
    torch.testing.assert_close(out, full_logits(model, other)[-1], atol=ATOL, rtol=1e-5)


@torch.no_grad()
def test_rewind_within_the_slack_forgets_rejected_tokens(model):
    """Verify k draft tokens in one forward (written before attending: the slack keeps every key
    the first of them sees), reject some, rewind, continue: equal to never having seen them. Past
    the window, so the ring has wrapped."""
    w = model.config.sliding_window
    v = model.config.vocab_size
    k = 3
    ids = tokens(2 * w + 1, v, seed=5)[0].tolist()
    cache = model.new_cache(1, max_len=4 * w, slack=k)
    assert cache.slack == k and cache.ring == w + k
    model(torch.tensor([ids]), cache=cache)
    draft = [7, 8, 9]
    verify = model(torch.tensor([draft]), cache=cache)[0]
    torch.testing.assert_close(verify, full_logits(model, ids + draft)[-k:], atol=ATOL, rtol=1e-5)
    cache.rewind(0, 2)  # keep the first draft token only
    assert cache.lengths == [len(ids) + 1]
    out = model(torch.tensor([[11, 12]]), cache=cache)[0]
    torch.testing.assert_close(out, full_logits(model, ids + [7, 11, 12])[-2:], atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="slack"):
        cache.rewind(0, k + 1)
