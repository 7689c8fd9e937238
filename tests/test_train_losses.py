"""Chunked output-head losses against plain full-vocabulary autograd computations."""

import pytest
import torch
import torch.nn.functional as F

from gemmaforge import Gemma, preset
from gemmaforge.train.distill import sample_targets
from gemmaforge.train.losses import head_loss, select_rows

from conftest import randomize


def _setup(name="tiny-gemma2", seed=0, b=2, t=12):
    model = randomize(Gemma(preset(name)), seed)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (b, t), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (b, t), generator=g)
    labels[0, :3] = -100  # ignored positions must not count
    return model, tokens, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])  # with and without the final soft-cap
@pytest.mark.parametrize("chunk", [3, 1000])
def test_chunked_cross_entropy_matches_full_autograd(name, chunk):
    model, tokens, labels = _setup(name)
    ref = F.cross_entropy(model(tokens).float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    want = _grads(model)
    model.zero_grad()

    rows, y, _ = select_rows(model.hidden_states(tokens), labels)
    loss, hard, kd = head_loss(rows, model, y, chunk=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hard, ref, rtol=1e-5, atol=1e-4)
    assert kd.item() == 0.0
    got = _grads(model)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=5e-5, msg=n)


def _reference_distill(student_logits, teacher_logits, labels, alpha, tau, kind):
    """The textbook formula on full [B, T, V] tensors."""
    keep = labels.flatten() != -100
    s = student_logits.float().flatten(0, 1)[keep]
    z = teacher_logits.float().flatten(0, 1)[keep]
    y = labels.flatten()[keep]
    hard = F.cross_entropy(s, y, reduction="sum")
    p_t = F.softmax(z / tau, -1)
    soft = -(p_t * F.log_softmax(s / tau, -1)).sum()
    if kind == "kl":
        soft = F.kl_div(F.log_softmax(s / tau, -1), p_t, reduction="sum")
    return (1 - alpha) * hard + alpha * tau**2 * soft, hard, soft


@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_cached_topk_with_k_equal_vocab_is_exact(kind, alpha, tau):
    student, tokens, labels = _setup("tiny-gemma2", seed=1)
    teacher = randomize(Gemma(preset("tiny-gemma2")), seed=7)
    with torch.no_grad():
        z_full = teacher(tokens)
    ref, ref_hard, ref_soft = _reference_distill(student(tokens), z_full, labels, alpha, tau, kind)
    ref.backward()
    want = _grads(student)
    student.zero_grad()

    vals, ids = z_full.topk(student.config.vocab_size, dim=-1)  # a full-size "cache", sorted by logit
    rows, y, index = select_rows(student.hidden_states(tokens), labels)
    ids, vals = (c.flatten(0, 1).index_select(0, index) for c in (ids, vals))
    loss, hard, soft = head_loss(rows, student, y, teacher=lambda r: (ids[r], vals[r]), alpha=alpha, tau=tau,
                                 kd_kind=kind, chunk=7)
    loss.backward()
    torch.testing.assert_close(hard, ref_hard, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(soft, ref_soft, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    got = _grads(student)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=5e-5, msg=n)


def test_live_teacher_full_logits_match_reference():
    student, tokens, labels = _setup("tiny-gemma3", seed=2)
    teacher = randomize(Gemma(preset("tiny-gemma3")), seed=3)
    with torch.no_grad():
        z_full = teacher(tokens)
    ref, _, _ = _reference_distill(student(tokens), z_full, labels, 0.5, 1.5, "kl")
    rows, y, index = select_rows(student.hidden_states(tokens), labels)
    zt = z_full.flatten(0, 1).index_select(0, index)
    loss, _, _ = head_loss(rows, student, y, teacher=lambda r: (None, zt[r]), alpha=0.5, tau=1.5, chunk=4)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


def test_topk_truncation_differs_from_full_but_is_renormalised():
    """k < vocab must change the loss (so the k = vocab test above can fail) but stay a proper
    cross-entropy against a distribution that sums to one over the kept entries."""
    student, tokens, labels = _setup("tiny-gemma2", seed=4)
    teacher = randomize(Gemma(preset("tiny-gemma2")), seed=5)
    with torch.no_grad():
        z_full = teacher(tokens)
        rows, y, index = select_rows(student.hidden_states(tokens), labels)
        losses = {}
        for k in (8, student.config.vocab_size):
            vals, ids = z_full.topk(k, dim=-1)
            ids, vals = (c.flatten(0, 1).index_select(0, index) for c in (ids, vals))
            losses[k] = head_loss(rows, student, y, teacher=lambda r: (ids[r], vals[r]), alpha=1.0,
                                  kd_kind="soft_ce")[0]
    assert abs(losses[8] - losses[student.config.vocab_size]) > 1e-3


def test_sampled_targets_are_distinct_teacher_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g) * 3
    ids, vals = sample_targets(z, 16, 1.0, g)
    for row in range(6):
        valid = torch.isfinite(vals[row])
        chosen = ids[row][valid]
        assert len(set(chosen.tolist())) == len(chosen)  # distinct
        assert valid[: valid.sum()].all()  # padding only at the end
        torch.testing.assert_close(vals[row][valid], z[row][chosen])


def test_sampled_targets_follow_the_teacher_distribution():
    """Tokens are drawn in proportion to p: over many draws, inclusion frequencies of a single draw
    (k = 1) match softmax(z / tau)."""
    g = torch.Generator().manual_seed(1)
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    ids, _ = sample_targets(z, 1, 2.0, g)
    freq = torch.bincount(ids[:, 0], minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(z[0] / 2.0, -1), atol=0.03, rtol=0)


def test_bf16_compute_is_close_to_fp32():
    model, tokens, labels = _setup("tiny-gemma2", seed=6)
    rows, y, _ = select_rows(model.hidden_states(tokens), labels)
    with torch.no_grad():
        fp32 = head_loss(rows, model, y, chunk=5)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the head's matmul in bf16, the loss in fp32
            bf16 = head_loss(rows, model, y, chunk=5)[0]
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)
