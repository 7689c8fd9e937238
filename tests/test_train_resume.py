"""Exact resume: a run killed with SIGKILL after a checkpoint continues the loss curve bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from test_train_loop import counting_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _config(tmp_path, name):
    cfg = dict(model="tiny-gemma3", data=str(tmp_path / "data"), out=str(tmp_path / name), seq_len=32, batch_size=4,
               micro_batch_size=2, max_steps=1000, warmup_steps=3, lr=3e-3, min_lr=3e-3,  # constant after warmup:
               eval_every=5, eval_batches=1, save_every=4, log_every=1,  # max_steps then leaves the schedule alone
               progress=False, tensorboard=False)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config, *flags):
    return subprocess.run([sys.executable, "-m", "gemmaforge", "train", str(config), *flags], env=ENV,
                          capture_output=True, text=True, timeout=300)


def _curve(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"], r.get("grad_norm")) for r in lines]


def test_kill_9_and_restart_continues_identically(tmp_path):
    counting_corpus(tmp_path / "data")
    steps = "24"
    reference = _run(_config(tmp_path, "ref"), "--max-steps", steps)
    assert reference.returncode == 0, reference.stderr

    killed_cfg = _config(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "gemmaforge", "train", str(killed_cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts / "step-000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert saved and saved[-1] < f"step-{int(steps):06d}", saved

    resumed = _run(killed_cfg, "--max-steps", steps)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {ckpts / saved[-1]}" in resumed.stdout
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # no half-written checkpoint left
    ref_curve, resumed_curve = _curve(tmp_path / "ref"), _curve(tmp_path / "killed")
    assert len(ref_curve) == int(steps) + int(steps) // 5 + 1
    assert resumed_curve == ref_curve  # bitwise: same floats, same steps, no duplicates
    a = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "killed" / "model" / "model.safetensors").read_bytes()
    assert a == b
