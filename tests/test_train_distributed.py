"""FSDP2 with 2 CPU processes (gloo) against 1 process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import gemmaforge
from gemmaforge.train.config import load_config
from gemmaforge.train.loop import train
from test_train_loop import counting_corpus

COMMON = dict(model="tiny-gemma2", teacher="tiny-gemma3", alpha=0.5, temperature=2.0, seq_len=32, batch_size=4,
              micro_batch_size=1, warmup_steps=2, lr=3e-3, min_lr=3e-3, eval_every=2, eval_batches=2, log_every=1,
              save_every=2, progress=False, tensorboard=False, activation_checkpointing=True)


def _curve(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_checkpoints_move_between_them(tmp_path):
    counting_corpus(tmp_path / "data")
    two = dict(COMMON, data=str(tmp_path / "data"), out=str(tmp_path / "two"), max_steps=2)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gemmaforge", "distill", str(tmp_path / "two.yaml")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # one process, same global batch (2 micro-batches per step here, 1 per process there)
    one = load_config(None, dict(COMMON, data=str(tmp_path / "data"), out=str(tmp_path / "one"), max_steps=4))
    train(one)
    ref = _curve(tmp_path / "one")
    got = _curve(tmp_path / "two")
    assert [r["step"] for r in got] == [r["step"] for r in ref if r["step"] <= 2]
    for a, b in zip(got, ref):
        for key in ("loss", "ce", "kl", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)

    # the 2-process checkpoint is an ordinary HF directory ...
    model = gemmaforge.load(tmp_path / "two" / "checkpoints" / "step-000002" / "model")
    ref_model = gemmaforge.load(tmp_path / "one" / "checkpoints" / "step-000002" / "model")
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    # ... and one process resumes it (weights + AdamW state) onto the same curve
    train(one.replace(out=str(tmp_path / "two")))
    resumed = _curve(tmp_path / "two")
    assert [r["step"] for r in resumed] == [r["step"] for r in ref]
    for a, b in zip(resumed[len(got):], ref[len(got):]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
