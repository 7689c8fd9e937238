"""The training loop end to end on tiny presets and synthetic token data."""

import json

import numpy as np
import pytest
import torch

import gemmaforge
from gemmaforge.train.config import load_config
from gemmaforge.train.data import write_token_dataset
from gemmaforge.train.loop import train


def counting_corpus(path, n_train=40, n_val=6, vocab=512, cycle=16, seed=0):
    """Documents that count 3, 4, ..., 3 + cycle - 1, 3, ... from a random start: learnable, so the
    loss must fall fast."""
    rng = np.random.default_rng(seed)

    def doc():
        start, length = rng.integers(0, cycle), rng.integers(20, 60)
        return [2] + [int(3 + (start + i) % cycle) for i in range(length)]

    write_token_dataset(path, {"train": [doc() for _ in range(n_train)], "val": [doc() for _ in range(n_val)]},
                        vocab_size=vocab)
    return path


def cfg(tmp_path, name="run", **kw):
    base = dict(model="tiny-gemma2", data=str(tmp_path / "data"), out=str(tmp_path / name), seq_len=32,
                batch_size=4, max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=4, log_every=1,
                save_every=4, eval_batches=2, progress=False, tensorboard=False)
    base.update(kw)
    return load_config(None, base)


def metrics(run_dir, split="train"):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


@pytest.fixture
def data(tmp_path):
    return counting_corpus(tmp_path / "data")


def test_training_learns_and_exports_a_loadable_checkpoint(tmp_path, data):
    from transformers import AutoModelForCausalLM

    result = train(cfg(tmp_path, max_steps=30, eval_every=15, save_every=15, log_every=5))
    train_curve = metrics(tmp_path / "run")
    val = metrics(tmp_path / "run", "val")
    assert train_curve[0]["step"] == 5 and train_curve[-1]["loss"] < 0.6 * train_curve[0]["loss"]
    # below ln(16) = 2.77, the loss of knowing only which 16 tokens occur: the rule was learnt
    assert val[-1]["loss"] < 2.3 and val[-1]["ppl"] == pytest.approx(np.exp(val[-1]["loss"]))
    assert result["val"]["loss"] == val[-1]["loss"]

    model = gemmaforge.load(tmp_path / "run" / "model")
    tokens = torch.tensor([[2] + [3 + i % 16 for i in range(5, 25)]])
    ours = model(tokens)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the counting rule was learnt: the next number is the most likely token after a run
    assert (ours[0, 5:-1].argmax(-1) == tokens[0, 6:]).float().mean() > 0.8
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000015", "step-000030"]
    last = gemmaforge.load(tmp_path / "run" / "checkpoints" / "step-000030" / "model")
    torch.testing.assert_close(last(tokens), ours)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, data):
    train(cfg(tmp_path, "big", max_steps=3, micro_batch_size=4))
    train(cfg(tmp_path, "accum", max_steps=3, micro_batch_size=1))
    big, accum = metrics(tmp_path / "big"), metrics(tmp_path / "accum")
    assert len(big) == 3
    for a, b in zip(big, accum):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert big[-1]["loss"] != big[0]["loss"]


def test_activation_checkpointing_and_chunking_do_not_change_the_run(tmp_path, data):
    train(cfg(tmp_path, "plain", max_steps=3))
    train(cfg(tmp_path, "ckpt", max_steps=3, activation_checkpointing=True, loss_chunk=7))
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_distill_from_cache_with_full_vocab_equals_live_teacher(tmp_path, data):
    from gemmaforge.train.distill import build_teacher_cache

    common = dict(teacher="tiny-gemma3", alpha=0.7, temperature=2.0, max_steps=3, eval_every=3, save_every=3)
    live = train(cfg(tmp_path, "live", **common))
    cached_cfg = cfg(tmp_path, "cached", teacher_cache=str(tmp_path / "cache"), cache_k=512, **common)
    build_teacher_cache(cached_cfg, progress=False)
    cached = train(cached_cfg)
    for a, b in zip(metrics(tmp_path / "live"), metrics(tmp_path / "cached")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)  # KL = soft CE - entropy: compare absolutely
        assert a["kl"] > 0 and a["loss"] != a["ce"]
    assert live["val"]["loss"] == pytest.approx(cached["val"]["loss"], rel=1e-4)

    # a top-k cache (k < vocab) and a Gemma-3 sampled cache train too, and differ from the full one
    for mode, k in (("topk", 16), ("sample", 32)):
        c = cfg(tmp_path, f"c-{mode}", teacher_cache=str(tmp_path / f"cache-{mode}"), cache_k=k, cache_mode=mode,
                **common)
        build_teacher_cache(c, progress=False)
        train(c)
        assert metrics(tmp_path / f"c-{mode}")[0]["kl"] != pytest.approx(metrics(tmp_path / "live")[0]["kl"], rel=1e-3)
