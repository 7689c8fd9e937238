"""Config handling and bad input through the CLI: one clear line, exit code 2, nothing lost."""

import argparse

import pytest
import yaml

from gemmaforge import GemmaforgeError
from gemmaforge.cli import main
from gemmaforge.train.config import TrainConfig, add_config_flags, config_from_args, load_config
from gemmaforge.train.data import write_token_dataset
from test_train_loop import counting_corpus

FAST = dict(model="tiny-gemma2", seq_len=16, batch_size=2, max_steps=2, warmup_steps=1, eval_every=2, save_every=2,
            eval_batches=1, progress=False, tensorboard=False)


def _yaml(tmp_path, name="run.yaml", **values):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _fails(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


def test_yaml_values_and_flags_are_coerced_and_override(tmp_path):
    path = _yaml(tmp_path, lr="1e-3", seq_len=128, activation_checkpointing="yes", teacher=None)
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args([path, "--seq-len", "64", "--warmup-steps", "1e2"]))
    assert cfg.lr == 0.001 and cfg.seq_len == 64 and cfg.warmup_steps == 100 and cfg.activation_checkpointing is True
    assert cfg.max_steps == TrainConfig().max_steps
    with pytest.raises(GemmaforgeError, match="'seq_len' expects int"):
        load_config(None, {"seq_len": "long"})
    with pytest.raises(GemmaforgeError, match="'seq_len' expects int"):
        load_config(None, {"seq_len": 1.5})
    with pytest.raises(GemmaforgeError, match="alpha must be in"):
        load_config(None, {"alpha": 2})


def test_unknown_key_suggests_the_right_one(tmp_path, capsys):
    _fails(["train", _yaml(tmp_path, warmup_step=10)], capsys, "unknown config key 'warmup_step'",
           "did you mean 'warmup_steps'?")
    _fails(["train", _yaml(tmp_path, learning_rate=1)], capsys, "unknown config key 'learning_rate'")
    _fails(["train", str(tmp_path / "nope.yaml")], capsys, "does not exist")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    _fails(["train", str(tmp_path / "bad.yaml")], capsys, "not valid YAML")


def test_missing_data_and_empty_corpus(tmp_path, capsys):
    _fails(["train", _yaml(tmp_path, data=str(tmp_path / "nodata"), out=str(tmp_path / "o"), **FAST)], capsys,
           "does not exist", "gemmaforge prepare-data")
    (tmp_path / "empty.jsonl").write_text("\n")
    _fails(["prepare-data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "d"), "--no-progress"], capsys,
           "corpus is empty")


def test_vocabulary_mismatches(tmp_path, capsys):
    write_token_dataset(tmp_path / "big", {"train": [[2, 900, 901] * 30], "val": [[2, 5, 6] * 30]}, vocab_size=1000)
    _fails(["train", _yaml(tmp_path, data=str(tmp_path / "big"), out=str(tmp_path / "o"), **FAST)], capsys,
           "1000-token vocabulary", "512")
    from gemmaforge import Gemma, preset, save_pretrained

    save_pretrained(Gemma(preset("tiny-gemma3").replace(vocab_size=600)).init_weights(), tmp_path / "teacher600")
    counting_corpus(tmp_path / "data")
    cfg = _yaml(tmp_path, data=str(tmp_path / "data"), out=str(tmp_path / "o2"), teacher=str(tmp_path / "teacher600"),
                **FAST)
    _fails(["distill", cfg], capsys, "teacher has a 600-token vocabulary and the student 512", "share one tokenizer")
    _fails(["train", cfg], capsys, "gemmaforge distill")


def test_unwritable_output_and_a_changed_run_lose_nothing(tmp_path, capsys):
    counting_corpus(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _fails(["train", _yaml(tmp_path, data=str(tmp_path / "data"), out=str(blocker / "run"), **FAST)], capsys,
           "cannot write to output directory")
    good = _yaml(tmp_path, data=str(tmp_path / "data"), out=str(tmp_path / "run"), **FAST)
    assert main(["train", good]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    _fails(["train", good, "--seq-len", "8"], capsys, "holds a run with seq_len=16")
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after
