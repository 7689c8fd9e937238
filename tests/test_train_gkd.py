"""gemmaforge gkd: on-policy steps sample through the engine, the loss is the generalized JSD on the
completion tokens, resume regenerates the same completions, tokenizer and vocabulary checks."""

import pytest
import torch
import yaml

import gemmaforge
from gemmaforge import Gemma, preset
from gemmaforge.cli import main
from gemmaforge.generation import Engine, SamplingParams
from gemmaforge.train.batches import StepLayout
from gemmaforge.train.config import load_config
from gemmaforge.train.loop import train
from gemmaforge.train.recipes import GKD

from conftest import randomize
from post_training_data import counting_chats, tiny_tokenizer, write_jsonl
from test_train_loop import metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher checkpoint (with the tiny tokenizer) and chat data."""
    root = tmp_path_factory.mktemp("gkd")
    tok_path = tiny_tokenizer(root / "tok")
    teacher = randomize(Gemma(preset("tiny-gemma3")), seed=5)
    gemmaforge.save_pretrained(teacher, root / "teacher")
    (root / "teacher" / "tokenizer.json").write_bytes(tok_path.read_bytes())
    write_jsonl(root / "chats.jsonl", counting_chats(40))
    return root, tok_path


def gkd_cfg(tmp_path, setup, name="run", **kw):
    root, tok_path = setup
    base = dict(model="tiny-gemma2", teacher=str(root / "teacher"), tokenizer=str(tok_path),
                data=str(root / "chats.jsonl"), out=str(tmp_path / name), seq_len=64, batch_size=4, max_steps=6,
                warmup_steps=1, lr=3e-3, min_lr=3e-4, eval_every=3, save_every=3, log_every=1, eval_batches=1,
                val_fraction=0.1, lmbda=0.5, beta=0.5, temperature=1.0, max_new_tokens=6, progress=False,
                tensorboard=False)
    base.update(kw)
    return load_config(None, base)


def test_on_policy_steps_are_the_students_engine_samples(tmp_path, setup):
    cfg = gkd_cfg(tmp_path, setup, lmbda=0.5)
    recipe = GKD()
    meta = recipe.meta(cfg)
    source = recipe.batches(cfg, meta, "train")
    student = randomize(Gemma(preset("tiny-gemma2")), seed=3)
    source.policy = student
    assert [source.on_policy(s) for s in range(6)] == [False, True, False, True, False, True]
    layout = StepLayout(4, micro=2)
    [off, _] = source.micro_batches(0, layout)
    [on, _] = source.micro_batches(1, layout)
    assert off.windows.tolist() == [source.dataset.row_index(s) for s in range(2)]
    tok = recipe.tokenizer(cfg)
    for i, row in enumerate(on.windows.tolist()):
        p = source.prompts[row]
        want = Engine.for_model(student).generate(
            [p.ids], SamplingParams(temperature=1.0, seed=cfg.seed * 1_000_003 + 4 + i, max_new_tokens=6),
            stop_ids=tok.stop_ids)[0]
        n = len(p.ids)
        assert on.tokens[i, n:n + len(want)].tolist() == want  # prompt, then the student's sample
        labelled = (on.labels[i] != -100).nonzero().squeeze(1)
        assert labelled.tolist() == list(range(n - 1, n - 1 + len(want)))  # only the completion is scored
    assert student.training is False  # randomize() left it in eval: the engine does not change modes


def test_gkd_lowers_the_divergence_and_resumes_identically(tmp_path, setup, monkeypatch):
    import gemmaforge.train.loop as loop

    cfg = gkd_cfg(tmp_path, setup, "whole", max_steps=8, eval_every=4, save_every=4)
    (tmp_path / "gkd.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["gkd", str(tmp_path / "gkd.yaml")]) == 0
    curve, val = metrics(tmp_path / "whole"), metrics(tmp_path / "whole", "val")
    assert all(r["jsd"] > 0 for r in curve) and val[-1]["loss"] < val[0]["loss"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    real_step = loop.train_step

    def crash_at_6(run, step):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(loop, "train_step", crash_at_6)
    part = gkd_cfg(tmp_path, setup, "part", max_steps=8, eval_every=4, save_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(part, recipe=GKD())
    monkeypatch.setattr(loop, "train_step", real_step)
    train(part, recipe=GKD())  # resumes at step 4; steps 6 and 8 are on-policy again
    assert [r["loss"] for r in metrics(tmp_path / "part")] == pytest.approx([r["loss"] for r in curve], rel=1e-6)
    assert gemmaforge.load(tmp_path / "whole" / "model").config == preset("tiny-gemma2")


def test_teacher_with_another_tokenizer_is_refused(tmp_path, setup, capsys):
    root, tok_path = setup
    other = tmp_path / "teacher2"
    gemmaforge.save_pretrained(randomize(Gemma(preset("tiny-gemma2"))), other)
    (other / "tokenizer.json").write_bytes(tiny_tokenizer(tmp_path / "tok2", extra=["ab"]).read_bytes())
    cfg = gkd_cfg(tmp_path, setup, teacher=str(other))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["gkd", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "teacher" in err and "different tokenizer" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_teacher_vocabulary_mismatch_and_missing_teacher(tmp_path, setup):
    small = tmp_path / "small"
    gemmaforge.save_pretrained(randomize(Gemma(preset("tiny-gemma2").replace(vocab_size=400))), small)
    with pytest.raises(gemmaforge.GemmaforgeError, match="share one tokenizer"):
        train(gkd_cfg(tmp_path, setup, teacher=str(small)), recipe=GKD())
    with pytest.raises(gemmaforge.GemmaforgeError, match="needs teacher"):
        train(gkd_cfg(tmp_path, setup, "b", teacher=None), recipe=GKD())
