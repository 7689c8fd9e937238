"""The generalized JSD (GKD's loss) against TRL's GKDTrainer.generalized_jsd_loss, and its chunked
training form against full-vocabulary autograd."""

import os

import pytest
import torch

from gemmaforge import Gemma, preset
from gemmaforge.train.losses import generalized_jsd, head_jsd, policy_gradient_loss, select_rows
from gemmaforge.train.objectives import LiveTeacher

from conftest import randomize

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def trl_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


def _logits(seed, shape=(3, 7, 96), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).float() * scale


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_trl_with_its_default_reduction(trl_jsd, beta, temperature, masked):
    s, z = _logits(0), _logits(1)
    labels = None
    if masked:
        labels = torch.randint(0, 96, s.shape[:2], generator=torch.Generator().manual_seed(2))
        labels[0, :4] = -100
        labels[2, 5:] = -100
    s_ref = s.clone().requires_grad_(True)
    want = trl_jsd(s_ref, z, labels=labels, beta=beta, temperature=temperature)
    want.backward()
    s_ours = s.clone().requires_grad_(True)
    got = generalized_jsd(s_ours, z, labels, beta=beta, temperature=temperature, chunk=4)
    got.backward()
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-4, atol=1e-7)


def test_fully_masked_batch_and_2d_input_follow_trl(trl_jsd):
    s, z = _logits(3, (5, 40)), _logits(4, (5, 40))
    torch.testing.assert_close(generalized_jsd(s, z), trl_jsd(s, z))  # [N, V]: divided by N
    labels = torch.full((5,), -100)
    assert generalized_jsd(s, z, labels).item() == 0.0 == trl_jsd(s, z, labels=labels).item()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, z, beta=1.5)


def test_identical_distributions_have_zero_divergence():
    s = _logits(5)
    for beta in (0.0, 0.5, 1.0):
        assert abs(generalized_jsd(s, s.clone(), beta=beta).item()) < 1e-5


def _student_teacher(name, b=2, t=11):
    student = randomize(Gemma(preset(name)), seed=1).train()
    teacher = randomize(Gemma(preset(name)), seed=2).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 512, (b, t), generator=g)
    labels = torch.randint(3, 512, (b, t), generator=g)
    labels[0, :3] = -100
    return student, teacher, tokens, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _Obj:  # what LiveTeacher.distribution reads from its objective
    attn_impl = None

    @staticmethod
    def hidden(model, batch):
        return model.hidden_states(batch.tokens)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])  # with and without the final soft-cap
@pytest.mark.parametrize("beta,tau", [(0.0, 1.0), (0.5, 0.8), (1.0, 1.5), (0.3, 1.0)])
def test_chunked_training_form_matches_full_autograd(name, beta, tau):
    from gemmaforge.train.batches import Batch

    student, teacher, tokens, labels = _student_teacher(name)
    with torch.no_grad():
        z = teacher(tokens)
    n = int((labels != -100).sum())
    ref = generalized_jsd(student(tokens), z, labels, beta=beta, temperature=tau) * n  # the summed form
    ref.backward()
    want = _grads(student)
    student.zero_grad()

    seen = []
    real = student.logits

    def spy(h, **kw):  # the head only ever sees one chunk of rows
        seen.append(h.shape[0])
        return real(h, **kw)

    student.logits = spy
    rows, _, index = select_rows(student.hidden_states(tokens), labels)
    dist = LiveTeacher(teacher).distribution(_Obj, Batch(tokens, labels), index)
    loss, value = head_jsd(rows, student, dist, beta=beta, tau=tau, chunk=4)
    loss.backward()
    assert max(seen) <= 4 and sum(seen) == n
    torch.testing.assert_close(value, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    got = _grads(student)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-6, msg=k)


def test_policy_gradient_loss_matches_autograd():
    student, _, tokens, labels = _student_teacher("tiny-gemma2")
    keep = labels.flatten() != -100
    weights = torch.linspace(-1.0, 2.0, int(keep.sum()))
    logp = torch.log_softmax(student(tokens).float().flatten(0, 1)[keep], -1)
    y = labels.flatten()[keep]
    picked = logp.gather(1, y[:, None]).squeeze(1)
    ref = -(weights * picked).sum()
    ref.backward()
    want = _grads(student)
    student.zero_grad()
    rows, y2, _ = select_rows(student.hidden_states(tokens), labels)
    loss, nll, entropy = policy_gradient_loss(rows, student, y2, weights, chunk=5)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(nll.sum(), -picked.sum().detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.sum(), -(logp.exp() * logp).sum().detach(), rtol=1e-5, atol=1e-4)
    for k in want:
        torch.testing.assert_close(_grads(student)[k], want[k], rtol=1e-4, atol=2e-6, msg=k)
