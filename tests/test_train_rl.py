"""gemmaforge rl: RLOO's leave-one-out advantages, the loss against autograd, k samples per prompt as one
engine request, a verifiable reward that rises while the KL to the reference stays small, bad input."""

import json

import pytest
import torch
import yaml

import gemmaforge
from gemmaforge import Gemma, preset
from gemmaforge.cli import main
from gemmaforge.train.batches import Batch
from gemmaforge.train.config import load_config
from gemmaforge.train.loop import train
from gemmaforge.train.recipes import RL
from gemmaforge.train.rl import RLOO, leave_one_out

from conftest import randomize
from post_training_data import tiny_tokenizer, write_jsonl
from test_train_loop import metrics

REWARD = "post_training_data:low_ids"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def rl_cfg(tmp_path, tok_path, name="run", **kw):
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        write_jsonl(data, [{"prompt": f"say {c}", "answer": c} for c in "abcdefghijklmnopqrst"])
    base = dict(model="tiny-gemma2", tokenizer=str(tok_path), data=str(data), out=str(tmp_path / name), seq_len=32,
                batch_size=16, rollouts_per_prompt=4, max_new_tokens=6, max_steps=20, warmup_steps=1, lr=3e-2,
                min_lr=3e-3, kl_coef=0.01, reward=REWARD, eval_every=10, save_every=10, log_every=1, eval_batches=1,
                val_fraction=0.2, progress=False, tensorboard=False)
    base.update(kw)
    return load_config(None, base)


def test_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    torch.testing.assert_close(leave_one_out(r, 4), torch.tensor([-2.6667, -1.3333, 0.0, 4.0, -1.3333, -1.3333,
                                                                  -1.3333, 4.0]), atol=1e-4, rtol=0)
    assert leave_one_out(r, 4).view(2, 4).sum(1).abs().max() < 1e-5  # zero-mean per group


def test_rloo_loss_matches_autograd_of_the_formula():
    policy = randomize(Gemma(preset("tiny-gemma2")), seed=1).train()
    reference = randomize(Gemma(preset("tiny-gemma2")), seed=2).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 512, (4, 9), generator=g)
    labels = torch.full_like(tokens, -100)
    labels[:, 4:-1] = tokens[:, 5:]  # the completions: tokens 5..8
    extra = {"reward": torch.tensor([0.2, 0.9, 0.4, 0.1]), "policy_logp": torch.tensor([-20.0, -21.0, -19.5, -22.0]),
             "length": torch.full((4,), 4.0)}
    objective = RLOO(policy, reference, k=2, kl_coef=0.1)
    loss, stats = objective(Batch(tokens, labels, extra=extra))
    loss.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    keep = labels != -100
    logp = lambda m: torch.log_softmax(m(tokens).float(), -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    with torch.no_grad():
        kl = extra["policy_logp"] - (logp(reference) * keep).sum(1)
    shaped = extra["reward"] - 0.1 * kl
    adv = torch.stack([shaped[0] - shaped[1], shaped[1] - shaped[0], shaped[2] - shaped[3], shaped[3] - shaped[2]])
    ref = -(adv * (logp(policy) * keep).sum(1)).sum()
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["kl"], kl.sum(), rtol=1e-5, atol=1e-4)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_rloo_raises_a_verifiable_reward_with_a_bounded_kl(tmp_path, tok_path, monkeypatch):
    from gemmaforge.generation.scheduler import Scheduler

    submitted = []
    real_submit = Scheduler.submit
    monkeypatch.setattr(Scheduler, "submit", lambda self, req: submitted.append(req.n) or real_submit(self, req))
    cfg = rl_cfg(tmp_path, tok_path)
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["rl", str(tmp_path / "rl.yaml")]) == 0
    assert submitted[:2] == [4, 4]  # k = 4 samples per prompt, one request (one prefill) each
    curve, val = metrics(tmp_path / "run"), metrics(tmp_path / "run", "val")
    assert abs(curve[0]["kl"]) < 1e-3  # the policy starts as the reference
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)
    assert mean(curve[-5:], "reward") > mean(curve[:5], "reward") + 0.25
    assert val[-1]["reward"] > val[0]["reward"] and all(abs(r["kl"]) < 15.0 for r in curve)
    assert curve[-1]["entropy"] < curve[0]["entropy"] and all(r["length"] > 0 for r in curve)
    assert gemmaforge.load(tmp_path / "run" / "model").config == preset("tiny-gemma2")
    import importlib.util

    if importlib.util.find_spec("matplotlib"):  # the train extra
        assert (tmp_path / "run" / "rl_curves.png").stat().st_size > 1000

    # a stronger penalty keeps the policy nearer the reference
    train(rl_cfg(tmp_path, tok_path, "tight", kl_coef=1.0), recipe=RL())
    assert mean(metrics(tmp_path / "tight")[-5:], "kl") < 0.5 * mean(curve[-5:], "kl")


def test_rl_resumes_identically(tmp_path, tok_path, monkeypatch):
    import gemmaforge.train.loop as loop

    kw = dict(max_steps=4, save_every=2, eval_every=2, batch_size=8, micro_batch_size=4, max_new_tokens=4)
    train(rl_cfg(tmp_path, tok_path, "whole", **kw), recipe=RL())
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 3 else real_step(run, step))
    with pytest.raises(KeyboardInterrupt):
        train(rl_cfg(tmp_path, tok_path, "part", **kw), recipe=RL())
    monkeypatch.setattr(loop, "train_step", real_step)
    train(rl_cfg(tmp_path, tok_path, "part", **kw), recipe=RL())
    want = [r[k] for r in metrics(tmp_path / "whole") for k in ("loss", "reward", "kl")]
    got = [r[k] for r in metrics(tmp_path / "part") for k in ("loss", "reward", "kl")]
    assert got == pytest.approx(want, rel=1e-6)


def test_a_reward_model_as_the_reward(tmp_path, tok_path):
    from gemmaforge.train.checkpointing import export_model
    from gemmaforge.train.reward import RewardModel

    rm = RewardModel.from_backbone(randomize(Gemma(preset("tiny-gemma3")), seed=4))
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    export_model(rm.state_dict(), rm.config, tmp_path / "rm", tok_path)
    result = train(rl_cfg(tmp_path, tok_path, reward=str(tmp_path / "rm"), max_steps=2, eval_every=2, save_every=2),
                   recipe=RL())
    assert result["train"]["reward"] != 0.0 and "kl" in result["val"]


@pytest.mark.parametrize("kw,match", [
    (dict(reward=None), "rl needs reward"),
    (dict(reward="post_training_data:nothing_here"), "has no function 'nothing_here'"),
    (dict(reward="no_such_module_xyz:f"), "cannot import the reward module"),
    (dict(batch_size=6), "multiples of rollouts_per_prompt"),
    (dict(rollouts_per_prompt=1), "needs at least 2 samples"),
    (dict(reward="post_training_data:write_jsonl"), None),  # returns a Path: not one number per completion
])
def test_bad_rl_input_is_one_line_exit_2(tmp_path, tok_path, capsys, kw, match):
    cfg = rl_cfg(tmp_path, tok_path, **kw)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["rl", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (match or "reward function") in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plain_prompts_for_a_pretrained_model(tok_path):
    from gemmaforge.train.chats import Record, prompt, scored

    tok = gemmaforge.load_tokenizer(tok_path)
    p = prompt(tok, Record("x line 1", {"prompt": "2 + 3 =", "completion": " 5", "answer": 5}), chat=False)
    assert p.ids == tok.encode("2 + 3 =") and p.completion == tok.encode(" 5", add_bos=False)
    assert p.fields == {"answer": 5} and p.text == "2 + 3 ="
    seq = scored(tok, Record("x", {"prompt": "a"}), " b", chat=False)
    assert tok.decode(seq.ids.tolist()) == "<bos>a b" and tok.decode(seq.ids[seq.targets].tolist()) == " b"
    with pytest.raises(gemmaforge.GemmaforgeError, match="plain text"):
        prompt(tok, Record("x line 2", {"messages": [{"role": "user", "content": "hi"}]}), chat=False)
