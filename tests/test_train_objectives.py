"""Objectives and recipes: a quantized teacher, and a batch source plugged into the unchanged loop."""

import pytest
import torch
import torch.nn.functional as F

import gemmaforge
from gemmaforge import Gemma, preset
from gemmaforge.eval.perplexity import perplexity
from gemmaforge.quant import quantize
from gemmaforge.train.batches import IGNORE, Batch, IndexedSource, StepLayout
from gemmaforge.train.data import read_meta
from gemmaforge.train.loop import train
from gemmaforge.train.objectives import Distillation, LiveTeacher
from gemmaforge.train.recipes import Pretrain

from conftest import randomize
from test_train_loop import cfg, counting_corpus, metrics


def test_distillation_from_an_int8_teacher_matches_its_own_logits():
    student = randomize(Gemma(preset("tiny-gemma2")), seed=1).train()
    teacher = quantize(randomize(Gemma(preset("tiny-gemma3")), seed=2), "int8")
    assert not hasattr(teacher.embed, "weight")  # the head exists only as Gemma.logits
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 512, (2, 13), generator=g)
    labels = torch.randint(3, 512, (2, 13), generator=g)
    labels[1, :4] = IGNORE  # 22 labelled rows: chunks of 5 leave no 1-row chunk (that would compile a GEMV)
    tau, alpha = 2.0, 0.5
    objective = Distillation(student, LiveTeacher(teacher), alpha=alpha, tau=tau, kind="kl", chunk=5)
    loss, stats = objective(Batch(tokens, labels))
    loss.backward()

    keep = labels.flatten() != IGNORE
    with torch.no_grad():
        zt = teacher(tokens).float().flatten(0, 1)[keep]
        s = student(tokens).float().flatten(0, 1)[keep]
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.softmax(zt / tau, -1), reduction="sum")
    ce = F.cross_entropy(s, labels.flatten()[keep], reduction="sum")
    assert stats["kl"] > 0 and torch.isfinite(loss)
    torch.testing.assert_close(stats["kl"], kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["ce"], ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.detach(), (1 - alpha) * ce + alpha * tau**2 * kl, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.embed.weight.grad.abs().sum() > 0


def test_a_quantized_teacher_from_the_config_trains(tmp_path):
    counting_corpus(tmp_path / "data")
    result = train(cfg(tmp_path, "q", teacher="tiny-gemma3", teacher_quant="int8", max_steps=2, eval_every=2,
                       save_every=2))
    assert result["train"]["kl"] > 0 and result["train"]["loss"] < 10
    with pytest.raises(gemmaforge.GemmaforgeError, match="teacher_quant"):
        cfg(tmp_path, teacher_quant="int3")


class PromptMasked(IndexedSource):
    """An SFT-shaped source: the first half of every window is a 'prompt' that is never a label."""

    def __init__(self, windows):
        self.windows, self.num_samples = windows, windows.num_samples

    def batch(self, samples):
        b = self.windows.batch(samples)
        b.labels[:, : b.labels.shape[1] // 2] = IGNORE
        return b


class MaskedRecipe(Pretrain):
    name = "sft"

    def batches(self, cfg, meta, split):
        return PromptMasked(super().batches(cfg, meta, split))


def test_a_new_batch_source_plugs_into_the_same_loop(tmp_path):
    """With lr = 0 the weights stay put, so the logged step-1 cross-entropy must be the initial model's
    loss on exactly the source's labelled tokens of step 0, normalised over the global batch."""
    counting_corpus(tmp_path / "data")
    run_cfg = cfg(tmp_path, "sft", max_steps=1, lr=0.0, min_lr=0.0, micro_batch_size=2, eval_every=1)
    recipe = MaskedRecipe()
    result = train(run_cfg, recipe=recipe)
    model = gemmaforge.load(tmp_path / "sft" / "model")  # = the initial weights (lr = 0)
    meta = read_meta(tmp_path / "data")
    source = recipe.batches(run_cfg, meta, "train")
    want = perplexity(model, source.micro_batches(0, StepLayout(4, micro=2)))
    full = perplexity(model, Pretrain().batches(run_cfg, meta, "train").micro_batches(0, StepLayout(4)))
    [logged] = metrics(tmp_path / "sft")
    assert logged["ce"] == pytest.approx(want.loss, rel=1e-5)
    assert want.tokens < full.tokens and abs(want.loss - full.loss) > 1e-3  # the mask mattered
    val = recipe.batches(run_cfg, meta, "val")
    n = min(val.num_samples, run_cfg.eval_batches * run_cfg.batch_size)
    assert result["val"]["loss"] == pytest.approx(perplexity(model, [val.batch(range(n))]).loss, rel=1e-5)
