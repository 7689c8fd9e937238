"""Every fast attention path against the eager reference (soft-cap, window, GQA, padding)."""

import pytest
import torch

from gemmaforge.attention import Mask, attention, choose_impl, eager_attention


def case(b=2, h=4, kv=2, t=33, s=None, d=16, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    s = s or t
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kv, s, d, generator=g) * 3  # large scores, so the soft-cap matters
    v = torch.randn(b, kv, s, d, generator=g)
    pos = torch.arange(s).repeat(b, 1)
    if pad:
        pos[0, :5] = -1  # left padding in row 0
        pos[0, 5:] -= 5
    return q, k, v, pos[:, s - t :], pos


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("softcap", [None, 50.0, 2.0])
def test_chunked_equals_eager(window, softcap):
    q, k, v, qp, kp = case()
    mask = Mask(qp, kp, window)
    ref = eager_attention(q, k, v, mask, scale=0.3, softcap=softcap)
    out = attention(q, k, v, Mask(qp, kp, window), scale=0.3, softcap=softcap, impl="chunked")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    from gemmaforge.attention import chunked_attention

    out = chunked_attention(q, k, v, Mask(qp, kp, window), scale=0.3, softcap=softcap, block=5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("t", [33, 1])
def test_sdpa_equals_eager_without_softcap(window, t):
    q, k, v, qp, kp = case(t=t, s=33)
    ref = eager_attention(q, k, v, Mask(qp, kp, window), scale=0.3, softcap=None)
    out = attention(q, k, v, Mask(qp, kp, window), scale=0.3, softcap=None, impl="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_softcap_is_never_dropped():
    q, k, v, qp, kp = case()
    with pytest.raises(ValueError, match="soft-cap"):
        attention(q, k, v, Mask(qp, kp), scale=0.3, softcap=50.0, impl="sdpa")
    assert choose_impl(q, k, 50.0) in ("eager", "chunked")
    capped = eager_attention(q, k, v, Mask(qp, kp), scale=1.0, softcap=2.0)
    uncapped = eager_attention(q, k, v, Mask(qp, kp), scale=1.0, softcap=None)
    assert (capped - uncapped).abs().max() > 1e-2


def test_fully_masked_rows_stay_finite():
    q, k, v, qp, kp = case()
    for impl in ("eager", "chunked", "sdpa"):
        out = attention(q, k, v, Mask(qp, kp, 7), scale=0.3, softcap=None if impl == "sdpa" else 50.0, impl=impl)
        assert torch.isfinite(out).all(), impl


def test_chunked_prefill_memory_does_not_grow_quadratically():
    """The chunked path never builds a T x S mask or score matrix: per-block masks only."""
    q, k, v, qp, kp = case(b=1, h=4, kv=1, t=4096, d=8, pad=False)
    mask = Mask(qp, kp, 64)
    attention(q, k, v, mask, scale=0.3, softcap=50.0, impl="chunked")
    assert mask._dense is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path runs on CUDA (device script)")
def test_flex_equals_eager_on_cuda():
    q, k, v, qp, kp = (x.cuda() for x in case(t=128, s=128))
    for window in (None, 7):
        ref = eager_attention(q, k, v, Mask(qp, kp, window), scale=0.3, softcap=50.0)
        out = attention(q, k, v, Mask(qp, kp, window), scale=0.3, softcap=50.0, impl="flex")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
@pytest.mark.parametrize("impl", ["eager", "chunked", "auto"])
def test_segment_ids_keep_packed_documents_apart(name, impl):
    """Three documents packed into one window (positions restarting per document) give each
    document exactly the logits it gets alone; without segment ids the later ones differ."""
    from conftest import CONFIGS, randomize
    from gemmaforge import Gemma

    model = randomize(Gemma(CONFIGS[name]))
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (9, 4, 11)]  # 9 and 11 > the window
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(tokens, positions, segment_ids=segments, attn_impl=impl)[0]
        unsegmented = model(tokens, positions, attn_impl=impl)[0]
        alone = torch.cat([model(d[None], attn_impl=impl)[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (unsegmented[9:] - alone[9:]).abs().max() > 1e-3


def test_one_visibility_rule_serves_mask_and_decode_bias():
    """fast._bias and Mask are the same rule (attention.visible) on the same positions."""
    from gemmaforge.generation.fast import _bias

    kp = torch.tensor([[0, 1, 2, 3, -1, 5, 6], [4, 5, 6, 7, 8, 9, -1]])
    qp = torch.tensor([[6], [9]])
    for window in (None, 3):
        dense = Mask(qp, kp, window).dense()[:, 0, 0]
        assert torch.equal(_bias(qp, kp, window)[:, 0, 0] == 0, dense)
    f, t = False, True
    assert Mask(qp, kp, 3).dense()[:, 0, 0].tolist() == [[f, f, f, f, f, t, t], [f, f, f, t, t, t, f]]
