"""gemmaforge reward / reward-score: Bradley-Terry on preference pairs, held-out pairwise accuracy,
a checkpoint transformers' AutoModelForSequenceClassification reads with the same scores, bad input."""

import json
import math
import random
import string

import pytest
import torch
import yaml

import gemmaforge
from gemmaforge import Gemma, preset
from gemmaforge.cli import main
from gemmaforge.train.checkpointing import export_model
from gemmaforge.train.config import load_config
from gemmaforge.train.loop import train
from gemmaforge.train.packing import Tokens
from gemmaforge.train.recipes import Reward
from gemmaforge.train.reward import RewardModel, load_reward_model, score_sequences

from conftest import randomize
from post_training_data import tiny_tokenizer, write_jsonl
from test_train_loop import metrics


def preference_pairs(n, seed=0):
    """Chosen replies use letters a-m, rejected ones n-z: a reward model must find that out."""
    rng = random.Random(seed)
    word = lambda letters: " ".join(rng.choice(letters) for _ in range(rng.randrange(2, 6)))
    return [{"prompt": f"say {rng.choice(string.digits)}", "chosen": word("abcdefghijklm"),
             "rejected": word("nopqrstuvwxyz")} for _ in range(n)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def rm_cfg(tmp_path, tok_path, name="run", **kw):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, preference_pairs(80))
    base = dict(model="tiny-gemma2", tokenizer=str(tok_path), data=str(data), out=str(tmp_path / name), seq_len=64,
                batch_size=8, max_steps=30, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=15, save_every=15,
                log_every=5, eval_batches=4, val_fraction=0.2, progress=False, tensorboard=False)
    base.update(kw)
    return load_config(None, base)


def test_reward_model_learns_the_preference_and_transformers_agrees(tmp_path, tok_path, capsys):
    from transformers import AutoModelForSequenceClassification

    cfg = rm_cfg(tmp_path, tok_path)
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["reward", str(tmp_path / "rm.yaml")]) == 0
    assert "pairwise accuracy" in capsys.readouterr().out
    val = metrics(tmp_path / "run", "val")
    assert val[-1]["accuracy"] >= 0.9 and val[-1]["loss"] < 0.5 * math.log(2) and val[-1]["tokens"] == 16
    first = metrics(tmp_path / "run")[0]
    assert 0.0 <= first["accuracy"] <= 1.0 and "margin" in first

    out = tmp_path / "run" / "model"
    ours = load_reward_model(out)
    tok = gemmaforge.load_tokenizer(out)
    seqs = [Tokens.join(tok.encode("hi"), tok.encode(t, add_bos=False)) for t in ("a b c", "x y", "a a a a a a")]
    want = score_sequences(ours, seqs, tok.pad_id)
    hf = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    batch = torch.zeros(3, max(len(s) for s in seqs), dtype=torch.long)  # right-padded with pad id 0
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = torch.from_numpy(s.ids)
    with torch.no_grad():
        got = hf(batch).logits[:, 0]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-4)

    pairs = write_jsonl(tmp_path / "score.jsonl", preference_pairs(6, seed=9) + [
        {"prompt": "say 1", "completion": "a b"}])
    assert main(["reward-score", "--model", str(out), "--file", str(pairs)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(x) for x in captured.out.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 8)) and "reward" in rows[-1]
    assert sum(r["margin"] > 0 for r in rows[:-1]) >= 5 and "accuracy" in captured.err


@pytest.mark.skipif(not hasattr(__import__("transformers"), "Gemma3TextForSequenceClassification"),
                    reason="this transformers has no Gemma3TextForSequenceClassification")
def test_a_gemma3_reward_model_loads_in_transformers_with_the_same_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = RewardModel.from_backbone(randomize(Gemma(preset("tiny-gemma3"))))
    with torch.no_grad():
        model.score.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    export_model(model.state_dict(), model.config, tmp_path / "rm", None)
    seqs = [Tokens.join([2, 5, 9, 11], [40, 41]), Tokens.join([2, 7], [300, 12, 13, 14, 15])]
    want = score_sequences(load_reward_model(tmp_path / "rm"), seqs, 0)
    torch.testing.assert_close(torch.tensor(want), torch.tensor(score_sequences(model.eval(), seqs, 0)))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager").eval()
    batch = torch.tensor([[2, 5, 9, 11, 40, 41, 0], [2, 7, 300, 12, 13, 14, 15]])
    with torch.no_grad():
        torch.testing.assert_close(hf(batch).logits[:, 0], torch.tensor(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora", [0, 4])  # with LoRA the score head resumes from trainer.pt with the adapters
def test_reward_training_resumes_identically(tmp_path, tok_path, monkeypatch, lora):
    import gemmaforge.train.loop as loop

    kw = dict(max_steps=6, save_every=3, eval_every=3, log_every=1, lora_rank=lora, lora_alpha=8.0)
    train(rm_cfg(tmp_path, tok_path, "whole", **kw), recipe=Reward())
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 4 else real_step(run, step))
    part = rm_cfg(tmp_path, tok_path, "part", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(part, recipe=Reward())
    monkeypatch.setattr(loop, "train_step", real_step)
    train(part, recipe=Reward())
    want = [r["loss"] for r in metrics(tmp_path / "whole")]
    assert [r["loss"] for r in metrics(tmp_path / "part")] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("row,match", [
    ({"prompt": "say 1", "chosen": "a b", "rejected": "a b"}, "chosen and rejected are identical"),
    ({"prompt": "say 1", "chosen": "  ", "rejected": "a b"}, "chosen is empty"),
    ({"prompt": "say 1", "chosen": "a"}, "has no field 'rejected'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": "say 1", "chosen": 3, "rejected": "b"}, "'chosen' must be a str"),
])
def test_bad_pairs_are_one_line_exit_2(tmp_path, tok_path, capsys, row, match):
    data = write_jsonl(tmp_path / "bad.jsonl", preference_pairs(3) + [row])
    cfg = rm_cfg(tmp_path, tok_path, data=str(data), val_data=str(data))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["reward", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 4" in err and match in err, err
    assert list((tmp_path / "run").iterdir()) == []


def test_a_plain_model_is_not_a_reward_model(tmp_path, capsys):
    gemmaforge.save_pretrained(randomize(Gemma(preset("tiny-gemma2"))), tmp_path / "lm")
    write_jsonl(tmp_path / "p.jsonl", preference_pairs(1))
    assert main(["reward-score", "--model", str(tmp_path / "lm"), "--file", str(tmp_path / "p.jsonl")]) == 2
    assert "not a reward model" in capsys.readouterr().err
