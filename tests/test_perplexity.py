"""eval.perplexity, the one perplexity implementation, against plain full-logits computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from gemmaforge import Gemma, preset
from gemmaforge.eval.perplexity import Perplexity, nll_sums, perplexity, sequence_perplexity
from gemmaforge.train.batches import Batch

from conftest import randomize


def _data(seed=0, b=3, t=17):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 512, (b, t), generator=g)
    tokens[:, 0] = 2
    labels = torch.randint(3, 512, (b, t), generator=g)
    labels[0, :5] = -100
    labels[2, -3:] = -100
    return tokens, labels


def _reference(model, tokens, labels):
    with torch.no_grad():
        z = model(tokens).float().flatten(0, 1)
    return F.cross_entropy(z, labels.flatten(), ignore_index=-100, reduction="sum").double(), int((labels != -100).sum())


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_masked_nll_matches_full_logits(name, chunk):
    model = randomize(Gemma(preset(name)), seed=2)
    tokens, labels = _data()
    nats, n = nll_sums(model, tokens, labels, chunk=chunk)
    want, want_n = _reference(model, tokens, labels)
    assert int(n) == want_n == labels.numel() - 8
    torch.testing.assert_close(nats, want, rtol=1e-6, atol=1e-4)


def test_batches_add_up_and_default_labels_are_the_next_tokens():
    model = randomize(Gemma(preset("tiny-gemma3")), seed=3)
    tokens, labels = _data(seed=1)
    whole = Perplexity.of(*nll_sums(model, tokens, labels))
    split = perplexity(model, [Batch(tokens[:1], labels[:1]), Batch(tokens[1:], labels[1:])], chunk=3)
    assert split.tokens == whole.tokens
    assert split.nats == pytest.approx(whole.nats, rel=1e-6)
    assert split.ppl == pytest.approx(math.exp(whole.nats / whole.tokens), rel=1e-6)

    ids = tokens[0].tolist()
    shifted = torch.tensor([ids[1:] + [-100]])
    nats, n = nll_sums(model, tokens[:1], shifted)
    assert int(n) == len(ids) - 1
    assert sequence_perplexity(model, ids, chunk=5) == pytest.approx(math.exp(float(nats) / int(n)), rel=1e-6)


def test_a_quantized_model_is_scored_through_its_own_head():
    """QuantEmbedding has no .weight: the head must be applied through Gemma.logits."""
    from gemmaforge.quant import quantize

    model = quantize(randomize(Gemma(preset("tiny-gemma2")), seed=4), "int8")
    assert not hasattr(model.embed, "weight")
    tokens, labels = _data(seed=2)
    nats, n = nll_sums(model, tokens, labels, chunk=5)  # no 1-row chunk: that would compile a GEMV
    want, want_n = _reference(model, tokens, labels)
    assert int(n) == want_n
    torch.testing.assert_close(nats, want, rtol=1e-5, atol=1e-3)
