"""Packed windows with segment ids: every document in a window is trained on as if it were alone."""

import numpy as np
import pytest
import torch

from gemmaforge import Gemma, preset
from gemmaforge.train import data as D
from gemmaforge.train.batches import Batch
from gemmaforge.train.objectives import CrossEntropy

from conftest import CONFIGS, randomize

BOS = 2


def _windows(tmp_path, packing, seq_len=24):
    rng = np.random.default_rng(3)
    docs = [[BOS] + list(rng.integers(3, 500, rng.integers(3, 12))) for _ in range(30)]
    D.write_token_dataset(tmp_path / packing, {"train": docs, "val": docs[:2]}, vocab_size=512)
    return D.PackedWindows(D.TokenStream(tmp_path / packing, "train"), seq_len, BOS, shuffle=False, packing=packing)


def test_segments_restart_positions_at_every_document(tmp_path):
    pw = _windows(tmp_path, "segments")
    b = pw.batch(range(pw.num_windows))
    for row in range(b.tokens.shape[0]):
        starts = (b.tokens[row] == BOS).nonzero().squeeze(1).tolist()
        assert starts[0] == 0
        for t in range(b.tokens.shape[1]):
            k = max(i for i, s in enumerate(starts) if s <= t)
            assert b.segment_ids[row, t] == k and b.positions[row, t] == t - starts[k]
    assert (b.segment_ids.max(1).values >= 2).all()  # several documents per window: the test below means something
    plain = _windows(tmp_path, "concat").batch(range(pw.num_windows))
    assert plain.positions is None and plain.segment_ids is None
    assert torch.equal(plain.tokens, b.tokens) and torch.equal(plain.labels, b.labels)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_packed_loss_equals_the_sum_over_its_documents_alone(tmp_path, name):
    model = randomize(Gemma(preset(name)), seed=1)
    objective = CrossEntropy(model, chunk=5)
    pw = _windows(tmp_path, "segments")
    b = pw.batch(range(3))
    with torch.no_grad():
        packed = objective.loss(b).loss
        alone = torch.zeros(())
        for row in range(b.tokens.shape[0]):
            for k in b.segment_ids[row].unique():
                doc = b.segment_ids[row] == k
                alone += objective.loss(Batch(b.tokens[row, doc][None], b.labels[row, doc][None])).loss
        concat = objective.loss(_windows(tmp_path, "concat").batch(range(3))).loss
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    assert abs(concat - alone) > 1e-2  # without segments, documents see each other: the sums differ


def test_only_token_nll_objectives_report_a_perplexity():
    """The loop prints exp(val loss) as ppl only where the val loss is a token NLL: not for a
    divergence (GKD), a pairwise loss (reward) or a policy loss (RLOO)."""
    from gemmaforge.train.objectives import GeneralizedJSD, LiveTeacher
    from gemmaforge.train.reward import BradleyTerry

    student = Gemma(CONFIGS["gemma3"])
    assert CrossEntropy(student).reports_perplexity
    assert not BradleyTerry(student).reports_perplexity
    assert not GeneralizedJSD(student, LiveTeacher(Gemma(CONFIGS["gemma3"])), beta=0.5, tau=1.0).reports_perplexity
